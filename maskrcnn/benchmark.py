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
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, masks_to_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import Config, ModelConfig, load_config
from .convert import convert_torchvision_state_dict
from .data.shapes import CATEGORIES, render_image
from .data.transforms import ResizeShortestEdge
from .modeling.maskrcnn import MaskRCNN, build_model, prepare_for_inference
from .modeling.paste import paste_masks_in_image
from .modeling.postprocess import to_original_image
from .structures import BitMasks

STAGES = ("preprocess", "backbone_fpn", "rpn", "box_head", "mask_head", "postprocess")
MODES = ("fp32", "bf16")


def torchvision_model(cfg: ModelConfig, *, norm_layer: Callable[..., nn.Module]) -> tv_mask_rcnn.MaskRCNN:
    """torchvision's Mask R-CNN at the architecture of ``cfg``, built from torchvision's classes.

    The modules are created in the order ``maskrcnn_resnet50_fpn`` creates them, so that for the default
    configuration, under the same seed, the weights are those of ``maskrcnn_resnet50_fpn(weights=None)``.
    norm_layer: the trunk's normalisation (``nn.BatchNorm2d`` or ``FrozenBatchNorm2d``).
    Returned in training mode, like any freshly built module.
    """
    b, a, r, h = cfg.backbone, cfg.anchors, cfg.rpn, cfg.roi_heads
    trunk = getattr(torchvision.models, f"resnet{b.depth}")(weights=None, norm_layer=norm_layer)
    # What torchvision's _resnet_fpn_extractor does, with the pyramid width as a parameter: its
    # trainable_layers is 5 - freeze_at, and at 5 the stem's norm trains too.
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: 5 - b.freeze_at + (b.freeze_at == 0)]
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)
    width = trunk.inplanes // 8
    backbone = BackboneWithFPN(trunk, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                               [width * 2 ** k for k in range(4)], b.fpn_channels, extra_blocks=LastLevelMaxPool())
    num_classes = h.num_classes + 1  # torchvision counts the background
    pooled = ["0", "1", "2", "3"]
    mask_head = tv_mask_rcnn.MaskRCNNHeads(b.fpn_channels, [h.mask_head_dim] * h.mask_head_convs, 1)
    mask_predictor = tv_mask_rcnn.MaskRCNNPredictor(h.mask_head_dim, h.mask_head_dim, num_classes)
    anchor_generator = TVAnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes))
    rpn_head = TVRPNHead(b.fpn_channels, len(a.aspect_ratios))
    box_head = TwoMLPHead(b.fpn_channels * h.box_pooler_resolution ** 2, h.box_head_dim)
    box_predictor = FastRCNNPredictor(h.box_head_dim, num_classes)
    return tv_mask_rcnn.MaskRCNN(
        backbone, min_size=tuple(cfg.input.min_size), max_size=cfg.input.max_size,
        image_mean=list(cfg.input.pixel_mean), image_std=list(cfg.input.pixel_std),
        rpn_anchor_generator=anchor_generator, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train, rpn_pre_nms_top_n_test=r.pre_nms_topk_test,
        rpn_post_nms_top_n_train=r.post_nms_topk_train, rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        rpn_score_thresh=r.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(pooled, h.box_pooler_resolution, h.sampling_ratio,
                                        canonical_scale=h.canonical_scale, canonical_level=h.canonical_level),
        box_head=box_head, box_predictor=box_predictor, box_score_thresh=h.score_thresh,
        box_nms_thresh=h.nms_thresh, box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh, box_bg_iou_thresh=h.bg_iou_thresh,
        box_batch_size_per_image=h.batch_size_per_image, box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.bbox_reg_weights),
        mask_roi_pool=MultiScaleRoIAlign(pooled, h.mask_pooler_resolution, h.sampling_ratio,
                                         canonical_scale=h.canonical_scale, canonical_level=h.canonical_level),
        mask_head=mask_head, mask_predictor=mask_predictor,
    )


