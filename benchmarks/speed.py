"""Speed and memory of this Mask R-CNN against torchvision's, measured side by side in one process.

Both models carry the same weights: torchvision's model is built from torchvision's own classes at the
configuration's architecture with seeded random weights (nothing is downloaded), and ours is loaded from
it through :func:`maskrcnn.convert.convert_torchvision_state_dict`. For inference the random weights are
conditioned (:func:`well_conditioned_torchvision_model`) so that the detections are decided by clear
margins and every image yields the full set of detections, which loads the mask path completely.

Timings alternate between the two models run by run and report medians, so that load from other
processes on the machine weighs on both alike; ratios are torchvision time / our time (above 1: ours is
faster). Inference is split into stages (preprocess, backbone+FPN, RPN, box head with detection
selection, mask head, postprocess = box rescale + mask paste), each timed by running the models'
own components in the order their forward runs them; ``e2e`` is a plain ``model(images)`` call. A
training step is forward + backward + optimizer step on a fixed synthetic batch of shapes images.

Compute floor: the multiply-adds of each stage's convolutions and matrix products (counted by
``torch.utils.flop_counter``, 2 FLOPs each) divided by the device's peak throughput, measured on the
commonest heavy convolution of the model (:func:`conv_peak_gflops`). Inference counts ours, which does
torchvision's arithmetic but for outputs it skips (the background class's box deltas, the mask logits of
undetected classes); a training step counts torchvision's, of which ours skips a larger part (the mask
predictor's other classes, the RPN head's backward pass outside the sampled anchors). No implementation
doing that arithmetic at that throughput takes less time, so torchvision time / floor (``ceiling``) is the
largest speedup reachable without changing the arithmetic; a training step, whose arithmetic ours changes,
can pass it.

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` above the memory held before the call;
on CPU the peak resident set size above the resident size before the call (sampled every millisecond
by a background thread, after returning freed heap memory to the system).

Precision modes: ``fp32``, and ``bf16``: torchvision under ``torch.autocast(bfloat16)`` with
channels-last weights and inputs (its best CPU setting), ours under the same autocast, in
:func:`~maskrcnn.modeling.maskrcnn.prepare_for_inference` form for inference and with channels-last
weights (as the trainer runs it) for training.
"""

from __future__ import annotations

import ctypes
import copy
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image
from torchvision.ops import FrozenBatchNorm2d, box_iou, masks_to_boxes

from maskrcnn.config import Config, ModelConfig, load_config
from maskrcnn.data.shapes import CATEGORIES, render_image
from maskrcnn.data.transforms import ResizeShortestEdge
from maskrcnn.modeling.maskrcnn import MaskRCNN, prepare_for_inference
from maskrcnn.modeling.paste import paste_masks_in_image
from maskrcnn.precision import channels_last_is_faster, device_bf16, machine_summary
from maskrcnn.reference import our_model_from, sample_images, torchvision_model, well_conditioned_torchvision_model
from maskrcnn.structures import BitMasks

STAGES = ("preprocess", "backbone_fpn", "rpn", "box_head", "mask_head", "postprocess")
MODES = ("fp32", "bf16")
PRECISION_IMAGES = 4  # images on which bf16 detections are compared with fp32 ones (compare_precisions)


def choose_modes(requested: str, device: str = "cpu") -> Tuple[Tuple[str, ...], str]:
    """(the precisions to measure, why) for ``--mode`` ``requested``: "auto" measures bf16 only where the
    device computes it natively (elsewhere it is emulated, several times slower, and nobody would run it),
    "both" forces fp32 and bf16, "fp32" or "bf16" one of them."""
    if requested == "both":
        return MODES, "fp32 and bf16, as asked"
    if requested in MODES:
        return (requested,), f"{requested}, as asked"
    if requested != "auto":
        raise ValueError(f"mode must be one of {(*MODES, 'both', 'auto')}, got {requested!r}")
    native, why = device_bf16(device)
    if native:
        return MODES, f"fp32 and bf16: {why}"
    return ("fp32",), f"fp32 only: {why}, so bf16 would be emulated (--mode both measures it anyway)"


# ---------------------------------------------------------------------------------------------------------
# Timing and memory


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class _StageClock:
    """Splits one run into named stages: ``lap(name)`` closes the stage that ran since the previous lap."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: Dict[str, float] = {}
        sync()
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now


def _interleaved_times(runs: Dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
                       ) -> Dict[str, List[float]]:
    """Seconds of each callable in each of ``repeats`` rounds, the callables alternating within a round."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def _interleaved_medians(runs: Dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
                         ) -> Dict[str, float]:
    """Median seconds of each callable over ``repeats`` interleaved rounds."""
    return {name: statistics.median(t) for name, t in _interleaved_times(runs, repeats, sync).items()}


