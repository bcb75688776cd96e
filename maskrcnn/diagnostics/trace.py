"""The learner's view: how Mask R-CNN turns one image and its instance masks into a training signal, and
its 28x28 mask predictions into full-resolution masks: the numbers of a real model run, recorded.

Shorthand: H x W the training input (the image resized as training resizes it: shortest side
``model.input.min_size``, longest at most ``model.input.max_size``); K object classes; L pyramid levels;
A anchors per location; T anchors of the image; P positive RoIs of the image; S = 28 the mask side;
D detections; M ground-truth instances.

Nothing here re-implements the model. One training-mode forward pass is recorded with forward hooks on
``fpn`` (the pyramid), ``rpn.head`` (objectness logits and anchor deltas), ``rpn`` (proposals after NMS),
``roi_heads.mask_pooler`` (the positive RoIs the mask loss used and their pooled features, which the
mask head turns into every class's logits). The rest comes from the model's own functions:
``rpn.label_anchors`` and ``rpn.box_coder``, the RoI ``matcher`` (which instance each positive RoI crops),
``mask_targets``, ``mask_loss``,
``mask_probs_of_class``, ``assign_levels``, and inference through :func:`maskrcnn.inference.detect`,
whose masks are ``paste_masks_in_image``'s.

:func:`explain` returns what :func:`maskrcnn.diagnostics.figures.write_explanation` draws as these
figures (``docs/how-it-works.md`` refers to the names) and ``explain.md``, a page tying them together
with the numbers of the run:

    input_gt.png        the input, its instance masks coloured by class and by instance
    fpn_levels.png      a few channels of each pyramid level P2..P6, with strides
    rpn_anchors.png     the anchors at one location; every anchor's training label, level by level
    rpn_proposals.png   the highest-scoring proposals before and after NMS
    mask_targets.png    per positive RoI: box, cropped mask, 28x28 target, prediction, per-cell BCE
    mask_gradients.png  where the mask loss's gradient reaches the pyramid, through RoIAlign
    paste.png           28x28 probabilities -> resized to the box -> placed in the image -> thresholded
    final.png           all detections with scores, and the per-class label map
    generalisation.png  the explained image vs a held-out one, training loss curve, validation AP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_area, box_iou, clip_boxes_to_image

from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.transforms import ResizeShortestEdge
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import load_coco
from maskrcnn.rle import encode_masks
from maskrcnn.modeling.mask_head import logits_of_class, mask_loss, mask_probs_of_class, mask_targets
from maskrcnn.modeling.maskrcnn import MaskRCNN
from maskrcnn.modeling.matcher import match_boxes
from maskrcnn.modeling.poolers import assign_levels
from maskrcnn.inference import detect
from maskrcnn.precision import autocast
from maskrcnn.structures import BitMasks

# ---------------------------------------------------------------------------------------------------------
# Inputs: an annotated image, the training log, the evaluation metrics
# ---------------------------------------------------------------------------------------------------------

def locate_image(ann_file: Union[str, Path], image_path: Union[str, Path],
                 image_id: Optional[int] = None) -> Tuple[int, Path]:
    """The COCO id of the image file ``image_path`` in ``ann_file`` and the folder its ``file_name`` is
    relative to. image_id: the id, when the file name alone does not identify the image; it is checked
    against the file name."""
    coco = load_coco(ann_file)
    path = Path(image_path)
    if image_id is None:
        ids = [i for i, image in coco.imgs.items() if Path(image["file_name"]).name == path.name]
        if len(ids) != 1:
            found = "no image" if not ids else f"{len(ids)} images"
            raise InputError(f"{ann_file}: {found} with file name {path.name!r}; pass the image id explicitly")
        image_id = ids[0]
    if image_id not in coco.imgs:
        raise InputError(f"image id {image_id} is not in {ann_file}")
    file_name = coco.imgs[image_id]["file_name"]
    if Path(file_name).name != path.name:
        raise InputError(f"{ann_file}: image id {image_id} is the file {file_name!r}, not {path.name!r}")
    return image_id, path.parents[len(Path(file_name).parts) - 1]


def load_example(dataset: CocoDetection, image_id: Optional[int] = None, *,
                 min_instances: int = 2) -> Tuple[Tensor, dict]:
    """One image of ``dataset`` at its file size: ``(3, H, W)`` float 0-1 RGB and its target.

    image_id: the COCO id; by default the first image with at least ``min_instances`` instances (else the
    first with any). Raises ``ValueError`` naming the annotation file when the id is unknown or the image
    has no (non-crowd) instance to explain.
    """
    if image_id is not None:
        if image_id not in dataset.image_ids:
            raise InputError(f"image id {image_id} is not in {dataset.ann_file}")
        image, target = dataset[dataset.image_ids.index(image_id)]
        if len(target["boxes"]) == 0:
            raise InputError(f"image id {image_id} in {dataset.ann_file} has no instance annotation to explain")
        return image, target
    fallback = None
    for index in range(len(dataset)):
        image, target = dataset[index]
        if len(target["boxes"]) >= min_instances:
            return image, target
        if fallback is None and len(target["boxes"]):
            fallback = image, target
    if fallback is None:
        raise InputError(f"{dataset.ann_file} has no image with an instance annotation to explain")
    return fallback


def read_training_log(path: Union[str, Path]) -> List[dict]:
    """The records of a training ``metrics.jsonl`` (see :mod:`maskrcnn.engine.logger`), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number} is not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise InputError(f"{path}: line {number} is not a record with an integer 'iteration'")
        records.append(record)
    return records