def well_conditioned_torchvision_model(cfg: ModelConfig, *, seed: int = 0) -> tv_mask_rcnn.MaskRCNN:
    """torchvision's Mask R-CNN at ``cfg`` with seeded random weights scaled to a well-conditioned network.

    Batch-norm statistics are calibrated on random images, pyramid outputs are scaled to unit spread and
    the prediction layers get a spread of scores, so that ranking and NMS are decided by margins far above
    float round-off rather than by ties. The trunk is returned with ``FrozenBatchNorm2d`` (the layout of
    torchvision's pretrained models) when ``cfg.backbone.norm`` is "frozen_bn", else with ``BatchNorm2d``.
    Returned in eval mode.
    """
    torch.manual_seed(seed)
    tv = torchvision_model(cfg, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        calib = tv.transform([torch.rand(3, 160, 200), torch.rand(3, 200, 160)])[0].tensors
        body = tv.backbone.body
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        body.train()
        body(calib)
        body.eval()
        features = tv.backbone(calib)
        for conv, level in zip(tv.backbone.fpn.layer_blocks, ["0", "1", "2", "3"]):
            std = features[level].std()
            conv[0].weight /= std
            conv[0].bias /= std
        g = torch.Generator().manual_seed(seed + 1)
        for layer, std in [(tv.rpn.head.cls_logits, 0.3), (tv.rpn.head.bbox_pred, 0.05),
                           (tv.roi_heads.box_predictor.cls_score, 0.3),
                           (tv.roi_heads.box_predictor.bbox_pred, 0.05),
                           (tv.roi_heads.mask_predictor.mask_fcn_logits, 0.1)]:
            layer.weight.normal_(0, std, generator=g)
            layer.bias.normal_(0, std, generator=g)
    if cfg.backbone.norm == "frozen_bn":
        frozen = torchvision_model(cfg, norm_layer=FrozenBatchNorm2d)
        frozen.load_state_dict(tv.state_dict())
        tv = frozen
    return tv.eval()


def our_model_from(tv: tv_mask_rcnn.MaskRCNN, cfg: ModelConfig) -> MaskRCNN:
    """``build_model(cfg)`` carrying the weights of the torchvision model ``tv`` (built at the same ``cfg``),
    on ``tv``'s device and in its training mode."""
    ours = build_model(cfg).to(next(tv.parameters()).device)
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict()))
    return ours.train(tv.training)


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


def _interleaved_medians(runs: Dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
                         ) -> Dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds, the callables alternating within a round."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
    """Our eval forward, stage by stage (the steps of ``MaskRCNN.forward``)."""
    batch = model.preprocess(images, resize=True)
    clock.lap("preprocess")
    features = model.fpn(model.backbone(batch.tensor))
    clock.lap("backbone_fpn")
    proposals, _ = model.rpn(batch.image_sizes, tuple(batch.tensor.shape[-2:]), features)
    clock.lap("rpn")
    detections = model.roi_heads.detect_boxes(features, proposals, batch.image_sizes)
    clock.lap("box_head")
    detections = model.roi_heads.predict_masks(features, detections)
    clock.lap("mask_head")
    out = [to_original_image(det, resized, tuple(img.shape[-2:]), paste=True, mask_threshold=model.mask_threshold,
                             memory_mb=model.paste_memory_mb)
           for det, resized, img in zip(detections, batch.image_sizes, images)]
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


