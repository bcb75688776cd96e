"""Speed of the exported model in onnxruntime and OpenVINO against eager PyTorch, on the same image in one
process.

The model is the default R50-FPN at the benchmark's inference configuration (score threshold 0, a fixed
number of detections per image, so that the mask path is fully loaded), with the well-conditioned
seeded random weights of :func:`~maskrcnn.reference.well_conditioned_torchvision_model` (nothing is
downloaded). It is exported once with :func:`~maskrcnn.deploy.export.export_onnx`.

Each variant runs image in, :class:`~maskrcnn.structures.Instances` with pasted bitmap masks out:
eager fp32 and bf16 (the predictor's :func:`~maskrcnn.modeling.maskrcnn.prepare_for_inference` model,
bf16 under autocast), onnxruntime fp32, OpenVINO f32 and bf16, and OpenVINO with the backbone and FPN
quantised to int8 (:func:`~maskrcnn.deploy.quantize.quantize_int8`, calibrated on
``CALIBRATION_IMAGES`` other generated images; its accuracy is ``python -m benchmarks.int8_report``'s). The variants alternate within each
round, so that load from other processes weighs on all alike; each reports the median, minimum and
maximum over the rounds, and the exported ones also the network alone (the graph call, without the
Python resize, padding, rescale and paste around it). Detections are not compared here: at score
threshold 0 this model's best scores sit at 1.0 within float rounding, so their order is decided by
round-off even between two eager runs; parity is what ``tests/test_deploy.py`` checks, on a model whose
scores are apart.
"""

from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from maskrcnn.deploy.export import INPUT_NAMES, export_onnx
from maskrcnn.deploy.quantize import quantize_int8
from maskrcnn.deploy.runtime import ExportedPredictor
from maskrcnn.inference import detect
from maskrcnn.modeling.maskrcnn import prepare_for_inference
from maskrcnn.precision import machine_summary
from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model

from .speed import MODES, inference_config, machine_line

VARIANTS = ("eager fp32", "eager bf16", "onnxruntime fp32", "openvino f32", "openvino bf16", "openvino int8")
BF16_VARIANTS = ("eager bf16", "openvino bf16")
# Calibration images of the int8 variant: other images of the same generator than the timed one.
CALIBRATION_IMAGES = 4


def deploy_variants(modes: Sequence[str] = MODES) -> Tuple[str, ...]:
    """The variants measured for precisions ``modes`` (see :func:`benchmarks.speed.choose_modes`): the bf16
    ones only when "bf16" is among them; int8 runs its other layers in f32 and counts as fp32."""
    return tuple(v for v in VARIANTS if v not in BF16_VARIANTS or "bf16" in modes)


def run_deploy_benchmark(*, size: int = 800, detections: int = 100, repeats: int = 5, modes: Sequence[str] = MODES,
                         progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Figures per variant of :func:`deploy_variants` (``modes``): ``{variant}`` -> dict of ``median_s``,
    ``min_s``, ``max_s`` and (exported variants) ``network_median_s``; ``onnxruntime_op_shares``: the share
    of onnxruntime's kernel time per operator type (the five largest); plus ``variants``, ``image`` (h, w),
    ``detections``, ``threads``, ``repeats`` and where the figures hold (``cpu``, ``isa``, ``native_bf16``,
    ``bf16_reason``, ``torch``: :func:`maskrcnn.precision.machine_summary`)."""
    variants = deploy_variants(modes)
    cfg = inference_config(size, detections)
    progress("building the model")
    model = our_model_from(well_conditioned_torchvision_model(cfg), cfg).eval()
    class_names = [f"class {k}" for k in range(1, cfg.roi_heads.num_classes + 1)]
    image = sample_images(size, torch.device("cpu"))[0]
    fast = prepare_for_inference(model)
    batch = model.preprocess([image], resize=True)
    network_input = (batch.tensor.numpy(), np.asarray(batch.image_sizes, dtype=np.int64))
    with tempfile.TemporaryDirectory() as folder:
        progress("exporting to ONNX")
        path = export_onnx(model, Path(folder) / "model.onnx", class_names=class_names)
        progress("profiling onnxruntime")
        op_shares = onnxruntime_op_shares(path, network_input, Path(folder))
        progress("quantising to int8")
        calibration = sample_images(size, torch.device("cpu"), count=CALIBRATION_IMAGES, seed=1)
        int8_path = quantize_int8(path, calibration, Path(folder) / "model.int8.xml")
        exported = {"onnxruntime fp32": (path, "onnxruntime", "fp32"), "openvino f32": (path, "openvino", "fp32"),
                    "openvino bf16": (path, "openvino", "bf16"), "openvino int8": (int8_path, "openvino", "fp32")}
        predictors = {name: ExportedPredictor(file, runtime=runtime, precision=precision)
                      for name, (file, runtime, precision) in exported.items() if name in variants}
    eager = {"eager fp32": lambda: detect(fast, [image], class_names=class_names, precision="fp32")[0],
             "eager bf16": lambda: detect(fast, [image], class_names=class_names, precision="bf16")[0]}
    runs = {
        **{name: run for name, run in eager.items() if name in variants},
        **{name: (lambda p=p: p.detect([image])[0]) for name, p in predictors.items()},
        **{f"{name} network": (lambda p=p: p.run_network(*network_input)) for name, p in predictors.items()},
    }
    progress("warm-up")
    for run in runs.values():
        run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for round_index in range(repeats):
        progress(f"round {round_index + 1}/{repeats}")
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    figures: Dict[str, object] = {"variants": list(variants), "image": [int(image.shape[1]), int(image.shape[2])],
                                  "detections": detections, "repeats": repeats, "onnxruntime_op_shares": op_shares,
                                  **machine_summary()}
    for name in variants:
        entry = {"median_s": statistics.median(times[name]), "min_s": min(times[name]), "max_s": max(times[name])}
        if name in predictors:
            entry["network_median_s"] = statistics.median(times[f"{name} network"])
        figures[name] = entry
    return figures


def onnxruntime_op_shares(path: Path, network_input: tuple, folder: Path, top: int = 5) -> Dict[str, float]:
    """Share of onnxruntime's kernel time per operator type over one profiled run (after one warm-up), the
    ``top`` largest."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "onnxruntime_profile")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = dict(zip(INPUT_NAMES, network_input))
    session.run(None, feed)
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Dict[str, float] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: per_op[op] / total for op, _ in per_op.most_common(top)}


def format_deploy_report(figures: Dict[str, object]) -> str:
    """A Markdown table of :func:`run_deploy_benchmark`'s figures, ratios against eager fp32."""
    h, w = figures["image"]
    base = figures["eager fp32"]["median_s"]
    lines = [machine_line(figures),
             f"One {w}x{h} image, {figures['detections']} detections, {figures['threads']} threads, "
             f"median (min-max) of {figures['repeats']} rounds",
             "",
             "| variant | seconds per image | speed vs eager fp32 | exported graph alone (s) |",
             "| --- | --- | --- | --- |"]
    for name in figures["variants"]:
        f = figures[name]
        network = f"{f['network_median_s']:.2f}" if "network_median_s" in f else "-"
        lines.append(f"| {name} | {f['median_s']:.2f} ({f['min_s']:.2f}-{f['max_s']:.2f}) | "
                     f"{base / f['median_s']:.2f}x | {network} |")
    shares = ", ".join(f"{op} {share:.0%}" for op, share in figures["onnxruntime_op_shares"].items())
    lines += ["", f"onnxruntime kernel time by operator: {shares}"]
    return "\n".join(lines)
