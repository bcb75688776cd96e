"""Checkpoints: atomic save, full restore (model, weight average, optimizer, schedule, grad scaler, RNG),
latest lookup.

A checkpoint file is a ``torch.save`` dict::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ..., "iteration": int,
     "config": config_to_dict(cfg), "class_names": [name of label 1, name of label 2, ...],
     "rng": {"python", "numpy", "torch", "cuda"}, ...extra}

``iteration`` counts the optimizer steps already taken. ``model`` holds the weights to use: with a weight
average (``solver.ema_decay`` > 0, see :mod:`maskrcnn.engine.ema`) those are the averaged weights, so that
whatever loads ``model`` (the predictor, evaluation, ``model.weights``, the converters) gets the averaged
model, and two more entries keep what resuming needs: ``raw_model`` (the trained weights, which the
optimizer state belongs to) and ``ema_updates`` (the average's update count).

Every value is a tensor or a plain Python container, so ``torch.load(..., weights_only=True)`` reads it.
Files are written to a temporary file in the same directory, fsynced and renamed over the target, so a
crash mid-save never leaves a truncated checkpoint behind; ``output_dir/last_checkpoint`` holds the file
name of the newest one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import Config, config_to_dict
from ..distributed import get_rank, get_world_size, unwrap_model
from ..errors import InputError
from ..fileio import atomic_write, read_checkpoint
from .ema import ModelEMA

LAST_CHECKPOINT = "last_checkpoint"


def rng_state() -> dict:
    """This process's random number generator states: Python, NumPy, torch CPU and the current CUDA device.

    ``cuda`` is None when CUDA has not been initialised in this process.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict) -> None:
    """Restore states captured by :func:`rng_state` (the CUDA one only where CUDA is available)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str | Path, *, model: nn.Module, ema: Optional[ModelEMA] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                    scaler: Optional[torch.amp.GradScaler] = None, iteration: int, config: Config,
                    class_names: List[str], rng: Optional[dict] = None, update_last: bool = True,
                    **extra) -> Path:
    """Atomically write a checkpoint to ``path`` and (``update_last``) point ``path.parent/last_checkpoint``
    at it.

    model: saved without a ``DistributedDataParallel`` wrapper (keys have no ``module.`` prefix).
    ema: the weight average of ``model``, or None; when given, ``model`` holds its weights, ``raw_model``
        the model's own and ``ema_updates`` its update count.
    optimizer / scheduler / scaler: their ``state_dict()``, or None when not given.
    iteration: optimizer steps taken. rng: states from :func:`rng_state`; default: the current ones.
    extra: further picklable entries stored as they are.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = unwrap_model(model).state_dict()
    checkpoint = {
        "model": weights if ema is None else ema.module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": int(iteration),
        "config": config_to_dict(config),
        "class_names": list(class_names),
        "rng": rng if rng is not None else rng_state(),
        **extra,
    }
    if ema is not None:
        checkpoint.update(raw_model=weights, ema_updates=ema.updates)
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    if update_last:
        atomic_write(path.parent / LAST_CHECKPOINT, lambda f: f.write(path.name.encode()))
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, scaler: Optional[torch.amp.GradScaler] = None, *,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint into ``model`` (strictly) and, when given, the optimizer, scheduler and scaler.

    ``model`` gets the trained weights (``raw_model`` where the checkpoint has a weight average, else
    ``model``): what the optimizer state continues from; :func:`load_ema` restores the average.

    With ``restore_rng``, the random number generators are set to the states saved with the checkpoint:
    under ``torch.distributed`` each process takes its own rank's entry of ``rng_by_rank`` when the
    checkpoint has one for this world size, else ``rng``.
    Returns the checkpoint dict (tensors on the CPU). Raises ``FileNotFoundError`` for a missing file and
    ``InputError`` naming the file when it is unreadable or lacks a requested entry.
    """
    checkpoint = read_checkpoint(path)
    wanted = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    for key, target in wanted.items():
        if target is not None and checkpoint.get(key) is None:
            raise InputError(f"checkpoint {path} has no {key!r} entry")
    raw = checkpoint.get("raw_model")
    unwrap_model(model).load_state_dict(raw if raw is not None else checkpoint["model"])
    for key in ("optimizer", "scheduler", "scaler"):
        if wanted[key] is not None:
            wanted[key].load_state_dict(checkpoint[key])
    if restore_rng:
        set_rng_state(rng_of_this_rank(checkpoint))
    return checkpoint


def load_ema(checkpoint: dict, ema: ModelEMA) -> bool:
    """Restore a weight average saved in ``checkpoint`` (its weights and update count) into ``ema``.

    Returns False, leaving ``ema`` as it is, for a checkpoint saved without one (the average then starts
    from the weights it was built from, at update 0).
    """
    if checkpoint.get("raw_model") is None:
        return False
    ema.module.load_state_dict(checkpoint["model"])
    ema.updates = int(checkpoint["ema_updates"])
    return True


def rng_of_this_rank(checkpoint: dict) -> dict:
    """The RNG states a process should resume with: its rank's ``rng_by_rank`` entry, else ``rng``."""
    by_rank = checkpoint.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == get_world_size():
        return by_rank[get_rank()]
    return checkpoint["rng"]


def find_last_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The checkpoint named by ``output_dir/last_checkpoint``, or None when there is no such pointer.

    Raises ``FileNotFoundError`` when the pointer names a file that does not exist.
    """
    pointer = Path(output_dir) / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist in {output_dir}")
    return path


def resume_candidates(output_dir: str | Path) -> List[Path]:
    """Checkpoints to resume from, best first: the one ``last_checkpoint`` names, then the periodic and
    final checkpoints of ``output_dir`` from the latest iteration down (each once)."""
    output_dir = Path(output_dir)
    pointer = output_dir / LAST_CHECKPOINT
    named = [output_dir / pointer.read_text().strip()] if pointer.is_file() else []
    periodic = sorted(output_dir.glob("model_[0-9]*.pth"), key=lambda p: p.name, reverse=True)
    final = [output_dir / "model_final.pth"] if (output_dir / "model_final.pth").is_file() else []
    out = []
    for path in named + final + periodic:
        if path not in out:
            out.append(path)
    return out


def load_last_good_checkpoint(output_dir: str | Path, model: nn.Module, optimizer=None, scheduler=None,
                              scaler=None, *, warn: Callable[[str], None] = print) -> Optional[dict]:
    """Load the newest readable checkpoint of ``output_dir`` (see :func:`resume_candidates`).

    A candidate that is missing, truncated or corrupt is skipped with a one-line ``warn``; returns the
    loaded checkpoint dict (with ``"path"`` added), or None when ``output_dir`` has no checkpoint at all.
    Raises InputError naming every file tried when none of them is readable.
    """
    candidates = resume_candidates(output_dir)
    problems = []
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path, model, optimizer, scheduler, scaler, restore_rng=False)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
            warn(f"skipping {path.name}: {exc}")
            continue
        checkpoint["path"] = path
        return checkpoint
    if problems:
        raise InputError(f"no readable checkpoint in {output_dir}: " + "; ".join(problems))
    return None