def _fused_conv_flops(*shapes, out_shape, transposed: bool = False, **kwargs) -> int:
    """FLOPs of one of oneDNN's fused convolutions (see :mod:`maskrcnn.modeling.layers`), which torch's flop
    counter does not know: the same as the plain convolution's. Its tensor arguments (here their shapes)
    come first: the input (or the in-place sum's operand, of the same batch and size), then the weight."""
    tensors = [shape for shape in shapes[:3] if isinstance(shape, torch.Size) and len(shape) == 4]
    return conv_flop_count(tensors[0], tensors[-1], out_shape, transposed)


_FUSED_CONV_FLOPS = {
    torch.ops.mkldnn._convolution_pointwise: _fused_conv_flops,
    torch.ops.mkldnn._convolution_pointwise_: _fused_conv_flops,
    torch.ops.mkldnn._convolution_transpose_pointwise: lambda *shapes, **kwargs: _fused_conv_flops(
        *shapes, transposed=True, **kwargs),
}


class _FlopClock:
    """Like :class:`_StageClock`, but each lap records the GFLOP of convolutions and matrix products that
    ran since the previous lap (open it with ``with``)."""

    def __init__(self):
        self.counter = FlopCounterMode(display=False, custom_mapping=_FUSED_CONV_FLOPS)
        self.gflop: Dict[str, float] = {}
        self.last = 0

    def __enter__(self):
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        return self.counter.__exit__(*exc)

    def lap(self, name: str) -> None:
        total = self.counter.get_total_flops()
        self.gflop[name] = (total - self.last) / 1e9
        self.last = total


def conv_peak_gflops(device: torch.device, mode: str, repeats: int = 5) -> float:
    """GFLOP/s of a 3x3, 256 -> 256 channel convolution over a 100 x 152 map (an FPN level of an 800 x 1216
    input; the RPN, FPN and mask head run this shape of convolution), channels-last, in precision ``mode``:
    the best of ``repeats`` runs, as the device's peak for the model's arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 100, 152, generator=g).to(device, memory_format=torch.channels_last)
    w = (torch.randn(256, 256, 3, 3, generator=g) / 48).to(device, memory_format=torch.channels_last)
    sync = _synchronizer(device)

    def conv():
        with torch.no_grad(), _autocast(device, mode):
            torch.nn.functional.conv2d(x, w, padding=1)
    best = min(_interleaved_times({"conv": conv}, repeats + 1, sync)["conv"][1:])
    return 2 * 100 * 152 * 256 * 256 * 9 / best / 1e9


def _floor_figures(gflop: float, tv_s: float, peak: float) -> Dict[str, object]:
    """``gflop``, ``floor_s`` (the time of ``gflop`` at ``peak`` GFLOP/s) and ``ceiling`` (``tv_s`` / floor;
    None where the floor is under 1% of ``tv_s``: a stage that its arithmetic does not bound)."""
    floor = gflop / peak
    return {"gflop": gflop, "floor_s": floor, "ceiling": tv_s / floor if floor >= 0.01 * tv_s else None}


def compare_detections(ours: List[dict], theirs: List[dict]) -> Dict[str, float]:
    """How closely two models' detections of the same images agree.

    ours, theirs: per image ``boxes`` (D, 4), ``labels`` (D,) and ``masks`` (D, H, W) bool.
    Each of our detections is matched to the detection of the other model with the same label and the
    highest box IoU (near-tied scores may order the two lists differently). Returns ``detections`` (ours,
    compared), ``same_label`` (fraction with a same-label counterpart, and equal counts), ``min_box_iou``
    (worst IoU of matched boxes) and ``mean_mask_iou`` (mean IoU of their masks: near-duplicate boxes of
    one label, common at score threshold 0, may match the other's twin).
    """
    total, matched, box_ious, mask_ious = 0, 0, [], []
    for a, b in zip(ours, theirs):
        total += len(a["labels"])
        if not len(a["labels"]) or not len(b["labels"]):
            continue
        best, match = _best_matches(a, b)
        found = best >= 0
        matched += int(found.sum())
        box_ious.append(best[found])
        ma, mb = a["masks"].cpu()[found].flatten(1), b["masks"].cpu()[match[found]].flatten(1)
        mask_ious.append((ma & mb).sum(1) / (ma | mb).sum(1).clamp(min=1))
    same = matched / max(total, 1) if sum(len(a["labels"]) for a in ours) == sum(len(b["labels"]) for b in theirs) else 0.0
    box_ious = torch.cat(box_ious) if box_ious else torch.ones(0)
    mask_ious = torch.cat(mask_ious) if mask_ious else torch.ones(0)
    return {"detections": total, "same_label": same,
            "min_box_iou": float(box_ious.min()) if len(box_ious) else 1.0,
            "mean_mask_iou": float(mask_ious.mean()) if len(mask_ious) else 1.0}


def _release_free_heap() -> None:
    """Hand freed heap memory back to the system (glibc), so that resident size tracks live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


_PAGE_SIZE = 4096


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``run`` above what was held before it, in MiB (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not Path("/proc/self/statm").exists():
        return float("nan")
    _release_free_heap()
    before = _resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], _resident_bytes()) - before) / 2**20


