"""Speed of the exported model in onnxruntime and OpenVINO against eager PyTorch, on the same image in one
process.

The model is the default R50-FPN at the benchmark's inference configuration (score threshold 0, a fixed
number of detections per image, so that the mask path is fully loaded), with the well-conditioned
seeded random weights of :func:`~maskrcnn.reference.well_conditioned_torchvision_model` (nothing is
downloaded). It is exported once with :func:`~maskrcnn.deploy.export.export_onnx`.

Each variant runs image in, :class:`~maskrcnn.structures.Instances` with pasted bitmap masks out:
eager fp32 and bf16 (the predictor's :func:`~maskrcnn.modeling.maskrcnn.prepare_for_inference` model,
bf16 under autocast), onnxruntime fp32, OpenVINO f32 and bf16. The variants alternate within each
round, so that load from other processes weighs on all alike; each reports the median, minimum and
maximum over the rounds, and the exported ones also the network alone (the graph call, without the
Python resize, padding, rescale and paste around it). ``agreement`` is the share of the eager fp32
run's top 90 detections that the variant reproduces (same label, box IoU > 0.99).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from torchvision.ops import box_iou

from ..deploy.export import export_onnx
from ..deploy.runtime import ExportedPredictor
from ..inference import detect
from ..modeling.maskrcnn import preprocess_images, prepare_for_inference
from ..reference import our_model_from, sample_images, well_conditioned_torchvision_model
from ..structures import Instances
from .benchmark import inference_config

VARIANTS = ("eager fp32", "eager bf16", "onnxruntime fp32", "openvino f32", "openvino bf16")


def agreement(expected: Instances, got: Instances, top: int = 90) -> float:
    """Share of ``expected``'s ``top`` best detections matched in ``got`` by label and box IoU > 0.99."""
    n = min(top, len(expected))
    if n == 0:
        return 1.0
    if len(got) == 0:
        return 0.0
    iou = box_iou(expected.boxes[:n], got.boxes)
    iou[expected.labels[:n, None] != got.labels[None]] = 0
    return float((iou.max(dim=1).values > 0.99).float().mean())


def run_deploy_benchmark(*, size: int = 800, detections: int = 100, repeats: int = 5,
                         progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Figures per variant: ``{variant}`` -> dict of ``median_s``, ``min_s``, ``max_s``, ``agreement`` and
    (exported variants) ``network_median_s``; plus ``image`` (h, w), ``detections`` and ``threads``."""
    cfg = inference_config(size, detections)
    progress("building the model")
    model = our_model_from(well_conditioned_torchvision_model(cfg), cfg).eval()
    class_names = [f"class {k}" for k in range(1, cfg.roi_heads.num_classes + 1)]
    image = sample_images(size, torch.device("cpu"))[0]
    fast = prepare_for_inference(model)
    with tempfile.TemporaryDirectory() as folder:
        progress("exporting to ONNX")
        path = export_onnx(model, Path(folder) / "model.onnx", class_names=class_names)
        predictors = {"onnxruntime fp32": ExportedPredictor(path, runtime="onnxruntime"),
                      "openvino f32": ExportedPredictor(path, runtime="openvino", precision="fp32"),
                      "openvino bf16": ExportedPredictor(path, runtime="openvino", precision="bf16")}
    runs = {
        "eager fp32": lambda: detect(fast, [image], class_names=class_names)[0],
        "eager bf16": lambda: detect(fast, [image], class_names=class_names, precision="bf16")[0],
        **{name: (lambda p=p: p.detect([image])[0]) for name, p in predictors.items()},
    }
    meta = predictors["onnxruntime fp32"].metadata
    batch = preprocess_images([image], pixel_mean=predictors["onnxruntime fp32"].pixel_mean,
                              pixel_std=predictors["onnxruntime fp32"].pixel_std, min_size=meta["min_size"],
                              max_size=meta["max_size"], size_divisible=meta["size_divisible"])
    network_input = (batch.tensor.numpy(), np.asarray(batch.image_sizes, dtype=np.int64))
    network_runs = {name: (lambda p=p: p.run_network(*network_input)) for name, p in predictors.items()}

    progress("warm-up")
    results = {name: run() for name, run in runs.items()}
    times: Dict[str, List[float]] = {name: [] for name in (*runs, *(f"{n} network" for n in network_runs))}
    for round_index in range(repeats):
        progress(f"round {round_index + 1}/{repeats}")
        for name, run in [*runs.items(), *((f"{n} network", r) for n, r in network_runs.items())]:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    figures: Dict[str, object] = {"image": [int(image.shape[1]), int(image.shape[2])], "detections": detections,
                                  "threads": torch.get_num_threads(), "repeats": repeats}
    for name in runs:
        entry = {"median_s": statistics.median(times[name]), "min_s": min(times[name]), "max_s": max(times[name]),
                 "agreement": agreement(results["eager fp32"], results[name])}
        if name in network_runs:
            entry["network_median_s"] = statistics.median(times[f"{name} network"])
        figures[name] = entry
    return figures


def format_deploy_report(figures: Dict[str, object]) -> str:
    """A Markdown table of :func:`run_deploy_benchmark`'s figures, ratios against eager fp32."""
    h, w = figures["image"]
    base = figures["eager fp32"]["median_s"]
    lines = [f"One {w}x{h} image, {figures['detections']} detections, {figures['threads']} threads, "
             f"median (min-max) of {figures['repeats']} rounds",
             "",
             "| variant | seconds | speed vs eager fp32 | network alone (s) | top-90 agreement with eager fp32 |",
             "| --- | --- | --- | --- | --- |"]
    for name in VARIANTS:
        f = figures[name]
        network = f"{f['network_median_s']:.2f}" if "network_median_s" in f else "-"
        lines.append(f"| {name} | {f['median_s']:.2f} ({f['min_s']:.2f}-{f['max_s']:.2f}) | "
                     f"{base / f['median_s']:.2f}x | {network} | {f['agreement']:.2f} |")
    return "\n".join(lines)
