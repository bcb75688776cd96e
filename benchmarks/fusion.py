"""The fused inference convolutions against the plain operators, on one model and the same images in one process.

    python -m benchmarks.fusion                      # R50-FPN, 800 x 1200 images; fp32, and bf16 where native
    python -m benchmarks.fusion --mode both --repeats 7

In inference a convolution's ReLU, and each residual block's sum, run inside oneDNN's convolution
(:mod:`maskrcnn.modeling.layers`). This times the backbone + FPN and the whole image with those fused
convolutions allowed and forbidden (:func:`~maskrcnn.modeling.layers.fused_convolutions`), alternating
within each round after a warm-up round, and prints each median with its min and max and the ratio plain /
fused, and how closely each path's detections agree with the plain float32 ones
(:func:`~benchmarks.speed.compare_detections`): in float32 the fused operators do the same arithmetic,
rounded in another order at some sizes; in bf16 both paths round, and the two columns show whether fusing
rounds worse.
"""

import argparse
import statistics
from typing import Dict, List

import torch
from torch import Tensor

from maskrcnn.cli import run
from maskrcnn.modeling.layers import fused_convolutions
from maskrcnn.modeling.maskrcnn import MaskRCNN, prepare_for_inference
from maskrcnn.precision import machine_summary
from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model

from .speed import (MODES, _autocast, _interleaved_times, choose_modes, compare_detections, inference_config,
                    machine_line)

PARTS = ("backbone_fpn", "e2e")


def measure(model: MaskRCNN, images: List[Tensor], *, mode: str, repeats: int) -> Dict[str, object]:
    """Seconds of each part with and without the fused convolutions (``{part}_{fused|plain}_s``: median,
    ``..._min_s`` and ``..._max_s``), ``{part}_ratio`` (plain / fused), and ``{fused|plain}_same_label``,
    ``..._min_box_iou`` and ``..._mean_mask_iou`` of each path's detections against the plain float32 path's.

    model: an inference model (:func:`~maskrcnn.modeling.maskrcnn.prepare_for_inference`); images: (3, H, W)
    floats in 0-1; mode: "fp32" or "bf16" (autocast)."""
    device = images[0].device
    with torch.no_grad():
        batch = model.preprocess(images, resize=True).tensor
    parts = {"backbone_fpn": lambda: model.fpn(model.backbone(batch)), "e2e": lambda: model(images)}

    def timed(part: str, enabled: bool):
        def forward():
            with torch.no_grad(), _autocast(device, mode), fused_convolutions(enabled):
                return parts[part]()
        return forward

    runs = {f"{part}_{kind}": timed(part, kind == "fused") for part in PARTS for kind in ("fused", "plain")}
    times = _interleaved_times(runs, repeats + 1, torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    figures: Dict[str, object] = {}
    for name, seconds in times.items():
        seconds = seconds[1:]  # the first round warms up
        figures.update({f"{name}_s": statistics.median(seconds), f"{name}_min_s": min(seconds),
                        f"{name}_max_s": max(seconds)})
    for part in PARTS:
        figures[f"{part}_ratio"] = figures[f"{part}_plain_s"] / figures[f"{part}_fused_s"]
    with torch.no_grad(), fused_convolutions(False):
        reference = model(images)
    for kind in ("fused", "plain"):
        check = compare_detections(runs[f"e2e_{kind}"](), reference)
        figures.update({f"{kind}_{key}": check[key] for key in ("same_label", "min_box_iou", "mean_mask_iou")})
    return figures


def format_report(figures: Dict[str, object], modes, header: str) -> str:
    lines = [header, "milliseconds per batch; ratio = plain / fused",
             f"{'':16s}{'fused ms (min-max)':>24s}{'plain ms (min-max)':>24s}{'ratio':>8s}"]
    for mode in modes:
        lines.append(f"{mode}, detections against the plain fp32 ones:")
        for kind in ("fused", "plain"):
            lines.append(f"  {kind}: {100 * figures[f'{mode}_{kind}_same_label']:.1f}% with equal labels, worst box IoU "
                         f"{figures[f'{mode}_{kind}_min_box_iou']:.4f}, mean mask IoU "
                         f"{figures[f'{mode}_{kind}_mean_mask_iou']:.4f}")
        for part in PARTS:
            cells = [f"{1e3 * figures[f'{mode}_{part}_{kind}_s']:.0f} ({1e3 * figures[f'{mode}_{part}_{kind}_min_s']:.0f}-"
                     f"{1e3 * figures[f'{mode}_{part}_{kind}_max_s']:.0f})" for kind in ("fused", "plain")]
            lines.append(f"  {part:14s}{cells[0]:>24s}{cells[1]:>24s}{figures[f'{mode}_{part}_ratio']:8.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="auto", choices=[*MODES, "both", "auto"],
                        help="precision(s) to measure; auto: bf16 too only where the CPU computes it natively")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up round")
    parser.add_argument("--size", type=int, default=800, help="images are SIZE x 1.5 SIZE pixels")
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    args = parser.parse_args(argv)
    modes, why = choose_modes(args.mode, "cpu")
    cfg = inference_config(args.size, 100)
    model = prepare_for_inference(our_model_from(well_conditioned_torchvision_model(cfg), cfg))
    images = sample_images(args.size, torch.device("cpu"), count=args.images)
    figures: Dict[str, object] = {}
    for mode in modes:
        figures.update({f"{mode}_{key}": value for key, value in measure(model, images, mode=mode,
                                                                         repeats=args.repeats).items()})
    height, width = images[0].shape[-2:]
    header = (f"{machine_line(machine_summary())}\nR50-FPN, {args.images} images of {height}x{width}, "
              f"medians of {args.repeats} interleaved rounds; measuring {why}")
    print(format_report(figures, modes, header))


if __name__ == "__main__":
    run(main)