def _autocast(device: torch.device, mode: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


# ---------------------------------------------------------------------------------------------------------
# Inference


def _our_stages(model: MaskRCNN, images: List[Tensor], clock: _StageClock) -> list:
    """Our eval forward, stage by stage: the stage methods ``MaskRCNN.forward`` calls, in its order."""
    batch = model.preprocess(images, resize=True)
    clock.lap("preprocess")
    features = model.extract_features(batch)
    clock.lap("backbone_fpn")
    proposals, _ = model.propose(batch, features)
    clock.lap("rpn")
    detections = model.roi_heads.detect_boxes(features, proposals, batch.image_sizes)
    clock.lap("box_head")
    detections = model.roi_heads.predict_masks(features, detections)
    clock.lap("mask_head")
    out = model.postprocess(detections, batch, images)
    clock.lap("postprocess")
    return out


def _torchvision_stages(model: tv_mask_rcnn.MaskRCNN, images: List[Tensor], clock: _StageClock) -> list:
    """torchvision's eval forward, stage by stage (the steps of ``GeneralizedRCNN.forward`` and
    ``RoIHeads.forward``)."""
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    image_list, _ = model.transform(images)
    clock.lap("preprocess")
    features = model.backbone(image_list.tensors)
    clock.lap("backbone_fpn")
    proposals, _ = model.rpn(image_list, features)
    clock.lap("rpn")
    heads = model.roi_heads
    x = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
    class_logits, box_regression = heads.box_predictor(x)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals,
                                                         image_list.image_sizes)
    clock.lap("box_head")
    x = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, image_list.image_sizes)))
    mask_probs = maskrcnn_inference(x, labels)
    clock.lap("mask_head")
    result = [{"boxes": b, "scores": s, "labels": l, "masks": m}
              for b, s, l, m in zip(boxes, scores, labels, mask_probs)]
    out = model.transform.postprocess(result, image_list.image_sizes, original_sizes)
    clock.lap("postprocess")
    return out


def _best_matches(a: dict, b: dict) -> Tuple[Tensor, Tensor]:
    """For each detection of ``a`` (``boxes`` (D, 4), ``labels`` (D,)), the highest box IoU with a detection
    of ``b`` of the same label (-1 where ``b`` has none) and that detection's index: two (D,) tensors.
    ``b`` holds at least one detection."""
    ious = box_iou(a["boxes"].float().cpu(), b["boxes"].float().cpu())
    ious[a["labels"].cpu()[:, None] != b["labels"].cpu()[None, :]] = -1
    return ious.max(dim=1)


def compare_precisions(model: MaskRCNN, images: List[Tensor], device: torch.device) -> Dict[str, float]:
    """Our model's detections in bf16 against its own in fp32 on the same images: whether bf16 finds the same
    objects with the same scores and masks.

    model: eval mode, in :func:`prepare_for_inference` form. Each fp32 detection is matched to the bf16
    detection of the same label with the highest box IoU. Where two overlapping boxes score within bf16's
    rounding of each other, NMS may keep one of them in fp32 and the other in bf16: a detection counts as
    found at box IoU above the NMS threshold (``roi_heads.nms_thresh``: the two would have suppressed one
    another), and as the same box at IoU >= 0.9. Returns ``detections`` (fp32), ``found`` and ``same_box``
    (fractions of them), and over the same-box pairs ``max_score_diff`` and ``mean_mask_diff`` (mean absolute
    difference of the S x S mask probabilities, before the paste).
    """
    outputs = {}
    for mode in MODES:
        with torch.no_grad(), _autocast(device, mode):
            outputs[mode] = model(images, mask_format="probs")
    total, found, score_diffs, mask_diffs = 0, 0, [], []
    for a, b in zip(outputs["fp32"], outputs["bf16"]):
        total += len(a["labels"])
        if not len(a["labels"]) or not len(b["labels"]):
            continue
        best, match = _best_matches(a, b)
        found += int((best > model.roi_heads.nms_thresh).sum())
        same = best >= 0.9
        score_diffs.append((a["scores"][same] - b["scores"][match[same]]).abs().cpu())
        mask_diffs.append((a["mask_probs"][same] - b["mask_probs"][match[same]]).abs().flatten(1).mean(1).cpu())
    score_diffs = torch.cat(score_diffs) if score_diffs else torch.zeros(0)
    mask_diffs = torch.cat(mask_diffs) if mask_diffs else torch.zeros(0)
    return {"detections": total, "found": found / max(total, 1), "same_box": len(score_diffs) / max(total, 1),
            "max_score_diff": float(score_diffs.max()) if len(score_diffs) else 0.0,
            "mean_mask_diff": float(mask_diffs.mean()) if len(mask_diffs) else 0.0}


