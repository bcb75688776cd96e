"""Training: the loop (trainer), optimizer and schedule (optim), checkpoints, metrics logging, and the
multi-process helpers (distributed)."""
