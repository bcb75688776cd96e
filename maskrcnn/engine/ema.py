"""Exponential moving average (EMA) of a model's weights: the model that evaluation and inference use.

After the optimizer step that follows ``t`` earlier updates (t = 0, 1, 2, ...), every floating-point
parameter and buffer ``w`` of the trained model moves its average ``e``::

    d_t = min(decay, (1 + t) / (10 + t))
    e  <-  d_t * e + (1 - d_t) * w

The average is kept in fp32 (also under bf16 or fp16 autocast, where the parameters are fp32 anyway) and
computed as ``e + (1 - d_t) * (w - e)``, one rounding per operation: the same value in exact arithmetic,
and a tensor the training never changes (a frozen stage, a FrozenBatchNorm statistic) stays bit for bit
what it was.

The warmup of ``d_t`` is TensorFlow's ``ExponentialMovingAverage(num_updates=t)``: ``d_0 = 0.1``, and
``d_t`` reaches ``decay`` = 0.999 only after 8,990 updates, so that the average of a run of any length is
made of that run's trained weights and not mostly of its starting ones (with a constant 0.999, 37 % of the
average after 1,000 steps would still be the initial weights).

Buffers: BatchNorm's running mean and variance are averaged like the parameters (as timm's ``ModelEmaV2``
and torchvision's reference ``ExponentialMovingAverage`` do), so that the averaged weights come with
statistics of the features they compute; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..config import SolverConfig
from ..distributed import unwrap_model
from ..errors import InputError

# TensorFlow's warmup d_t = min(decay, (1 + t) / (WARMUP + t)).
WARMUP = 10


class ModelEMA:
    """An fp32 copy of a model whose floating-point parameters and buffers follow the model's (see the module).

    model: the trained module (a ``DistributedDataParallel`` wrapper is unwrapped), copied as it is now:
        build the average once the model holds its starting weights (under DDP, after wrapping it, which
        gives every process rank 0's weights).
    decay: the decay after the warmup, in (0, 1); 0.999 averages over about the last 1,000 steps.

    ``module`` is the averaged copy (eval mode, no gradients): evaluate it, save its ``state_dict``.
    ``updates`` counts the updates so far (``t`` above); save and restore it with the weights.
    Raises ``InputError`` for a decay outside (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise InputError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(unwrap_model(model)).float().eval().requires_grad_(False)
        self.updates = 0

    def decay_at(self, t: int) -> float:
        """The decay ``d_t`` of the update that follows ``t`` earlier ones."""
        return min(self.decay, (1 + t) / (WARMUP + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after every optimizer step).

        model: the trained module (or its DDP wrapper), with the same ``state_dict`` keys as ``module``.
        Raises ``ValueError`` naming the keys when they differ.
        """
        current = unwrap_model(model).state_dict()
        averaged = self.module.state_dict()
        if current.keys() != averaged.keys():
            raise ValueError(f"the model's state_dict keys differ from the average's: "
                             f"{sorted(set(current) ^ set(averaged))[:5]}")
        floating = [k for k, e in averaged.items() if e.is_floating_point()]
        ema = [averaged[k] for k in floating]
        diff = torch._foreach_sub([current[k].float() for k in floating], ema)  # w - e
        torch._foreach_mul_(diff, 1.0 - self.decay_at(self.updates))
        torch._foreach_add_(ema, diff)
        for k, e in averaged.items():
            if not e.is_floating_point():
                e.copy_(current[k])
        self.updates += 1


def build_ema(model: nn.Module, solver_cfg: SolverConfig) -> Optional[ModelEMA]:
    """The weight average of ``solver.ema_decay`` (None when it is 0); InputError outside [0, 1)."""
    decay = solver_cfg.ema_decay
    if not 0.0 <= decay < 1.0:
        raise InputError(f"solver.ema_decay must be in [0, 1) (0: off), got {decay}")
    return ModelEMA(model, decay) if decay > 0 else None