def model_config(architecture: str | Path | None = None) -> ModelConfig:
    """The model configuration of the YAML file ``architecture`` (None: the defaults, torchvision's v1
    R50-FPN), with the ImageNet trunk download switched off (the benchmark's weights are random)."""
    cfg = load_config(architecture).model if architecture is not None else Config().model
    cfg.backbone.pretrained = False
    return cfg


def inference_config(size: int, detections: int, architecture: str | Path | None = None) -> ModelConfig:
    """The model of ``architecture`` (see :func:`model_config`) at inference size ``size``, keeping
    ``detections`` detections per image at score threshold 0 (so that the mask path is fully loaded)."""
    cfg = model_config(architecture)
    cfg.input.min_size = [size]
    cfg.input.max_size = max(cfg.input.max_size, 2 * size)
    cfg.roi_heads.score_thresh = 0.0
    cfg.roi_heads.detections_per_img = detections
    return cfg


def benchmark_inference(tv: tv_mask_rcnn.MaskRCNN, ours: MaskRCNN, images: List[Tensor], *, mode: str,
                        repeats: int, device: torch.device) -> Dict[str, float]:
    """Stage, end-to-end and memory figures of the two eval-mode models on ``images`` in precision ``mode``.

    torchvision runs in both memory layouts (its weights as given, and channels-last) and is compared in
    the faster one (``tv_layout``); its float masks are thresholded to bool, the output ours returns. Ours
    runs in :func:`prepare_for_inference` form. Every figure is the median of ``repeats`` interleaved runs;
    end-to-end times also give their min and max. Before timing in fp32, the detections are compared
    (:func:`compare_detections`): a detection without a same-label counterpart of box IoU 0.99 is an error,
    since the figures would then compare different work. In bf16 they are not: at score threshold 0 the
    default model's 100 detections of an 800 x 1200 image score 0.96 to 1.0, 0.0003 apart in the median, far
    less than bf16 moves a score, so that either model's bf16 keeps other detections than its fp32 (what
    bf16 does to detections is measured by :func:`compare_precisions` on the small model, see
    :func:`run_benchmark`). Keys: ``{stage}_ours_s``,
    ``{stage}_tv_s``, ``{stage}_speedup`` for every stage and ``e2e``; ``e2e_{ours|tv_nchw|tv_cl}_{min|max}_s``,
    ``e2e_tv_nchw_s``, ``e2e_tv_cl_s``, ``tv_layout``; ``mem_ours_mb``, ``mem_tv_mb``; in fp32 ``check_*`` from
    :func:`compare_detections`; the compute floor (module docstring): ``peak_gflops`` and ``{stage}_gflop``,
    ``{stage}_floor_s``, ``{stage}_ceiling``.
    """
    sync = _synchronizer(device)
    layouts = {"tv_nchw": tv, "tv_cl": copy.deepcopy(tv).to(memory_format=torch.channels_last)}
    ours = prepare_for_inference(ours)

    def plain(model, threshold_masks: bool):
        def run():
            with torch.no_grad(), _autocast(device, mode):
                out = model(images)
            if threshold_masks:  # torchvision's (D, 1, H, W) probabilities -> (D, H, W) bool, as ours
                out = [{**o, "masks": o["masks"][:, 0] > 0.5} for o in out]
            return out
        return run

    def staged(model, stages):
        def run():
            clock = _StageClock(sync)
            with torch.no_grad(), _autocast(device, mode):
                stages(model, images, clock)
            return clock.times
        return run

    runs = {"ours": plain(ours, False), **{name: plain(model, True) for name, model in layouts.items()}}
    _interleaved_times(runs, 1, sync)  # warm-up: allocator, caches, lazy initialisation
    e2e = _interleaved_times(runs, repeats, sync)
    best = min(layouts, key=lambda name: statistics.median(e2e[name]))
    figures: Dict[str, object] = {"tv_layout": "channels_last" if best == "tv_cl" else "NCHW"}
    if mode == "fp32":
        check = compare_detections(runs["ours"](), runs[best]())
        if check["same_label"] < 1 or check["min_box_iou"] < 0.99:
            raise RuntimeError(f"the models do not detect the same instances in fp32: {check}")
        figures.update({f"check_{key}": value for key, value in check.items()})
    stage_runs = {"ours": staged(ours, _our_stages), "tv": staged(layouts[best], _torchvision_stages)}
    stage_times: Dict[str, List[Dict[str, float]]] = {"ours": [], "tv": []}
    for _ in range(repeats):
        for name, run in stage_runs.items():
            stage_times[name].append(run())
    for stage in STAGES:
        for name in ("ours", "tv"):
            figures[f"{stage}_{name}_s"] = statistics.median(t[stage] for t in stage_times[name])
    for name, times in e2e.items():
        figures[f"e2e_{name}_s"] = statistics.median(times)
        figures[f"e2e_{name}_min_s"], figures[f"e2e_{name}_max_s"] = min(times), max(times)
    figures["e2e_tv_s"] = figures[f"e2e_{best}_s"]
    for stage in (*STAGES, "e2e"):
        figures[f"{stage}_speedup"] = figures[f"{stage}_tv_s"] / figures[f"{stage}_ours_s"]
    with torch.no_grad(), _autocast(device, mode), _FlopClock() as flops:
        _our_stages(ours, images, flops)
    flops.gflop["e2e"] = sum(flops.gflop.values())
    figures["peak_gflops"] = peak = conv_peak_gflops(device, mode, repeats)
    for stage in (*STAGES, "e2e"):
        floor = _floor_figures(flops.gflop[stage], figures[f"{stage}_tv_s"], peak)
        figures.update({f"{stage}_{key}": value for key, value in floor.items()})
    figures["mem_ours_mb"] = peak_memory_mb(runs["ours"], device)
    figures["mem_tv_mb"] = peak_memory_mb(runs[best], device)
    return figures


