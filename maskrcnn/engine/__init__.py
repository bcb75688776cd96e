"""Training: the loop (trainer), optimizer and schedule (optim), checkpoints and metrics logging."""