def read_eval_metrics(path: Union[str, Path]) -> Optional[dict]:
    """Validation metrics ``{"bbox": {...}, "segm": {...}}`` from an evaluator ``metrics.json`` or from a
    training summary ``metrics.json`` (its ``eval`` entry); ``None`` when the training ran no evaluation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("segm"), dict):
        return data
    if isinstance(data, dict) and "eval" in data and (
            data["eval"] is None or isinstance(data["eval"], dict) and isinstance(data["eval"].get("segm"), dict)):
        return data["eval"]
    raise InputError(f"{path}: expected evaluation metrics ('segm' and 'bbox' entries) or a training summary "
                     "with an 'eval' entry")


# ---------------------------------------------------------------------------------------------------------
# The training view: one traced training-mode forward pass
# ---------------------------------------------------------------------------------------------------------

def training_input(image: Tensor, target: dict, train_size: Tuple[int, int]) -> Tuple[Tensor, dict]:
    """The image and target resized as the data pipeline resizes them for training (no flip).

    image: ``(3, H0, W0)`` float 0-1 RGB at its file size; target: its dataset target.
    train_size: (shortest side, longest side at most) in pixels: ``model.input.min_size`` (its last value)
    and ``model.input.max_size``; the model's own ``min_size`` is the inference size, which may differ.
    Returns ``(3, H, W)`` float 0-1 and the target in the pixels of the resized image.
    """
    resize = ResizeShortestEdge([train_size[0]], train_size[1])
    pixels, target = resize(to_uint8(image), target, np.random.default_rng(0))
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float().div(255), target


def trace_training_step(model: MaskRCNN, image: Tensor, target: dict, *, seed: int = 0) -> dict:
    """One training-mode forward pass of ``model`` on one image, recorded by forward hooks.

    image: ``(3, H, W)`` float 0-1 RGB training input, on the model's device; target: its training target,
    with at least one instance (its box is always a positive RoI, so the mask head runs).
    seed: seeds the model's random sampling of anchors and RoIs; the caller's RNG state is restored after.
    Normalisation layers stay in eval mode (one image's batch statistics are not the trained ones) and no
    weight changes. Returns:
        losses: name -> float, the model's own training losses for this image;
        features: L detached ``(1, C, Hi, Wi)`` tensors, P2..P6;
        feature_grads: ``(1, C, Hi, Wi)`` gradients of ``loss_mask`` with respect to each pooled level;
        rpn_logits, rpn_deltas: per level ``(1, A, Hi, Wi)`` and ``(1, 4A, Hi, Wi)``;
        proposals: ``(R, 4)`` xyxy proposals after NMS, highest objectness first;
        padded_size: ``(Hp, Wp)`` of the padded batch;
        positive_boxes: ``(P, 4)`` xyxy the positive RoIs the mask loss was computed on;
        mask_logits: ``(P, K, S, S)`` the mask head's logits for them, every class (training reads only
            each RoI's ground-truth class channel).
    """
    if len(target["boxes"]) == 0:
        raise InputError(f"image id {target.get('image_id')} has no instance annotation to explain")
    captured: Dict[str, object] = {}

    def record(name, inputs=False):
        def hook(module, args, output):
            captured[name] = args if inputs else output
        return hook

    hooks = [model.backbone.register_forward_hook(record("backbone", inputs=True)),
             model.fpn.register_forward_hook(record("features")),
             model.rpn.head.register_forward_hook(record("rpn_head")),
             model.rpn.register_forward_hook(record("rpn")),
             model.roi_heads.mask_pooler.register_forward_hook(record("mask_pooler", inputs=True)),
             model.roi_heads.mask_pooler.register_forward_hook(record("mask_features"))]
    was_training = model.training
    devices = [image.device.index or 0] if image.device.type == "cuda" else []
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            losses = model([image], [target])
            pooled = captured["features"][: len(model.roi_heads.mask_pooler.scales)]
            grads = torch.autograd.grad(losses["loss_mask"], pooled, materialize_grads=True)
            with torch.no_grad():
                mask_logits = model.roi_heads.mask_head(captured["mask_features"])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    logits, deltas = captured["rpn_head"]
    return {
        "losses": {name: float(value.detach()) for name, value in losses.items()},
        "features": [f.detach() for f in captured["features"]],
        "feature_grads": list(grads),
        "rpn_logits": [x.detach() for x in logits],
        "rpn_deltas": [x.detach() for x in deltas],
        "proposals": captured["rpn"][0][0],
        "padded_size": tuple(int(s) for s in captured["backbone"][0].shape[-2:]),
        "positive_boxes": torch.cat(captured["mask_pooler"][1]),
        "mask_logits": mask_logits,
    }


def level_names(model: MaskRCNN) -> List[str]:
    """``"P2"``, ..., ``"P6"``: pyramid level k has stride ``2**k``."""
    return [f"P{int(np.log2(stride))}" for stride in model.fpn.strides]


def fpn_view(model: MaskRCNN, trace: dict, *, channels: int = 4) -> List[dict]:
    """Per pyramid level: ``name``, ``stride`` (input pixels per feature cell), ``shape`` (Hi, Wi) and the
    ``channels`` most varied channels as ``maps`` ``(channels, Hi, Wi)`` float, with their ``indices``."""
    out = []
    for name, stride, feature in zip(level_names(model), model.fpn.strides, trace["features"]):
        maps = feature[0].float().cpu()  # (1, C, Hi, Wi) -> (C, Hi, Wi)
        indices = maps.flatten(1).var(dim=1).topk(min(channels, len(maps))).indices
        out.append({"name": name, "stride": int(stride), "shape": tuple(maps.shape[-2:]),
                    "indices": indices.tolist(), "maps": maps[indices].numpy()})
    return out


def anchor_view(model: MaskRCNN, trace: dict, target: dict) -> dict:
    """Every anchor's training label, from the model's own ``rpn.label_anchors``.

    target: the training target (boxes in training-input pixels). Returns:
        levels: per level ``name``, ``stride``, ``anchor_size``, ``shape`` (Hi, Wi), ``positive``,
            ``negative``, ``ignored`` counts and ``status`` ``(Hi, Wi)`` int: 1 where an anchor of the
            location is positive, else -1 where one is ignored, else 0 (all negative);
        sampled, positive_fraction: how many labelled anchors the RPN loss samples, and at most which share
            of them positive;
        total, positive, negative, ignored: anchor counts over all levels;
        positive_anchors: ``(n, 4)`` xyxy;
        location: the location whose anchor best overlaps the largest instance: ``instance``, ``level``
            (index), ``cell`` (x, y) on that level, ``anchors`` ``(A, 4)``, ``labels`` ``(A,)`` in {1, 0, -1},
            ``ious`` ``(A,)`` the highest IoU of each anchor with any instance, ``instances`` ``(A,)`` that
            instance, ``aspect_ratios`` (height / width).
    """
    feature_shapes = [tuple(f.shape[-2:]) for f in trace["features"]]
    device = trace["features"][0].device
    anchors = model.rpn.anchor_generator(feature_shapes, trace["padded_size"], device)
    all_anchors = torch.cat(anchors)
    labels = model.rpn.label_anchors(all_anchors, [_on(target, device)])[0][0].cpu()  # (1, T) -> (T,)
    per_location = model.rpn.anchor_generator.num_anchors_per_location
    levels = []
    for name, stride, size, (hi, wi), level_labels in zip(
            level_names(model), model.fpn.strides, model.rpn.anchor_generator.sizes, feature_shapes,
            labels.split([len(a) for a in anchors])):
        grid = level_labels.view(hi, wi, per_location)  # (Hi*Wi*A,) -> (Hi, Wi, A), the order of anchors.py
        status = torch.where((grid == 1).any(-1), 1, torch.where((grid == -1).any(-1), -1, 0))
        levels.append({"name": name, "stride": int(stride), "anchor_size": int(size), "shape": (hi, wi),
                       "positive": int((level_labels == 1).sum()), "negative": int((level_labels == 0).sum()),
                       "ignored": int((level_labels == -1).sum()), "status": status.numpy()})
    gt_boxes = target["boxes"].to(device)
    instance = int(box_area(gt_boxes).argmax())
    ious = box_iou(gt_boxes[instance:instance + 1], all_anchors)[0]
    best = int(ious.argmax())
    offsets = np.cumsum([0] + [len(a) for a in anchors])  # first anchor index of each level
    level = int(np.searchsorted(offsets, best, side="right")) - 1
    cell = (best - int(offsets[level])) // per_location
    first = int(offsets[level]) + cell * per_location
    wi = feature_shapes[level][1]
    best_ious, best_instances = box_iou(gt_boxes, all_anchors[first:first + per_location]).max(dim=0)  # (M, A) -> (A,)
    return {
        "sampled": model.rpn.batch_size_per_image, "positive_fraction": model.rpn.positive_fraction,
        "levels": levels, "total": len(labels), "positive": int((labels == 1).sum()),
        "negative": int((labels == 0).sum()), "ignored": int((labels == -1).sum()),
        "positive_anchors": all_anchors[labels.to(device) == 1].cpu(),
        "location": {"instance": instance, "level": level, "cell": (cell % wi, cell // wi),
                     "anchors": all_anchors[first:first + per_location].cpu(),
                     "labels": labels[first:first + per_location], "ious": best_ious.cpu(),
                     "instances": best_instances.cpu(),
                     "aspect_ratios": list(model.rpn.anchor_generator.aspect_ratios)},
    }


def proposal_view(model: MaskRCNN, trace: dict, image_size: Tuple[int, int], *, top: int = 20) -> dict:
    """The ``top`` highest-objectness proposals before NMS (anchors decoded by ``rpn.box_coder``, clipped to
    the image) and after it (the RPN's output); boxes ``(top, 4)`` xyxy training-input pixels. Also the
    counts: ``anchors`` T, ``pre_nms`` candidates kept by the per-level top-k, ``post_nms`` proposals; and
    the RPN's ``nms_thresh``."""
    feature_shapes = [tuple(f.shape[-2:]) for f in trace["features"]]
    device = trace["features"][0].device
    anchors = model.rpn.anchor_generator(feature_shapes, trace["padded_size"], device)
    # (1, A, Hi, Wi) -> (Hi, Wi, A) -> (Hi*Wi*A,): the anchor order of anchors.py
    logits = torch.cat([x[0].permute(1, 2, 0).reshape(-1) for x in trace["rpn_logits"]])
    # (1, 4A, Hi, Wi) -> (A, 4, Hi, Wi) -> (Hi, Wi, A, 4) -> (Hi*Wi*A, 4)
    deltas = torch.cat([x[0].view(-1, 4, *x.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
                        for x in trace["rpn_deltas"]])
    best = logits.topk(min(top, len(logits))).indices
    before = model.rpn.box_coder.decode(deltas[best].float(), torch.cat(anchors)[best])[:, 0]  # (k, 1, 4) -> (k, 4)
    pre_topk = model.rpn.pre_nms_topk[0]
    return {"before_nms": clip_boxes_to_image(before, image_size).cpu(),
            "before_scores": torch.sigmoid(logits[best].float()).cpu(),
            "after_nms": trace["proposals"][:top].cpu(),
            "anchors": len(logits), "pre_nms": sum(min(pre_topk, len(a)) for a in anchors),
            "post_nms": len(trace["proposals"]), "nms_thresh": float(model.rpn.nms_thresh)}


def mask_view(model: MaskRCNN, trace: dict, target: dict) -> dict:
    """The mask head's training signal for every positive RoI of the traced step.

    Each positive RoI crops the instance the RoI ``matcher`` assigns it (``match_boxes``), and
    ``mask_targets`` turns the crop into an ``S x S`` target. Returns:
        mask_rois: per positive RoI ``box`` (4,) xyxy, ``instance`` index, ``label`` 1..K, ``iou`` with the
            instance's box, ``level`` (pyramid level k of Pk that RoIAlign read), ``target`` ``(S, S)``
            float 0-1, ``logits`` ``(S, S)`` of the instance's class channel, ``probs`` their sigmoid,
            ``bce`` ``(S, S)`` per-cell binary cross-entropy, ``loss`` its mean, ``cells`` S * S;
        mask_loss: ``mask_loss`` on all of them (equals the model's ``loss_mask``);
        mask_logits: ``(P, K, S, S)`` the mask head's logits (``mask_loss`` reads each RoI's class channel);
        mask_matched, mask_classes: ``(P,)`` int64 instance index and label of each RoI.
    """
    boxes = trace["positive_boxes"]
    logits = trace["mask_logits"]
    gt_boxes = target["boxes"].to(boxes)
    matched = match_boxes(model.roi_heads.matcher, gt_boxes, boxes)  # (P,), >= 0: positives match by definition
    classes = target["labels"].to(boxes.device)[matched]
    targets = mask_targets([target["masks"]], [boxes], [matched], logits.shape[-1])
    class_logits = logits_of_class(logits, classes)  # (P, K, S, S) -> (P, S, S)
    loss = float(mask_loss(class_logits, targets))
    pooler = model.roi_heads.mask_pooler
    levels = assign_levels(boxes, min_level=pooler.min_level, max_level=pooler.max_level,
                           canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level)
    probs = mask_probs_of_class(logits, classes)
    bce = F.binary_cross_entropy_with_logits(class_logits.float(), targets, reduction="none")
    ious = box_iou(boxes, gt_boxes)[torch.arange(len(boxes), device=boxes.device), matched]
    rois = [{"box": boxes[i].cpu(), "instance": int(matched[i]), "label": int(classes[i]), "iou": float(ious[i]),
             "level": int(levels[i]) + pooler.min_level, "target": targets[i].cpu(), "logits": class_logits[i].cpu(),
             "probs": probs[i].cpu(), "bce": bce[i].cpu(), "loss": float(bce[i].double().mean()),
             "cells": int(bce[i].numel())} for i in range(len(boxes))]
    return {"mask_rois": rois, "mask_loss": loss, "mask_logits": logits.cpu(), "mask_matched": matched.cpu(),
            "mask_classes": classes.cpu()}


def pick_rois(rois: List[dict], count: int) -> List[int]:
    """Indices of up to ``count`` RoIs to show: for each instance in turn, its positive RoI of lowest IoU
    (the most offset box still trained as that instance), then the rest by decreasing IoU."""
    chosen = []
    for instance in sorted({r["instance"] for r in rois}):
        candidates = [i for i, r in enumerate(rois) if r["instance"] == instance]
        chosen.append(min(candidates, key=lambda i: rois[i]["iou"]))
    rest = sorted((i for i in range(len(rois)) if i not in chosen), key=lambda i: -rois[i]["iou"])
    return (chosen + rest)[:count]


def gradient_view(model: MaskRCNN, trace: dict, rois: List[dict]) -> List[dict]:
    """Per pooled level: ``name``, ``stride``, ``magnitude`` ``(Hi, Wi)`` the channel sum of
    |d loss_mask / d Pk|, and ``rois`` the indices of the positive RoIs that RoIAlign read from it."""
    out = []
    for name, stride, grad in zip(level_names(model), model.fpn.strides, trace["feature_grads"]):
        level = int(np.log2(stride))
        out.append({"name": name, "stride": int(stride), "magnitude": grad[0].abs().sum(0).float().cpu().numpy(),
                    "rois": [i for i, r in enumerate(rois) if r["level"] == level]})
    return out


# ---------------------------------------------------------------------------------------------------------
# The inference view
# ---------------------------------------------------------------------------------------------------------

def inference_view(model: MaskRCNN, image: Tensor, target: dict, *, class_names: Sequence[str],
                   score_thresh: float) -> dict:
    """Inference on one image at its file size, as :func:`maskrcnn.inference.detect` runs it (at the model's
    own precision).

    image: ``(3, H, W)`` float 0-1 RGB on the model's device; target: its dataset target (file pixels).
    Returns ``image`` ``(H, W, 3)`` uint8, ``instances`` (:class:`maskrcnn.structures.Instances`, masks
    pasted), ``mask_probs`` ``(D, S, S)`` the head's probabilities (the same forward with
    ``mask_format="probs"``) in the order of ``instances``, ``gt_masks`` ``(M, H, W)`` bool, ``gt_labels`` ``(M,)``, ``best_iou`` ``(M,)``: per
    instance, the highest mask IoU (pycocotools) with a detection scoring at least ``score_thresh``, and
    ``image_id``.
    """
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():  # no autograd graph for either forward
            instances = detect(model, [image], class_names=class_names)[0]
            with autocast(model.precision, image.device):
                mask_probs = model([image], mask_format="probs")[0]["mask_probs"].cpu()  # unpasted
    finally:
        model.train(was_training)
    gt_masks = bitmaps(target["masks"])
    kept = instances.filter(score_thresh)
    if len(kept) and len(gt_masks):
        ious = mask_utils.iou(encode_masks(kept.masks), encode_masks(gt_masks), [0] * len(gt_masks))
        best_iou = np.asarray(ious).reshape(len(kept), len(gt_masks)).max(axis=0)
    else:
        best_iou = np.zeros(len(gt_masks))
    return {"image": to_uint8(image), "instances": instances, "mask_probs": mask_probs,
            "gt_masks": gt_masks, "gt_labels": target["labels"].cpu(), "best_iou": best_iou,
            "image_id": target.get("image_id")}


# ---------------------------------------------------------------------------------------------------------
# Everything for one image
# ---------------------------------------------------------------------------------------------------------

def explain(model: MaskRCNN, image: Tensor, target: dict, *, class_names: Sequence[str],
            train_size: Optional[Tuple[int, int]] = None, heldout: Optional[Tuple[Tensor, dict]] = None,
            log_records: Sequence[dict] = (), eval_metrics: Optional[dict] = None,
            score_thresh: float = DISPLAY_SCORE_THRESH, num_rois: int = 4, seed: int = 0,
            image_label: str = "explained image") -> dict:
    """All the numbers the figures show, for one annotated image.

    model: the trained model (left unchanged, in the mode it came in). image: ``(3, H0, W0)`` float 0-1
    RGB at its file size; target: its dataset target (see :class:`maskrcnn.data.coco.CocoDetection`).
    train_size: the training resize, (shortest side, longest side at most) in pixels (see
    :func:`training_input`); default the model's inference size.
    heldout: an image and target the model never trained on (e.g. from the validation split).
    log_records: the training ``metrics.jsonl`` records; eval_metrics: validation metrics (``segm``, ``bbox``).
    score_thresh: detections drawn and matched to instances score at least this.
    num_rois: positive RoIs shown in the mask-target figure. seed: seeds the RoI and anchor sampling.
    image_label: how the figures name the explained image (e.g. "training image").

    Returns a dict with ``input`` (the training input: ``image`` (H, W, 3) uint8, ``size``, ``boxes``,
    ``labels``, ``masks`` (M, H, W) bool), ``losses`` (the model's training losses on it), ``fpn``
    (:func:`fpn_view`), ``anchors`` (:func:`anchor_view`), ``proposals`` (:func:`proposal_view`), the
    :func:`mask_view` entries, ``shown_rois`` (:func:`pick_rois`), ``counts`` (``positive_rois`` P,
    ``mask_cells`` P * S * S, ``dense_cells`` H * W * K), ``gradients`` (:func:`gradient_view`),
    ``inference`` and ``heldout`` (:func:`inference_view`, ``heldout`` None without one),
    ``curve`` (training records with ``total_loss``) and ``validation`` (latest validation metrics or None).
    """
    if len(class_names) != model.num_classes:
        raise InputError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
    device = next(model.parameters()).device
    train_size = (model.min_size, model.max_size) if train_size is None else train_size
    train_image, train_target = training_input(image, target, train_size)
    train_image = train_image.to(device)
    trace = trace_training_step(model, train_image, train_target, seed=seed)
    height, width = train_image.shape[-2:]
    result = {
        "class_names": list(class_names), "image_id": target.get("image_id"),
        "original_size": tuple(int(s) for s in image.shape[-2:]),
        "input": {"image": to_uint8(train_image), "size": (int(height), int(width)),
                  "boxes": train_target["boxes"].cpu(), "labels": train_target["labels"].cpu(),
                  "masks": bitmaps(train_target["masks"])},
        "losses": trace["losses"],
        "fpn": fpn_view(model, trace),
        "anchors": anchor_view(model, trace, train_target),
        "proposals": proposal_view(model, trace, (int(height), int(width))),
        **mask_view(model, trace, train_target),
    }
    side = trace["mask_logits"].shape[-1]
    result["shown_rois"] = pick_rois(result["mask_rois"], num_rois)
    result["counts"] = {"positive_rois": len(result["mask_rois"]), "mask_side": int(side),
                        "mask_cells": len(result["mask_rois"]) * side * side,
                        "dense_cells": int(height) * int(width) * model.num_classes}
    result["gradients"] = gradient_view(model, trace, result["mask_rois"])
    result["inference"] = inference_view(model, image.to(device), target, class_names=class_names,
                                         score_thresh=score_thresh)
    result["heldout"] = (inference_view(model, heldout[0].to(device), heldout[1], class_names=class_names,
                                        score_thresh=score_thresh) if heldout is not None else None)
    result["score_thresh"] = score_thresh
    result["image_label"] = image_label
    result["mask_threshold"] = float(model.mask_threshold)
    result["curve"] = [r for r in log_records if "total_loss" in r]
    evals = [r for r in log_records if isinstance(r.get("segm"), dict)]
    result["validation"] = eval_metrics if eval_metrics is not None else (evals[-1] if evals else None)
    return result


def _on(target: dict, device) -> dict:
    """The target with its box tensors on ``device``."""
    return {k: (v.to(device) if k in ("boxes", "labels", "crowd_boxes") else v) for k, v in target.items()}


def bitmaps(masks) -> Tensor:
    """BitMasks / PolygonMasks -> ``(M, H, W)`` bool tensor on the CPU."""
    return (masks if isinstance(masks, BitMasks) else masks.to_bitmasks()).tensor.cpu()


def to_uint8(image: Tensor) -> np.ndarray:
    """``(3, H, W)`` float 0-1 -> ``(H, W, 3)`` uint8."""
    return (image.detach().permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
