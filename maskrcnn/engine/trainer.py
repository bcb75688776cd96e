"""The training loop: configuration in, checkpoints, metrics and figures out.

One iteration: fetch a batch -> forward under autocast -> check the total loss is finite -> backward
(scaled for fp16) -> optional gradient clipping -> optimizer step -> scheduler step -> with
``solver.ema_decay`` > 0, update of the weight average (see :mod:`maskrcnn.engine.ema`), which is then the
model that evaluation scores and that checkpoints hold under ``model``. Every
``train.log_period`` iterations the loss means since the previous log step are averaged over processes
and written by rank 0 (see :mod:`maskrcnn.engine.logger`); checkpoints are written every
``train.checkpoint_period`` iterations and at the end (see :mod:`maskrcnn.engine.checkpoint`). The loss
curve is redrawn at log steps, at most every ``PLOT_INTERVAL_S`` seconds, and after the last iteration.

Files in ``train.output_dir``: ``config.yaml`` (the resolved configuration), ``model_{iter:07d}.pth``,
``model_final.pth``, ``last_checkpoint``, ``metrics.jsonl``, ``loss_curve.png``, ``train_summary.json``
(the summary returned by :func:`train`), ``run_info.json`` (the precision ``train.precision`` resolved to and
why, the CPU, its ISA and threads: see :mod:`maskrcnn.precision`), with ``model.weights`` ``weights_summary.json`` (see
:mod:`maskrcnn.engine.weights`) and, with evaluation, ``eval_{iter:07d}/``.

Iterations are counted as optimizer steps taken: the checkpoint ``model_0000100.pth`` and the log record
with ``iteration`` 100 come after the 100th step.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import InputError
from ..config import Config, config_to_yaml
from ..data.loader import build_train_dataset, build_train_loader
from ..distributed import (all_gather_object, all_reduce_mean, all_true, barrier, cleanup, get_local_rank,
                           get_rank, get_world_size, init_distributed, is_main_process)
from ..evaluation.coco_evaluator import evaluate
from ..fileio import atomic_write
from ..precision import ResolvedPrecision, channels_last_is_faster, machine_summary, resolve_precision
from ..modeling.maskrcnn import build_model
from ..structures import BitMasks, PolygonMasks
from .checkpoint import (find_last_checkpoint, load_ema, load_last_good_checkpoint, rng_of_this_rank, rng_state,
                         save_checkpoint, set_rng_state)
from .ema import build_ema
from .logger import MetricsLogger
from .optim import build_lr_scheduler, build_optimizer
from .weights import format_summary, load_weights

# The loss curve is redrawn at a log step only if this many seconds passed since the last redraw (and
# always at the last iteration): drawing takes ~0.2 s, which at short log periods would slow training.
PLOT_INTERVAL_S = 10.0
WEIGHTS_SUMMARY = "weights_summary.json"  # what model.weights loaded, written at the start of a run
RUN_INFO = "run_info.json"  # the precision the run resolved to, and why; the machine it ran on
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(cfg: Config, *, resume: bool = False, model: Optional[nn.Module] = None) -> Dict:
    """Train a Mask R-CNN as configured; returns the run's summary (also written to ``train_summary.json``).

    resume: continue from ``train.output_dir/last_checkpoint`` (model, weight average, optimizer, schedule,
        grad scaler, iteration, RNG states and data position), reproducing the uninterrupted run; a fresh
        start when there is no checkpoint yet. A checkpoint found this way wins over ``model.weights``, which
        otherwise starts the run (iteration 0, fresh optimizer) from those weights, class rows matched by
        name (see :mod:`maskrcnn.engine.weights`).
    model: a module following the :class:`maskrcnn.modeling.maskrcnn.MaskRCNN` contract to train instead
        of ``build_model(cfg.model)`` (e.g. one initialised from converted weights); trained in place.

    Under ``torchrun`` every process calls this; the process group is created here (and destroyed at the
    end) unless the caller already made one. The summary holds ``iteration``, ``train_seconds`` (this
    call's loop), ``train`` (the last training log record) and ``eval`` (the last evaluation metrics, or
    None; only rank 0 has them).

    Raises ``ValueError`` for an unusable configuration (device, precision, batch size, classes) and
    ``FloatingPointError`` naming the iteration and the loss term when a loss is not finite, or the
    gradient norm when a finite loss has a non-finite gradient (no step is taken), after saving the state
    from before that iteration as ``stopped_before_iteration_N.pth``; the last good checkpoint and
    ``last_checkpoint`` are left as they were.
    """
    device = _resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device, allowed=("auto", *_PRECISIONS))
    amp_dtype = _amp_dtype(precision.precision, device)
    owns_group = init_distributed(device.type)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", get_local_rank())
        return _Run(cfg, device, precision, amp_dtype, resume=resume, model=model).run()
    finally:
        if owns_group:
            cleanup()


class _Run:
    """The state of one training run: built from the configuration in ``__init__``, advanced by ``run``."""

    def __init__(self, cfg: Config, device: torch.device, precision: ResolvedPrecision,
                 amp_dtype: Optional[torch.dtype], *, resume: bool, model: Optional[nn.Module]):
        self.cfg, self.device, self.precision, self.amp_dtype = cfg, device, precision, amp_dtype
        self.rank, self.world_size = get_rank(), get_world_size()
        self.output_dir = Path(cfg.train.output_dir)
        solver = cfg.solver
        if solver.ims_per_batch % self.world_size:
            raise InputError(f"solver.ims_per_batch={solver.ims_per_batch} is not divisible by the "
                             f"{self.world_size} processes")
        for key, value in (("solver.max_iter", solver.max_iter), ("train.log_period", cfg.train.log_period),
                           ("train.checkpoint_period", cfg.train.checkpoint_period)):
            if value <= 0:
                raise InputError(f"{key} must be positive, got {value}")
        _seed_all(cfg.train.seed + self.rank)

        self.dataset = build_train_dataset(cfg)
        self.dataset.check_images(progress=is_main_process())  # a bad file fails now, not mid-training
        self.class_names = list(self.dataset.class_names)
        if len(self.class_names) != cfg.model.roi_heads.num_classes:
            raise InputError(f"{cfg.data.train_ann} has {len(self.class_names)} categories but "
                             f"model.roi_heads.num_classes is {cfg.model.roi_heads.num_classes}")

        self.model = model if model is not None else build_model(cfg.model)
        self.model.to(device)
        channels_last = cfg.train.channels_last
        if channels_last is None:
            channels_last, self.layout_reason = channels_last_is_faster(device)
        else:
            self.layout_reason = f"{'channels-last' if channels_last else 'NCHW'}: train.channels_last={channels_last}"
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.train.sync_bn and self.world_size > 1:
            m = cfg.model
            if device.type != "cuda" or not any(isinstance(x, nn.BatchNorm2d) for x in self.model.modules()):
                raise InputError(f"train.sync_bn needs CUDA and a batch norm (backbone.norm, backbone.fpn_norm, "
                                 f"roi_heads.box_head_norm or roi_heads.mask_head_norm = bn), got device "
                                 f"{device.type}, norms {m.backbone.norm}, {m.backbone.fpn_norm or 'none'}, "
                                 f"{m.roi_heads.box_head_norm or 'none'}, {m.roi_heads.mask_head_norm or 'none'}")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, solver)
        self.scheduler = build_lr_scheduler(self.optimizer, solver)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.buffers = list(self.model.buffers())

        self.start_iter = 0
        self.resume_rng = None
        checkpoint = None
        if resume:
            checkpoint = load_last_good_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler,
                                                   self.scaler, warn=print if is_main_process() else lambda _: None)
        if checkpoint is not None:
            self.start_iter = checkpoint["iteration"]
            self.resume_rng = rng_of_this_rank(checkpoint)
            if is_main_process():
                print(f"resuming from {checkpoint['path']} at iteration {self.start_iter}")
        self.weights_summary = None
        if checkpoint is None and cfg.model.weights:  # a resumed checkpoint wins over model.weights
            self.weights_summary = load_weights(self.model, cfg.model.weights, self.class_names)

        self.ddp_model = self.model
        if self.world_size > 1:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False)
        # Built from the model as DDP left it (rank 0's weights on every process), then set from the checkpoint.
        self.ema = build_ema(self.model, solver)
        if self.ema is not None and checkpoint is not None:
            load_ema(checkpoint, self.ema)
        self.batches = build_train_loader(
            self.dataset, images_per_batch=solver.ims_per_batch, seed=cfg.train.seed, rank=self.rank,
            world_size=self.world_size, start_iter=self.start_iter, num_workers=cfg.data.num_workers,
            aspect_ratio_grouping=cfg.data.aspect_ratio_grouping, aspect_ratio_groups=cfg.data.aspect_ratio_groups)

        self.logger = None
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "config.yaml", lambda f: f.write(config_to_yaml(cfg).encode()))
            print(f"{self.precision.message}; layout {self.layout_reason}", file=sys.stderr)  # stdout: JSON summary
            run_info = json.dumps({"precision": self.precision.to_dict(), "layout": self.layout_reason,
                                   "machine": machine_summary(device)}, indent=1)
            atomic_write(self.output_dir / RUN_INFO, lambda f: f.write(run_info.encode()))
            self.logger = MetricsLogger(self.output_dir, start_iter=self.start_iter,
                                        tensorboard=cfg.train.tensorboard)
            if self.weights_summary is not None:
                print(format_summary(self.weights_summary))
                text = json.dumps(self.weights_summary, indent=1)
                atomic_write(self.output_dir / WEIGHTS_SUMMARY, lambda f: f.write(text.encode()))
        self.last_record: Optional[Dict] = None
        self.last_plot = -math.inf
        self.last_eval: Optional[Dict] = None

    def run(self) -> Dict:
        summary_path = self.output_dir / "train_summary.json"
        if self.start_iter >= self.cfg.solver.max_iter and summary_path.is_file():
            # Resumed after the end: nothing to train; the finished run's summary stays as it was.
            if is_main_process():
                print(f"training already finished at iteration {self.start_iter}; see {summary_path}")
            return json.loads(summary_path.read_text())
        bar = tqdm(total=self.cfg.solver.max_iter, initial=self.start_iter, desc="train", unit="it",
                   dynamic_ncols=True, mininterval=1.0, disable=not is_main_process())
        try:
            start_time = time.perf_counter()
            self._loop(bar)
            train_seconds = time.perf_counter() - start_time
            bar.close()
            max_iter, eval_period = self.cfg.solver.max_iter, self.cfg.train.eval_period
            self._save("model_final.pth", max_iter)
            if self.cfg.train.eval_at_end or (eval_period > 0 and max_iter % eval_period == 0):
                self._evaluate(max_iter)
            summary = {"iteration": max_iter, "train_seconds": train_seconds, "train": self.last_record,
                       "eval": self.last_eval}
            if is_main_process():
                text = json.dumps(summary, indent=1)
                atomic_write(summary_path, lambda f: f.write(text.encode()))
            return summary
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()

    def _loop(self, bar: tqdm) -> None:
        """Iterations ``start_iter`` .. ``max_iter - 1`` with logging, checkpoints and periodic evaluation."""
        cfg, max_iter = self.cfg, self.cfg.solver.max_iter
        self.ddp_model.train()
        window = _Window()
        for iteration in range(self.start_iter, max_iter):
            tic = time.perf_counter()
            images, targets = next(self.batches)
            if self.resume_rng is not None:
                # Restored after the first fetch: building the loader draws from the global RNG.
                set_rng_state(self.resume_rng)
                self.resume_rng = None
            images = [image.to(self.device, non_blocking=True) for image in images]
            targets = [_target_to(target, self.device) for target in targets]
            data_time = time.perf_counter() - tic
            rng_before = rng_state()
            # The forward updates BatchNorm running statistics: kept so that a stop saves the state before it.
            buffers_before = [b.detach().clone() for b in self.buffers]

            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                losses = self.ddp_model(images, targets)
            total = sum(losses.values())
            if not all_true(torch.isfinite(total)):
                bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v).all()}
                where = ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else "a loss on another process"
                self._stop(iteration, f"non-finite loss ({where})", rng_before, buffers_before)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            grad_norm = None
            if cfg.solver.clip_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.solver.clip_grad_norm)
            if not self.scaler.is_enabled():
                # (fp16's grad scaler skips steps with non-finite gradients by itself and lowers its scale.)
                if grad_norm is None:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
                if not all_true(torch.isfinite(grad_norm)):
                    self._stop(iteration, f"non-finite gradient (norm {float(grad_norm)}) of a finite loss "
                                          f"({float(total.detach()):.4g})", rng_before, buffers_before)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)

            done = iteration + 1
            window.add(total, losses, data_time, time.perf_counter() - tic)
            bar.update()
            if done % cfg.train.log_period == 0 or done == max_iter:
                self._log(done, window, lr, bar)
                window = _Window()
            if done % cfg.train.checkpoint_period == 0 and done < max_iter:
                self._save(f"model_{done:07d}.pth", done)
            if cfg.train.eval_period > 0 and done % cfg.train.eval_period == 0 and done < max_iter:
                self._evaluate(done)

    def _log(self, iteration: int, window: "_Window", lr: float, bar: tqdm) -> None:
        """Average the window over processes; rank 0 appends the record and redraws the curve."""
        record = {"iteration": iteration, **all_reduce_mean(window.means()), "lr": lr}
        self.last_record = record
        if self.logger is not None:
            self.logger.log(record)
            now = time.perf_counter()
            if now - self.last_plot >= PLOT_INTERVAL_S or iteration == self.cfg.solver.max_iter:
                self.logger.plot()
                self.last_plot = now
            bar.set_postfix(loss=f"{record['total_loss']:.4f}", lr=f"{lr:.3g}", refresh=False)

    def _save(self, name: str, iteration: int, rng: Optional[dict] = None, update_last: bool = True) -> None:
        """Every process hands in its RNG states; rank 0 writes the checkpoint."""
        rng = rng if rng is not None else rng_state()
        by_rank = all_gather_object(rng)
        if is_main_process():
            extra = {"rng_by_rank": by_rank} if self.world_size > 1 else {}
            extra["label_to_cat_id"] = dict(self.dataset.label_to_cat_id)
            save_checkpoint(self.output_dir / name, model=self.model, ema=self.ema, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, iteration=iteration, config=self.cfg,
                            class_names=self.class_names, rng=rng, update_last=update_last, **extra)

    def _evaluate(self, iteration: int) -> None:
        """COCO evaluation of the weight average (the model without one) on the validation set, shared by all
        processes; rank 0 logs the metrics."""
        precision = "bf16" if self.precision.precision == "bf16" else "fp32"
        model = self.ema.module if self.ema is not None else self.model
        metrics = evaluate(model, self.cfg.data.val_ann, self.cfg.data.val_images,
                           output_dir=self.output_dir / f"eval_{iteration:07d}" if is_main_process() else None,
                           device=self.device, precision=precision, class_names=self.class_names,
                           label_to_cat_id=self.dataset.label_to_cat_id)
        if metrics is not None:
            self.last_eval = metrics
            self.logger.log({"iteration": iteration, **metrics})

    def _stop(self, iteration: int, what: str, rng_before: dict, buffers_before: List[Tensor]) -> None:
        """Put back the buffers this iteration's forward changed, save that state (the one before the
        iteration) under a name of its own, and raise FloatingPointError saying ``what`` went wrong.

        No optimizer step has been taken, so parameters, weight average, optimizer and schedule are still those
        of the iteration before; the last good checkpoint and ``last_checkpoint`` are left as they are.
        """
        with torch.no_grad():
            for buffer, before in zip(self.buffers, buffers_before):
                buffer.copy_(before)
        self.optimizer.zero_grad(set_to_none=True)
        name = f"stopped_before_iteration_{iteration + 1:07d}.pth"
        self._save(name, iteration, rng=rng_before, update_last=False)
        if self.logger is not None:
            self.logger.plot()
        barrier()
        last = find_last_checkpoint(self.output_dir)
        kept = f"the last good checkpoint {last} is unchanged" if last is not None else "no earlier checkpoint"
        raise FloatingPointError(
            f"{what} at iteration {iteration + 1}; training stopped. The state before this iteration is saved "
            f"as {self.output_dir / name} and {kept}; lower solver.lr or set solver.clip_grad_norm and resume")


class _Window:
    """Running sums since the last log step; loss sums stay on the device (no host sync per iteration)."""

    def __init__(self):
        self.names: List[str] = []
        self.loss_sum: Optional[Tensor] = None
        self.data_time = 0.0
        self.time = 0.0
        self.count = 0

    def add(self, total: Tensor, losses: Dict[str, Tensor], data_time: float, iter_time: float) -> None:
        values = torch.stack([total.detach()] + [v.detach() for v in losses.values()]).float()
        if self.loss_sum is None:
            self.names = ["total_loss", *losses]
            self.loss_sum = values
        else:
            self.loss_sum += values
        self.data_time += data_time
        self.time += iter_time
        self.count += 1

    def means(self) -> Dict[str, Tensor | float]:
        means = dict(zip(self.names, self.loss_sum / self.count))
        return {**means, "time": self.time / self.count, "data_time": self.data_time / self.count}


def _resolve_device(name: str) -> torch.device:
    """``train.device`` ("auto", "cpu" or "cuda") as a device type; ValueError for CUDA without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"train.device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def _amp_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None for fp32); ValueError where the device lacks it."""
    if precision == "fp16" and device.type != "cuda":
        raise InputError("train.precision=fp16 needs CUDA (it relies on a CUDA grad scaler); use bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("train.precision=bf16 is not supported by this GPU; use fp16")
    return _PRECISIONS[precision]


def _seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _target_to(target: Dict, device: torch.device) -> Dict:
    """A target dict with its tensors and masks on ``device`` (other entries as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else
            v.to(device) if isinstance(v, (BitMasks, PolygonMasks)) else v
            for k, v in target.items()}
