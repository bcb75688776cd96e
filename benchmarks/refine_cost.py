"""What the point head (``model.roi_heads.mask_refine``) costs: the same model with the plain and with the refined
mask head, inference end to end and a training step, side by side in one process.

    python -m benchmarks.refine_cost                  # 800 x 1200, 100 detections; fp32, and bf16 where native
    python -m benchmarks.refine_cost --quick --mode fp32 --json
    python -m benchmarks.refine_cost --threads 1       # steadier where other processes share the cores

Inference: the R50-FPN of the default configuration with the well-conditioned random weights of
:mod:`benchmarks.speed` (every image yields its ``--detections`` detections at score threshold 0), and the same
model with a point head added (its own seeded initialisation; what it computes does not depend on its values),
both in :func:`~maskrcnn.modeling.maskrcnn.prepare_for_inference` form. Timed: ``model(images)`` (masks pasted to
bool, as a caller gets them) and the mask stage alone (``roi_heads.mask_probs`` on fixed features and detections:
the mask head, plus the subdivision for the refined model). Training: one step (forward, backward, SGD step) of
the R50-FPN at 512 px on 2 images and of the small demo configuration at its own size and batch, plain and refined
from the same weights on the same batch of shapes images (:func:`benchmarks.speed.training_step`). Each pair runs
alternately, ``repeats`` times after a warm-up, so that load from other processes weighs on both; ``extra`` is
refined / plain - 1 per round, given as the median with the smallest and largest round, and ``best`` compares the
fastest rounds. Where other processes share the cores, ``--threads 1`` keeps one waiting thread from stalling the
other at every operation (on this repository's shared 2-core machine two threads spread the rounds over 2x).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from maskrcnn.cli import run
from maskrcnn.config import ModelConfig, load_config
from maskrcnn.modeling.maskrcnn import MaskRCNN, build_model, prepare_for_inference
from maskrcnn.modeling.selection import to_rois
from maskrcnn.precision import channels_last_is_faster, machine_summary
from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model

from .speed import (MODES, _autocast, _interleaved_times, choose_modes, inference_config, machine_line,
                    model_config, training_batch, training_step)

VARIANTS = ("plain", "refined")


def refined_twin(model: MaskRCNN, cfg: ModelConfig, seed: int = 0) -> MaskRCNN:
    """``model`` (built from ``cfg``) with a point head: the same weights, the point head's seeded from ``seed``."""
    cfg = copy.deepcopy(cfg)
    cfg.roi_heads.mask_refine = True
    torch.manual_seed(seed)
    twin = build_model(cfg)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(key.startswith("roi_heads.point_head.") for key in missing):
        raise RuntimeError(f"the refined model differs from the plain one beyond its point head: {missing}, "
                           f"{unexpected}")
    return twin.train(model.training)


def spread(times: Dict[str, List[float]], prefix: str) -> Dict[str, float]:
    """Figures of interleaved ``plain`` and ``refined`` times (seconds per round): ``{prefix}_{variant}_s`` (median),
    ``_min_s``, ``_max_s``; ``{prefix}_extra`` (median of refined / plain - 1 over the rounds), ``_extra_min``,
    ``_extra_max``, and ``_extra_best`` (the fastest refined round over the fastest plain one, - 1: on a machine
    that other work slows now and then, the figure least touched by it)."""
    out = {}
    for name in VARIANTS:
        out.update({f"{prefix}_{name}_s": statistics.median(times[name]), f"{prefix}_{name}_min_s": min(times[name]),
                    f"{prefix}_{name}_max_s": max(times[name])})
    extra = [r / p - 1 for p, r in zip(times["plain"], times["refined"])]
    out.update({f"{prefix}_extra": statistics.median(extra), f"{prefix}_extra_min": min(extra),
                f"{prefix}_extra_max": max(extra),
                f"{prefix}_extra_best": min(times["refined"]) / min(times["plain"]) - 1})
    return out


def inference_cost(*, size: int, detections: int, mode: str, repeats: int) -> Dict[str, float]:
    """End-to-end (``e2e_*``) and mask-stage (``mask_*``) figures of :func:`spread` for one precision ``mode``, one
    image of ``size`` x ``1.5 size`` pixels, plus ``detections`` (what the image yielded) and ``refined_side``."""
    cfg = inference_config(size, detections)
    plain = our_model_from(well_conditioned_torchvision_model(cfg), cfg).eval()
    models = {"plain": prepare_for_inference(plain), "refined": prepare_for_inference(refined_twin(plain, cfg))}
    images = sample_images(size, torch.device("cpu"))
    with torch.no_grad(), _autocast(torch.device("cpu"), mode):
        heads = models["plain"].roi_heads
        batch = models["plain"].preprocess(images, resize=True)
        features = heads.box_pooler.in_read_layout(models["plain"].extract_features(batch))
        found = heads.detect_boxes(features, models["plain"].propose(batch, features)[0], batch.image_sizes)
    rois, labels = to_rois([d["boxes"] for d in found]), torch.cat([d["labels"] for d in found])

    def end_to_end(model: MaskRCNN) -> Callable[[], object]:
        def call():
            with torch.no_grad(), _autocast(torch.device("cpu"), mode):
                return model(images)
        return call

    def mask_stage(model: MaskRCNN) -> Callable[[], object]:
        def call():
            with torch.no_grad(), _autocast(torch.device("cpu"), mode):
                return model.roi_heads.mask_probs(features, rois, labels)
        return call

    figures: Dict[str, float] = {"detections": len(labels), "refined_side": models["refined"].roi_heads.mask_side}
    for prefix, runner in (("e2e", end_to_end), ("mask", mask_stage)):
        runs = {name: runner(model) for name, model in models.items()}
        _interleaved_times(runs, 1, lambda: None)  # warm-up
        figures.update(spread(_interleaved_times(runs, repeats, lambda: None), prefix))
    return figures


