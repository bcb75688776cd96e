"""Inference post-processing: detection selection, and mapping detections back to the original image.

Shorthand: N images, R proposals of the batch, K object classes, C candidates (proposal, class), D detections,
S = 28 mask side.
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
from torch import Tensor

from ..config import ModelConfig, RoIHeadsConfig
from ..rle import encode_mask_regions
from .paste import paste_mask_regions, paste_masks_in_image
from .selection import SKIP, best_per_group, clip_to_images, grouped_nms, rank_within_group

# What becomes of the S x S mask probabilities (see to_original_image); predictors return masks in all of
# them but "probs", which Instances do not hold.
MASK_FORMATS = ("bitmap", "rle", "probs", "none")


def select_detections(boxes: Tensor, scores: Tensor, image_index: Tensor, image_sizes: Tensor, *,
                      score_thresh: float, nms_thresh: float, topk: int) -> Dict[str, Tensor]:
    """Per-class candidates of a whole batch -> its final detections, without loops over images.

    boxes: (R, K, 4) per-class decoded boxes of the R proposals of the batch, xyxy pixels of the resized
    input; scores: (R, K+1) softmax probabilities with background at index 0; image_index: (R,) int64 image
    of each proposal; image_sizes: (N, 2) int64 (h, w) of each resized image, for clipping.
    Every (proposal, class) pair scoring at least ``score_thresh`` is a candidate; candidates under 0.01 px
    are dropped; NMS runs per (image, class); the ``topk`` best of each image survive.
    Returns ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) int64 in 1..K and ``image_index`` (D,) int64,
    grouped by ascending image, highest score first within an image.

    NMS puts the classes on the batch axis of :func:`~maskrcnn.modeling.selection.grouped_nms` and the images
    on its class axis (each image scoring only its own proposals), so that no image's candidates meet
    another's. Eagerly, NMS first runs on each image's best ``4 * topk`` candidates only, growing fourfold
    until ``topk`` of them survive or all are in: greedy NMS settles a candidate by the higher-scoring
    candidates of its group alone, so this keeps exactly what NMS over all candidates keeps among the best.
    """
    num_images = image_sizes.shape[0]
    boxes = clip_to_images(boxes, image_sizes[image_index][:, None, :])
    probs = scores[:, 1:]
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    roi, cls = torch.nonzero((probs >= score_thresh) & (widths >= 1e-2) & (heights >= 1e-2)).unbind(1)
    image, score = image_index[roi], probs[roi, cls]
    if torch.jit.is_tracing():  # a graph has no early exit: NMS over every candidate
        keep = _nms_per_image_and_class(boxes, roi, cls, image, score, num_images, nms_thresh)
    else:
        rank, count = rank_within_group(score, image, num_images), 4 * topk
        while True:
            taken = torch.nonzero(rank < count)[:, 0]
            keep = taken[_nms_per_image_and_class(boxes, roi[taken], cls[taken], image[taken], score[taken],
                                                  num_images, nms_thresh)]
            if _enough(image[keep], image, count, num_images, topk):
                break
            count *= 4
    keep = torch.sort(keep).values  # candidate order (proposal, then class): equal scores rank as torchvision's
    keep = keep[best_per_group(score[keep], image[keep], num_images, topk)]
    return {"boxes": boxes[roi[keep], cls[keep]], "scores": score[keep], "labels": cls[keep] + 1,
            "image_index": image[keep]}


def _nms_per_image_and_class(boxes: Tensor, roi: Tensor, cls: Tensor, image: Tensor, score: Tensor,
                             num_images: Union[int, Tensor], iou_threshold: float) -> Tensor:
    """NMS within each (image, class) of C candidates: boxes (R, K, 4); roi, cls, image (C,) int64 and
    score (C,) of each candidate -> (M,) int64 indices of the surviving candidates.

    The K classes are the NMS batch axis (entry k holds every proposal's class-k box) and the images its
    class axis: a candidate is scored in its own (class, image) slot, every other slot is skipped.
    """
    num_rois, num_classes = boxes.shape[0], boxes.shape[1]
    slots = torch.full((num_classes * num_images * num_rois,), SKIP, dtype=score.dtype, device=score.device)
    slots = slots.scatter(0, (cls * num_images + image) * num_rois + roi, score)
    nms_scores = slots.view(num_classes, num_images, num_rois)  # (K, N, R)
    kept_cls, kept_image, kept_roi = grouped_nms(boxes.transpose(0, 1), nms_scores, iou_threshold).unbind(1)
    # Back from (class, image, proposal) to the candidate: each (proposal, class) is one candidate at most.
    candidate = torch.full((num_classes * num_rois,), -1, dtype=torch.int64, device=roi.device)
    candidate = candidate.scatter(0, cls * num_rois + roi, torch.arange(roi.shape[0], device=roi.device))
    return candidate[kept_cls * num_rois + kept_roi]


def _enough(kept_image: Tensor, image: Tensor, count: int, num_images: int, topk: int) -> bool:
    """Whether NMS over each image's best ``count`` candidates settles its ``topk`` best survivors: every
    image has ``topk`` survivors (kept_image, (M,) int64) or no candidate beyond the ``count`` taken (image,
    (C,) int64 image of every candidate)."""
    survivors = torch.bincount(kept_image, minlength=num_images)
    candidates = torch.bincount(image, minlength=num_images)
    return bool(((survivors >= topk) | (candidates <= count)).all())


def rescale_boxes(boxes: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tensor:
    """(D, 4) xyxy pixels of an image of ``from_size`` (h, w) -> pixels of an image of ``to_size``."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32) / torch.tensor(from_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32) / torch.tensor(from_size[1], dtype=torch.float32)
    scale = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(boxes)
    return boxes * scale


def to_original_image(result: Dict[str, Tensor], resized_size: Tuple[int, int], original_size: Tuple[int, int],
                      *, mask_format: str = "bitmap", mask_threshold: float = RoIHeadsConfig.mask_threshold,
                      memory_mb: int = ModelConfig.paste_memory_mb) -> Dict[str, object]:
    """Map one image's detections from the resized input back to the original image.

    result: ``boxes`` (D, 4) in resized pixels, ``scores``, ``labels``, ``mask_probs`` (D, S, S).
    mask_format: what becomes of the S x S mask probabilities, each resized to its box in the H x W
        original image and thresholded at ``mask_threshold``:
        "bitmap": ``masks`` (D, H, W) bool;
        "rle": ``masks`` as D COCO RLE dicts, encoded from each box's region (no full-image canvas);
        "probs": the unpasted ``mask_probs`` (D, S, S) float;
        "none": no mask entry.
    memory_mb: budget of the chunked paste.
    Returns ``boxes`` (D, 4) xyxy in original pixels, ``scores``, ``labels`` and the mask entry.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    probs = result["mask_probs"]
    out = {"boxes": rescale_boxes(result["boxes"], resized_size, original_size),
           "scores": result["scores"], "labels": result["labels"]}
    if mask_format == "bitmap":
        out["masks"] = paste_masks_in_image(probs, out["boxes"], original_size, threshold=mask_threshold,
                                            memory_mb=memory_mb)
    elif mask_format == "rle":
        regions = paste_mask_regions(probs, out["boxes"], original_size, threshold=mask_threshold,
                                     memory_mb=memory_mb)
        out["masks"] = encode_mask_regions(regions, original_size)
    elif mask_format == "probs":
        out["mask_probs"] = probs
    return out