def benchmark_images(size: int, device: torch.device, count: int = 1, seed: int = 0) -> List[Tensor]:
    """``count`` COCO-like landscape images of ``size`` x ``1.5 size`` pixels, (3, H, W) float 0-1 RGB:
    shapes on a noisy gradient background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels, _ = render_image(rng, min_size=size, max_size=size)
        pixels = np.ascontiguousarray(np.concatenate([pixels, pixels[:, : size // 2]], axis=1))
        out.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(device))
    return out


def inference_config(size: int, detections: int) -> ModelConfig:
    """The default (R50-FPN) model configuration at inference size ``size``, keeping ``detections``
    detections per image at score threshold 0 (so that the mask path is fully loaded)."""
    cfg = Config().model
    cfg.input.min_size = [size]
    cfg.input.max_size = max(cfg.input.max_size, 2 * size)
    cfg.roi_heads.score_thresh = 0.0
    cfg.roi_heads.detections_per_img = detections
    return cfg


def benchmark_inference(tv: tv_mask_rcnn.MaskRCNN, ours: MaskRCNN, images: List[Tensor], *, mode: str,
                        repeats: int, device: torch.device) -> Dict[str, float]:
    """Stage, end-to-end and memory figures of the two eval-mode models on ``images`` in precision ``mode``.

    End-to-end times are medians of ``repeats`` runs, stage times of ``(repeats + 1) // 2`` runs.

    ``tv`` runs as given in fp32 and channels-last under bf16 autocast; ``ours`` runs in
    :func:`prepare_for_inference` form. Keys: ``{stage}_ours_s``, ``{stage}_tv_s``, ``{stage}_speedup``
    for every stage and ``e2e``, ``mem_ours_mb``, ``mem_tv_mb``.
    """
    sync = _synchronizer(device)
    if mode == "bf16":
        tv = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    ours = prepare_for_inference(ours)

    def staged(model, stages):
        def run():
            clock = _StageClock(sync)
            with torch.no_grad(), _autocast(device, mode):
                stages(model, images, clock)
            return clock.times
        return run

    def plain(model):
        def run():
            with torch.no_grad(), _autocast(device, mode):
                return model(images)
        return run

    runs = {"ours": plain(ours), "tv": plain(tv)}
    _interleaved_medians(runs, 1, sync)  # warm-up: allocator, caches, lazy initialisation
    e2e = _interleaved_medians(runs, repeats, sync)
    stage_runs = {"ours": staged(ours, _our_stages), "tv": staged(tv, _torchvision_stages)}
    stage_times: Dict[str, List[Dict[str, float]]] = {"ours": [], "tv": []}
    for _ in range((repeats + 1) // 2):
        for name, run in stage_runs.items():
            stage_times[name].append(run())
    figures = {}
    for stage in STAGES:
        for name in ("ours", "tv"):
            figures[f"{stage}_{name}_s"] = statistics.median(t[stage] for t in stage_times[name])
    figures["e2e_ours_s"], figures["e2e_tv_s"] = e2e["ours"], e2e["tv"]
    for stage in (*STAGES, "e2e"):
        figures[f"{stage}_speedup"] = figures[f"{stage}_tv_s"] / figures[f"{stage}_ours_s"]
    figures["mem_ours_mb"] = peak_memory_mb(runs["ours"], device)
    figures["mem_tv_mb"] = peak_memory_mb(runs["tv"], device)
    return figures


def benchmark_paste(mask_probs: Tensor, boxes: Tensor, image_size: Tuple[int, int], *, repeats: int,
                    device: torch.device) -> Dict[str, float]:
    """Our paste against torchvision's on the same detections, and against writing the bare output.

    mask_probs: (D, 28, 28) float; boxes: (D, 4) xyxy pixels of an image of ``image_size`` (h, w).
    torchvision's ``paste_masks_in_image`` (one full-image float canvas per mask, not thresholded) is
    timed as its postprocess runs it. ``write_s`` is the time to allocate and zero the (D, h, w) bool
    output that every paste must produce.
    """
    sync = _synchronizer(device)
    runs = {
        "ours": lambda: paste_masks_in_image(mask_probs, boxes, image_size),
        "tv": lambda: tv_paste_masks_in_image(mask_probs[:, None], boxes, image_size, padding=1),
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


def benchmark_train_step(cfg: ModelConfig, *, num_images: int, mode: str, repeats: int, device: torch.device,
                         seed: int = 0) -> Dict[str, float]:
    """One training step (forward + backward + SGD step) of ours and torchvision's model at ``cfg``.

    Both start from the same seeded weights and train on the same batch of ``num_images`` images at input
    size ``cfg.input.min_size[-1]``; torchvision's transform, which resizes in training too, then keeps
    that size. Ours runs channels-last as the trainer runs it; torchvision in its default layout for
    fp32 and channels-last under bf16 autocast. Keys: ``ours_s``, ``tv_s``, ``speedup``, ``mem_ours_mb``,
    ``mem_tv_mb``.
    """
    sync = _synchronizer(device)
    torch.manual_seed(seed)
    norm = FrozenBatchNorm2d if cfg.backbone.norm == "frozen_bn" else nn.BatchNorm2d
    size = cfg.input.min_size[-1]
    tv = torchvision_model(cfg, norm_layer=norm).to(device)
    tv.transform.min_size = (size,)
    ours = our_model_from(tv, cfg).to(device)
    ours.to(memory_format=torch.channels_last)  # as the trainer runs it (train.channels_last)
    if mode == "bf16":
        tv.to(memory_format=torch.channels_last)
    images, our_targets, tv_targets = training_batch(num_images, size, cfg.input.max_size, device, seed)

    def step(model, targets):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def run():
            with _autocast(device, mode):
                losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        return run

    runs = {"ours": step(ours, our_targets), "tv": step(tv, tv_targets)}
    _interleaved_medians(runs, 1, sync)
    t = _interleaved_medians(runs, repeats, sync)
    return {"ours_s": t["ours"], "tv_s": t["tv"], "speedup": t["tv"] / t["ours"],
            "mem_ours_mb": peak_memory_mb(runs["ours"], device), "mem_tv_mb": peak_memory_mb(runs["tv"], device)}


# ---------------------------------------------------------------------------------------------------------
# The whole benchmark


def train_configs(small_config: str | Path) -> Dict[str, Tuple[ModelConfig, int]]:
    """The training benchmarks: name -> (model configuration, images per step).

    ``r50``: the default R50-FPN at 512 px, 2 images; ``small``: the model of ``small_config`` at its own
    input size and ``solver.ims_per_batch``, with the mask loss on every foreground RoI as torchvision
    computes it (``mask_rois_per_image`` 0), so that both models do the same work.
    """
    r50 = Config().model
    r50.input.min_size = [512]
    small = load_config(small_config)
    small.model.roi_heads.mask_rois_per_image = 0
    return {"r50": (r50, 2), "small": (small.model, small.solver.ims_per_batch)}


def run_benchmark(*, modes: Sequence[str] = MODES, quick: bool = False, device: str = "cpu", size: int = 800,
                  detections: int = 100, train_config: str | Path = "configs/maskrcnn_R18_FPN_small.yaml",
                  progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Every figure of the benchmark, as one flat dict.

    modes: precisions to run, from ("fp32", "bf16"). quick: 2 timed repetitions instead of 5.
    size: inference images are ``size`` x ``1.5 size`` pixels (resized by both models to shortest side
    ``size``), with ``detections`` detections each. train_config: the YAML of the small training model.
    Keys (per mode m): ``{m}_{stage}_{ours|tv}_s`` and ``{m}_{stage}_speedup`` for every stage and
    ``e2e``, ``e2e_{m}_speedup``, ``e2e_{m}_s`` (our seconds per image), ``{m}_mem_{ours|tv}_mb``;
    ``paste_s``, ``paste_tv_s``, ``write_s``, ``paste_speedup``, ``paste_vs_write``;
    ``train_{m}_{name}_{ours_s|tv_s|speedup|mem_ours_mb|mem_tv_mb}`` per training configuration and
    ``train_{m}_speedup``, the geometric mean of their speedups; and ``device``, ``threads``,
    ``image_size``, ``detections``, ``repeats``.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    repeats = 2 if quick else 5
    cfg = inference_config(size, detections)
    images = benchmark_images(size, dev)
    height, width = images[0].shape[-2:]
    figures: Dict[str, object] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "threads": torch.get_num_threads(), "image_size": f"{height}x{width}", "detections": detections,
        "repeats": repeats,
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
    fast.return_mask_probs = True
    with torch.no_grad():
        detected = fast(images[:1])[0]
    figures.update(benchmark_paste(detected["mask_probs"], detected["boxes"], (height, width), repeats=3 * repeats,
                                   device=dev))
    del tv, ours, fast
    for name, (train_cfg, num_images) in train_configs(train_config).items():
        for mode in modes:
            progress(f"training step, {name}, {mode}")
            result = benchmark_train_step(train_cfg, num_images=num_images, mode=mode, repeats=repeats, device=dev)
            figures.update({f"train_{mode}_{name}_{key}": value for key, value in result.items()})
    for mode in modes:
        speedups = [figures[f"train_{mode}_{name}_speedup"] for name in train_configs(train_config)]
        figures[f"train_{mode}_speedup"] = math.prod(speedups) ** (1 / len(speedups))
    return figures


def format_report(figures: Dict[str, object]) -> str:
    """The figures of :func:`run_benchmark` as text tables: seconds, torchvision / ours, memory."""
    lines = [f"device {figures['device']}; images {figures['image_size']}, {figures['detections']} detections; "
             f"medians of {figures['repeats']} runs; speedup = torchvision time / our time"]
    modes = [m for m in MODES if f"e2e_{m}_speedup" in figures]
    for mode in modes:
        lines += ["", f"inference {mode}    {'ours ms':>9} {'tv ms':>9} {'speedup':>8}"]
        for stage in (*STAGES, "e2e"):
            lines.append(f"  {stage:<16} {figures[f'{mode}_{stage}_ours_s'] * 1e3:9.1f} "
                         f"{figures[f'{mode}_{stage}_tv_s'] * 1e3:9.1f} {figures[f'{mode}_{stage}_speedup']:8.2f}")
        lines.append(f"  peak memory MB   {figures[f'{mode}_mem_ours_mb']:9.0f} {figures[f'{mode}_mem_tv_mb']:9.0f}")
    lines += ["", f"mask paste: ours {figures['paste_s'] * 1e3:.1f} ms, torchvision {figures['paste_tv_s'] * 1e3:.1f} "
              f"ms (speedup {figures['paste_speedup']:.1f}); writing the bool output alone "
              f"{figures['write_s'] * 1e3:.1f} ms (paste / write {figures['paste_vs_write']:.2f})"]
    names = sorted({key.split("_")[2] for key in figures if key.startswith("train_") and key.endswith("_ours_s")})
    for mode in modes:
        lines += ["", f"training step {mode}  {'ours ms':>9} {'tv ms':>9} {'speedup':>8} {'ours MB':>8} {'tv MB':>8}"]
        for name in names:
            key = f"train_{mode}_{name}"
            lines.append(f"  {name:<18} {figures[key + '_ours_s'] * 1e3:9.0f} {figures[key + '_tv_s'] * 1e3:9.0f} "
                         f"{figures[key + '_speedup']:8.2f} {figures[key + '_mem_ours_mb']:8.0f} "
                         f"{figures[key + '_mem_tv_mb']:8.0f}")
        lines.append(f"  geometric mean {'':>22} {figures[f'train_{mode}_speedup']:8.2f}")
    return "\n".join(lines)