def train_step_cost(cfg: ModelConfig, *, num_images: int, mode: str, repeats: int, seed: int = 0) -> Dict[str, float]:
    """:func:`spread` figures (prefix ``step``) of one training step of the model of ``cfg``, plain and refined from
    the same seeded weights, on one batch of ``num_images`` shapes images at input size ``cfg.input.min_size[-1]``,
    in the layout the trainer picks."""
    device = torch.device("cpu")
    torch.manual_seed(seed)
    plain = build_model(cfg).train()
    models = {"plain": plain, "refined": refined_twin(plain, cfg, seed)}
    if channels_last_is_faster(device)[0]:
        for model in models.values():
            model.to(memory_format=torch.channels_last)
    images, targets, _ = training_batch(num_images, cfg.input.min_size[-1], cfg.input.max_size, device, seed)

    runs = {name: training_step(model, images, targets, mode=mode, device=device) for name, model in models.items()}
    _interleaved_times(runs, 1, lambda: None)
    return spread(_interleaved_times(runs, repeats, lambda: None), "step")


def training_models(small_config: str) -> Dict[str, Tuple[ModelConfig, int]]:
    """The training steps measured: name -> (model configuration, images per step). ``r50``: the default R50-FPN at
    512 px, 2 images; ``small``: the model of ``small_config`` as it trains (its size, ``solver.ims_per_batch``)."""
    r50 = model_config()
    r50.input.min_size = [512]
    small = load_config(small_config)
    return {"r50": (r50, 2), "small": (small.model, small.solver.ims_per_batch)}


def run_refine_cost(*, modes: Sequence[str], quick: bool = False, size: int = 800, detections: int = 100,
                    train_config: str = "configs/maskrcnn_R18_FPN_small.yaml",
                    progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Every figure, as one flat dict: per mode m, ``{m}_e2e_*`` and ``{m}_mask_*`` (:func:`inference_cost`) and
    ``{m}_train_{r50|small}_step_*`` (:func:`train_step_cost`), with the machine (:func:`machine_summary`),
    ``repeats``, ``image_size`` and the requested ``detections``. quick: 3 rounds instead of 7."""
    repeats = 3 if quick else 7
    figures: Dict[str, object] = {**machine_summary("cpu"), "repeats": repeats,
                                  "image_size": f"{size}x{size * 3 // 2}", "detections": detections}
    for mode in modes:
        progress(f"inference, {mode}")
        result = inference_cost(size=size, detections=detections, mode=mode, repeats=repeats)
        figures.update({f"{mode}_{key}": value for key, value in result.items()})
        for name, (cfg, num_images) in training_models(train_config).items():
            progress(f"training step, {name}, {mode}")
            result = train_step_cost(cfg, num_images=num_images, mode=mode, repeats=repeats)
            figures.update({f"{mode}_train_{name}_{key}": value for key, value in result.items()})
    return figures


def format_cost(figures: Dict[str, object]) -> str:
    """The figures of :func:`run_refine_cost` as a table: seconds plain and refined, and the refined head's extra."""
    lines = [machine_line(figures), f"medians of {figures['repeats']} alternating rounds (min-max); extra = refined / "
             f"plain - 1 per round, its median (min to max); best = fastest refined / fastest plain - 1"]
    for mode in (m for m in MODES if f"{m}_e2e_extra" in figures):
        f = {key[len(mode) + 1:]: value for key, value in figures.items() if key.startswith(mode + "_")}
        lines += ["", f"{mode}: inference of one {figures['image_size']} image, {f['detections']} detections, R50-FPN; "
                      f"refined masks {f['refined_side']}x{f['refined_side']}",
                  f"  {'':<26} {'plain s':>18} {'refined s':>18} {'extra':>25} {'best':>7}"]
        rows = [("end to end", "e2e"), ("mask stage", "mask"), ("training step, R50 512 px", "train_r50_step"),
                ("training step, small", "train_small_step")]
        for label, key in rows:
            cells = [f"{f[f'{key}_{name}_s']:.3f} ({f[f'{key}_{name}_min_s']:.2f}-{f[f'{key}_{name}_max_s']:.2f})"
                     for name in VARIANTS]
            lines.append(f"  {label:<26} {cells[0]:>18} {cells[1]:>18} {f[f'{key}_extra']:+7.1%} "
                         f"({f[f'{key}_extra_min']:+.0%} to {f[f'{key}_extra_max']:+.0%}) "
                         f"{f[f'{key}_extra_best']:+7.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="auto", choices=[*MODES, "both", "auto"],
                        help="precision(s); auto: bf16 too only where the CPU computes it natively")
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON line")
    parser.add_argument("--size", type=int, default=800, help="the inference image is SIZE x 1.5 SIZE pixels")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (score threshold 0)")
    parser.add_argument("--train-config", default="configs/maskrcnn_R18_FPN_small.yaml",
                        help="YAML of the small model whose training step is measured")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                        "steadier on a machine other work loads)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes, why = choose_modes(args.mode)
    print(f"[refine_cost] measuring {why}", file=sys.stderr, flush=True)
    figures = run_refine_cost(modes=modes, quick=args.quick, size=args.size, detections=args.detections,
                              train_config=args.train_config,
                              progress=lambda message: print(f"[refine_cost] {message}", file=sys.stderr, flush=True))
    print(json.dumps(figures) if args.json else format_cost(figures))


if __name__ == "__main__":
    run(main)