def benchmark_paste(mask_probs: Tensor, boxes: Tensor, image_size: Tuple[int, int], *, repeats: int,
                    device: torch.device) -> Dict[str, float]:
    """Our paste against torchvision's on the same detections, and against writing the bare output.

    mask_probs: (D, 28, 28) float; boxes: (D, 4) xyxy pixels of an image of ``image_size`` (h, w).
    Both produce the same thing, (D, h, w) bool masks: torchvision's ``paste_masks_in_image`` (one
    full-image float canvas per mask) as its postprocess runs it, then its 0.5 threshold. ``write_s`` is the
    time to allocate and zero the (D, h, w) bool output that every paste must produce.
    """
    sync = _synchronizer(device)
    runs = {
        "ours": lambda: paste_masks_in_image(mask_probs, boxes, image_size),
        "tv": lambda: tv_paste_masks_in_image(mask_probs[:, None], boxes, image_size, padding=1)[:, 0] > 0.5,
        "write": lambda: torch.zeros((len(boxes), *image_size), dtype=torch.bool, device=device),
    }
    _interleaved_medians(runs, 1, sync)
    t = _interleaved_medians(runs, repeats, sync)
    return {"paste_s": t["ours"], "paste_tv_s": t["tv"], "write_s": t["write"],
            "paste_speedup": t["tv"] / t["ours"], "paste_vs_write": t["ours"] / t["write"]}


# ---------------------------------------------------------------------------------------------------------
# Training


def training_batch(num_images: int, size: int, max_size: int, device: torch.device, seed: int = 0
                   ) -> Tuple[List[Tensor], List[dict], List[dict]]:
    """A synthetic shapes batch as the training data pipeline delivers it at input size ``size``.

    Images are drawn with sides in ``[size, 2 size]``, turned to landscape (as the trainer's aspect-ratio
    grouping batches them) and resized so that the shorter side is ``size`` (the longer at most
    ``max_size``). Returns the images, (3, H, W) float 0-1 RGB, our targets (``boxes`` (M, 4) xyxy
    pixels, ``labels`` in 1..3, ``masks`` as BitMasks) and the same targets in torchvision's form
    (``masks`` a (M, H, W) uint8 tensor). Crowd regions are left out (torchvision has no use for them);
    every image holds at least one instance.
    """
    rng = np.random.default_rng(seed)
    resize = ResizeShortestEdge([size], max_size)
    images, ours, tv = [], [], []
    labels_of = {category["id"]: label for label, category in enumerate(CATEGORIES, start=1)}
    while len(images) < num_images:
        pixels, instances = render_image(rng, min_size=size, max_size=2 * size)
        instances = [inst for inst in instances if not inst[3]]
        if not instances:
            continue
        masks = torch.from_numpy(np.stack([inst[1] for inst in instances]))  # (M, H, W) bool
        if pixels.shape[0] > pixels.shape[1]:
            pixels, masks = np.ascontiguousarray(pixels.transpose(1, 0, 2)), masks.transpose(1, 2).contiguous()
        # Boxes enclose the mask pixels: x2, y2 one past the last column and row.
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        pixels, target = resize(pixels, {"boxes": boxes, "crowd_boxes": torch.zeros((0, 4)),
                                         "masks": BitMasks(masks)}, rng)
        labels = torch.tensor([labels_of[inst[0]] for inst in instances], dtype=torch.int64, device=device)
        boxes, masks = target["boxes"].to(device), target["masks"].tensor.to(device)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(device))
        ours.append({"boxes": boxes, "labels": labels, "masks": BitMasks(masks)})
        tv.append({"boxes": boxes, "labels": labels, "masks": masks.to(torch.uint8)})
    return images, ours, tv


def training_step(model: nn.Module, images: List[Tensor], targets: List[dict], *, mode: str,
                  device: torch.device) -> Callable[[], None]:
    """One training step of ``model`` on a fixed batch, as a callable: forward in precision ``mode``, backward and an
    SGD step (lr 1e-3, momentum 0.9, weight decay 1e-4) on the parameters that train."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def run():
        with _autocast(device, mode):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return run


def benchmark_train_step(cfg: ModelConfig, *, num_images: int, mode: str, repeats: int, device: torch.device,
                         seed: int = 0) -> Dict[str, float]:
    """One training step (forward + backward + SGD step) of ours and torchvision's model at ``cfg``.

    Both start from the same seeded weights and train on the same batch of ``num_images`` images at input
    size ``cfg.input.min_size[-1]``; torchvision's transform, which resizes in training too, then keeps
    that size. Ours runs in the layout the trainer picks (:func:`maskrcnn.precision.channels_last_is_faster`);
    torchvision runs in both layouts (its default
    and channels-last) and is compared in the faster one. Times are medians of ``repeats`` interleaved
    steps. Keys: ``ours_s``, ``tv_s``, ``tv_nchw_s``, ``tv_cl_s``, ``tv_layout``, ``speedup``,
    ``mem_ours_mb``, ``mem_tv_mb``, and the step's compute floor (forward and backward; module docstring):
    ``gflop``, ``floor_s``, ``ceiling``.
    """
    sync = _synchronizer(device)
    torch.manual_seed(seed)
    norm = FrozenBatchNorm2d if cfg.backbone.norm == "frozen_bn" else nn.BatchNorm2d
    size = cfg.input.min_size[-1]
    tv = torchvision_model(cfg, norm_layer=norm).to(device)
    tv.transform.min_size = (size,)
    ours = our_model_from(tv, cfg).to(device)
    if channels_last_is_faster(device)[0]:  # the layout the trainer picks (train.channels_last unset)
        ours.to(memory_format=torch.channels_last)
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    images, our_targets, tv_targets = training_batch(num_images, size, cfg.input.max_size, device, seed)

    runs = {"ours": training_step(ours, images, our_targets, mode=mode, device=device),
            "tv_nchw": training_step(tv, images, tv_targets, mode=mode, device=device),
            "tv_cl": training_step(tv_cl, images, tv_targets, mode=mode, device=device)}
    _interleaved_medians(runs, 1, sync)
    t = _interleaved_medians(runs, repeats, sync)
    best = min(("tv_nchw", "tv_cl"), key=t.get)
    with _FlopClock() as flops:  # torchvision's step: the arithmetic that ours cuts down
        runs[best]()
        flops.lap("step")
    return {"ours_s": t["ours"], "tv_s": t[best], "tv_nchw_s": t["tv_nchw"], "tv_cl_s": t["tv_cl"],
            "tv_layout": "channels_last" if best == "tv_cl" else "NCHW", "speedup": t[best] / t["ours"],
            "mem_ours_mb": peak_memory_mb(runs["ours"], device), "mem_tv_mb": peak_memory_mb(runs[best], device),
            **_floor_figures(flops.gflop["step"], t[best], conv_peak_gflops(device, mode, repeats))}


# ---------------------------------------------------------------------------------------------------------
# The whole benchmark


def train_configs(small_config: str | Path, architecture: str | Path | None = None
                  ) -> Dict[str, Tuple[ModelConfig, int]]:
    """The training benchmarks: name -> (model configuration, images per step).

    ``r50``: the R50-FPN of ``architecture`` (see :func:`model_config`) at 512 px, 2 images; ``small``: the
    model of ``small_config`` at its own input size and ``solver.ims_per_batch``, with the mask loss on
    every foreground RoI as torchvision computes it (``mask_rois_per_image`` 0), so that both models do the
    same work.
    """
    r50 = model_config(architecture)
    r50.input.min_size = [512]
    small = load_config(small_config)
    small.model.roi_heads.mask_rois_per_image = 0
    return {"r50": (r50, 2), "small": (small.model, small.solver.ims_per_batch)}


def run_benchmark(*, modes: Sequence[str] = MODES, quick: bool = False, device: str = "cpu", size: int = 800,
                  detections: int = 100, train_config: str | Path = "configs/maskrcnn_R18_FPN_small.yaml",
                  architecture: str | Path | None = None,
                  progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Every figure of the benchmark, as one flat dict.

    modes: precisions to run, from ("fp32", "bf16"). quick: 3 timed repetitions instead of 5.
    size: inference images are ``size`` x ``1.5 size`` pixels (resized by both models to shortest side
    ``size``), with ``detections`` detections each. train_config: the YAML of the small training model.
    architecture: the YAML whose model section is the R50-FPN measured in inference and in the ``r50``
    training step, e.g. ``configs/maskrcnn_R50_FPN_v2.yaml`` against torchvision's
    ``maskrcnn_resnet50_fpn_v2`` architecture; None: the default configuration, torchvision's v1.
    Keys (per mode m): ``{m}_{stage}_{ours|tv}_s`` and ``{m}_{stage}_speedup`` for every stage and
    ``e2e``, ``e2e_{m}_speedup``, ``e2e_{m}_s`` (our seconds per image), ``{m}_mem_{ours|tv}_mb``;
    ``{m}_{stage}_{gflop|floor_s|ceiling}`` and ``{m}_peak_gflops`` (the compute floor, module docstring);
    ``paste_s``, ``paste_tv_s``, ``write_s``, ``paste_speedup``, ``paste_vs_write``;
    ``train_{m}_{name}_{ours_s|tv_s|speedup|mem_ours_mb|mem_tv_mb|gflop|floor_s|ceiling}`` per training
    configuration and
    ``train_{m}_speedup``, the geometric mean of their speedups; with bf16 among the modes,
    ``bf16_vs_fp32_*``: :func:`compare_precisions` of the small training model with well-conditioned weights
    on :data:`PRECISION_IMAGES` shapes images of its training size; and ``device``, ``threads``,
    ``image_size``, ``detections``, ``repeats``, ``architecture``, with where the figures hold: ``cpu`` (the
    model name), ``isa`` (``torch.backends.cpu.get_cpu_capability()``), ``native_bf16``, ``bf16_reason``,
    ``isa_caps`` and ``torch`` (see :func:`maskrcnn.precision.machine_summary`).
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    repeats = 3 if quick else 5
    cfg = inference_config(size, detections, architecture)
    images = sample_images(size, dev)
    height, width = images[0].shape[-2:]
    figures: Dict[str, object] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "threads": torch.get_num_threads(), "image_size": f"{height}x{width}", "detections": detections,
        "repeats": repeats, "architecture": str(architecture) if architecture is not None else "default (v1)",
        **{key: value for key, value in machine_summary(dev).items() if key != "threads"},
    }
    progress("building the models")
    tv = well_conditioned_torchvision_model(cfg).to(dev)
    ours = our_model_from(tv, cfg)
    for mode in modes:
        progress(f"inference, {mode}")
        result = benchmark_inference(tv, ours, images, mode=mode, repeats=repeats, device=dev)
        figures.update({f"{mode}_{key}": value for key, value in result.items()})
        figures[f"e2e_{mode}_speedup"] = result["e2e_speedup"]
        figures[f"e2e_{mode}_s"] = result["e2e_ours_s"] / len(images)
    progress("mask paste")
    fast = prepare_for_inference(ours)
    with torch.no_grad():
        detected = fast(images[:1], mask_format="probs")[0]
    figures.update(benchmark_paste(detected["mask_probs"], detected["boxes"], (height, width), repeats=3 * repeats,
                                   device=dev))
    paste_out = paste_masks_in_image(detected["mask_probs"], detected["boxes"], (height, width))
    tv_out = tv_paste_masks_in_image(detected["mask_probs"][:, None], detected["boxes"], (height, width), padding=1)
    figures["paste_differing_pixels"] = int((paste_out != (tv_out[:, 0] > 0.5)).sum())
    del tv, ours, fast
    if "bf16" in modes:
        progress("bf16 against fp32, on the small model")
        small = model_config(train_config)
        small_model = our_model_from(well_conditioned_torchvision_model(small).to(dev), small)
        check = compare_precisions(prepare_for_inference(small_model), sample_images(small.input.min_size[0], dev,
                                                                                     count=PRECISION_IMAGES), dev)
        figures.update({f"bf16_vs_fp32_{key}": value for key, value in check.items()})
    for name, (train_cfg, num_images) in train_configs(train_config, architecture).items():
        for mode in modes:
            progress(f"training step, {name}, {mode}")
            result = benchmark_train_step(train_cfg, num_images=num_images, mode=mode, repeats=repeats, device=dev)
            figures.update({f"train_{mode}_{name}_{key}": value for key, value in result.items()})
    for mode in modes:
        speedups = [figures[f"train_{mode}_{name}_speedup"] for name in train_configs(train_config)]
        figures[f"train_{mode}_speedup"] = math.prod(speedups) ** (1 / len(speedups))
    return figures


def machine_line(figures: Dict[str, object]) -> str:
    """Where the figures hold, as one line: CPU model, ISA, native bf16 and threads."""
    return (f"CPU {figures['cpu']}, ISA {figures['isa']}, native bf16 {'yes' if figures['native_bf16'] else 'no'} "
            f"({figures['bf16_reason']}), {figures['threads']} threads, torch {figures['torch']}"
            + (f"; restricted by {figures['isa_caps']}" if figures.get("isa_caps") else "")
            + (f"; GPU {figures['gpu']}" if "gpu" in figures else ""))


def _ceiling(value) -> str:
    return f"{value:8.2f}" if value is not None else f"{'-':>8}"


def format_report(figures: Dict[str, object]) -> str:
    """The figures of :func:`run_benchmark` as text tables: seconds, torchvision / ours, memory."""
    lines = [machine_line(figures),
             f"R50-FPN architecture {figures['architecture']}; device {figures['device']}; images {figures['image_size']}, {figures['detections']} detections; "
             f"medians of {figures['repeats']} runs; speedup = torchvision time / our time"]
    modes = [m for m in MODES if f"e2e_{m}_speedup" in figures]
    for mode in modes:
        f = {key[len(mode) + 1:]: value for key, value in figures.items() if key.startswith(mode + "_")}
        lines += ["", f"inference {mode} (torchvision {f['tv_layout']}, the faster of its two layouts)",
                  f"  {'':<16} {'ours ms':>9} {'tv ms':>9} {'speedup':>8} {'GFLOP':>8} {'floor ms':>9} {'ceiling':>8}"]
        for stage in (*STAGES, "e2e"):
            lines.append(f"  {stage:<16} {f[f'{stage}_ours_s'] * 1e3:9.1f} {f[f'{stage}_tv_s'] * 1e3:9.1f} "
                         f"{f[f'{stage}_speedup']:8.2f} {f[f'{stage}_gflop']:8.1f} {f[f'{stage}_floor_s'] * 1e3:9.1f} "
                         f"{_ceiling(f[f'{stage}_ceiling'])}")
        lines.append(f"  floor: the stage's convolutions and matrix products at {f['peak_gflops']:.0f} GFLOP/s (a 3x3 "
                     f"256-channel convolution here); ceiling = tv ms / floor ms, the most that arithmetic allows")
        for name, label in (("ours", "ours"), ("tv_nchw", "torchvision NCHW"), ("tv_cl", "torchvision channels_last")):
            lines.append(f"  end to end, {label}: median {f[f'e2e_{name}_s'] * 1e3:.0f} ms "
                         f"(min {f[f'e2e_{name}_min_s'] * 1e3:.0f}, max {f[f'e2e_{name}_max_s'] * 1e3:.0f})")
        lines.append(f"  peak memory MB   {f['mem_ours_mb']:9.0f} {f['mem_tv_mb']:9.0f}")
        if mode == "fp32":
            lines.append(f"  same detections: {f['check_same_label']:.1%} of {f['check_detections']} with equal labels, "
                         f"worst box IoU {f['check_min_box_iou']:.4f}, mean mask IoU {f['check_mean_mask_iou']:.4f}")
        else:
            lines.append("  detections not compared: at score threshold 0 their scores are closer to one another "
                         "than bf16's rounding (bf16 against fp32 on the small model is below)")
    lines += ["", f"mask paste to bool: ours {figures['paste_s'] * 1e3:.1f} ms, torchvision (paste, then > 0.5) "
              f"{figures['paste_tv_s'] * 1e3:.1f} ms (speedup {figures['paste_speedup']:.1f}); writing the bool "
              f"output alone {figures['write_s'] * 1e3:.1f} ms (paste / write {figures['paste_vs_write']:.2f}); "
              f"{figures['paste_differing_pixels']} pixels differ"]
    if "bf16_vs_fp32_detections" in figures:
        f = {key[len("bf16_vs_fp32_"):]: value for key, value in figures.items() if key.startswith("bf16_vs_fp32_")}
        lines += ["", f"bf16 against fp32, ours, on the small training model with well-conditioned weights: "
                      f"{f['found']:.1%} of the {f['detections']} fp32 detections found in bf16 (same label, box IoU "
                      f"above the NMS threshold), {f['same_box']:.1%} as the same box (IoU >= 0.9), whose scores differ "
                      f"by {f['max_score_diff']:.4f} at most and mask probabilities by {f['mean_mask_diff']:.4f} on average"]
    names = sorted({key.split("_")[2] for key in figures if key.startswith("train_") and key.endswith("_ours_s")})
    for mode in modes if names else ():
        lines += ["", f"training step {mode}  {'ours ms':>9} {'tv ms':>9} {'speedup':>8} {'ours MB':>8} {'tv MB':>8}"
                      f" {'GFLOP':>8} {'floor ms':>9} {'ceiling':>8}"]
        for name in names:
            key = f"train_{mode}_{name}"
            lines.append(f"  {name:<18} {figures[key + '_ours_s'] * 1e3:9.0f} {figures[key + '_tv_s'] * 1e3:9.0f} "
                         f"{figures[key + '_speedup']:8.2f} {figures[key + '_mem_ours_mb']:8.0f} "
                         f"{figures[key + '_mem_tv_mb']:8.0f} {figures[key + '_gflop']:8.1f} "
                         f"{figures[key + '_floor_s'] * 1e3:9.0f} {_ceiling(figures[key + '_ceiling'])}")
        lines.append(f"  geometric mean {'':>22} {figures[f'train_{mode}_speedup']:8.2f}")
    return "\n".join(lines)
