"""Tiled inference: an image far larger than the model's input size, detected tile by tile.

Shorthand: H x W the full image (pixels), T the tile side, O the overlap of neighbouring tiles, D the
detections of all tiles, G the merged detections, S the side of a predicted mask (28).

1. :func:`tile_grid`: T x T tiles (narrower where the image is) starting every T - O pixels, the last one
   flush with the image's right / bottom edge, so every pixel is covered and neighbours share O pixels.
2. Tiles go through the model in batches of ``tiles_per_batch``; each tile's detections come back with
   their S x S mask probabilities (``mask_format="probs"``: nothing is pasted yet) and their boxes are
   shifted into full-image pixels. The model resizes each tile as it would any input.
3. :func:`merge_tile_detections`: greedy merging across tiles. In score order, a detection starts a group,
   and the group takes in every detection of the same label, from a tile the group has no piece from,
   whose box matches a member's box inside the area their two tiles share (IoU of the two boxes clipped to
   that area at least ``merge_thresh``). Inside the shared area both tiles see the same pixels, so the
   pieces of one object agree there whether a border cuts it or not, while distinct objects do not; an
   object seen whole by two tiles, or cut by borders into pieces, becomes one detection: box the union,
   score the highest, mask the union of the pieces' masks. Pieces that meet the shared area only in a
   sliver may fail to match: choose an overlap that a typical object's piece fills.
4. Each group's pieces are pasted over their own boxes only
   (:func:`~maskrcnn.modeling.paste.paste_mask_regions`), OR-ed into one region over the group's box and
   encoded as COCO RLE: there is never a full-size canvas per detection. Peak memory is that of one
   batch of tiles through the model, plus the largest group's box region and the paste budget
   (``model.paste_memory_mb``); the S x S probabilities of all detections wait for the merge (3 KiB each).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from maskrcnn.errors import InputError
from maskrcnn.modeling.maskrcnn import MaskRCNN
from maskrcnn.modeling.paste import paste_mask_regions
from maskrcnn.precision import autocast
from maskrcnn.rle import encode_mask_regions
from maskrcnn.structures import Instances

TILED_MASK_FORMATS = ("rle", "none")


def tile_grid(image_size: Tuple[int, int], tile_size: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """Tiles covering an image: ``(x0, y0, x1, y1)`` pixel bounds (x1, y1 exclusive), row by row.

    image_size: ``(H, W)``. tile_size: T >= 1. overlap: O in [0, T). An image side at most T gets one tile.
    """
    if tile_size < 1 or not 0 <= overlap < tile_size:
        raise InputError(f"tiles need tile_size >= 1 and 0 <= tile_overlap < tile_size, got {tile_size}, {overlap}")

    def starts(length: int) -> List[int]:
        if length <= tile_size:
            return [0]
        step = tile_size - overlap
        out = list(range(0, length - tile_size, step))
        return out + [length - tile_size]

    height, width = image_size
    return [(x, y, min(x + tile_size, width), min(y + tile_size, height))
            for y in starts(height) for x in starts(width)]


def _clipped_iou(box: Tensor, boxes: Tensor, regions: Tensor) -> Tensor:
    """``(C,)`` IoU of ``box`` (4,) and each of ``boxes`` (C, 4), both clipped to the matching ``regions`` (C, 4);
    0 where either clipped box is empty. All xyxy pixels."""
    a = torch.cat([torch.maximum(box[:2], regions[:, :2]), torch.minimum(box[2:], regions[:, 2:])], 1)
    b = torch.cat([torch.maximum(boxes[:, :2], regions[:, :2]), torch.minimum(boxes[:, 2:], regions[:, 2:])], 1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    union = area_a + area_b - inter
    return torch.where((area_a > 0) & (area_b > 0), inter / union.clamp(min=1e-6), torch.zeros_like(union))


def merge_tile_detections(boxes: Tensor, scores: Tensor, labels: Tensor, tiles: Tensor, tile_boxes: Tensor,
                          merge_thresh: float = 0.5) -> List[List[int]]:
    """Group the detections of all tiles into objects (step 3 of the module docstring).

    boxes: ``(D, 4)`` float xyxy in full-image pixels; scores: ``(D,)``; labels: ``(D,)`` int64;
    tiles: ``(D,)`` int64, the tile each detection came from; tile_boxes: ``(T, 4)`` float xyxy of the tiles.
    merge_thresh: in (0, 1], the IoU two detections must reach inside the area their tiles share.
    Returns the groups as lists of detection indices, the group's top scorer first, groups by that score.
    """
    # tiles sharing an area with each tile, and the detections of each tile
    wh = (torch.minimum(tile_boxes[:, None, 2:], tile_boxes[None, :, 2:])
          - torch.maximum(tile_boxes[:, None, :2], tile_boxes[None, :, :2])).clamp(min=0)  # (T, T, 2)
    touching = (wh.prod(2) > 0) & ~torch.eye(len(tile_boxes), dtype=torch.bool)
    neighbours = [torch.nonzero(row, as_tuple=False)[:, 0].tolist() for row in touching]
    by_tile: Dict[int, Tensor] = {}
    for tile in torch.unique(tiles).tolist():
        by_tile[tile] = torch.nonzero(tiles == tile, as_tuple=False)[:, 0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    free = torch.ones(len(order), dtype=torch.bool)
    groups = []
    for first in order:
        if not free[first]:
            continue
        free[first] = False
        group, group_tiles = [first], {int(tiles[first])}
        checked = 0
        while checked < len(group):  # every member, new ones included, may pull in more pieces
            member = group[checked]
            checked += 1
            pools = [by_tile[t] for t in neighbours[int(tiles[member])] if t in by_tile and t not in group_tiles]
            if not pools:
                continue
            candidates = torch.cat(pools)
            candidates = candidates[free[candidates] & (labels[candidates] == labels[first])]
            if not len(candidates):
                continue
            region_a, region_b = tile_boxes[tiles[member]], tile_boxes[tiles[candidates]]
            shared = torch.cat([torch.maximum(region_a[:2], region_b[:, :2]),
                                torch.minimum(region_a[2:], region_b[:, 2:])], 1)
            iou = _clipped_iou(boxes[member], boxes[candidates], shared)
            for i in candidates[iou >= merge_thresh].tolist():
                if int(tiles[i]) in group_tiles:  # one piece per tile: a tile's own detections are separate
                    continue
                free[i] = False
                group.append(i)
                group_tiles.add(int(tiles[i]))
        groups.append(group)
    return groups


def _merged_masks(groups: List[List[int]], mask_probs: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                  threshold: float, memory_mb: float) -> List[dict]:
    """COCO RLE per group of the union of its pieces' masks, each piece's ``(S, S)`` probabilities pasted
    over its box only (one chunked paste over all pieces, group after group)."""
    flat = torch.tensor([i for group in groups for i in group], dtype=torch.int64)
    regions = paste_mask_regions(mask_probs[flat], boxes[flat], image_size, threshold=threshold, memory_mb=memory_mb)
    out = []
    for group in groups:
        pieces = [next(regions) for _ in group]
        nonempty = [(x, y, region) for x, y, region in pieces if region.numel()]
        if len(nonempty) <= 1:
            out.extend(encode_mask_regions(nonempty or pieces[:1], image_size))
            continue
        pieces = nonempty
        x0, y0 = min(x for x, _, _ in pieces), min(y for _, y, _ in pieces)
        x1 = max(x + region.shape[1] for x, _, region in pieces)
        y1 = max(y + region.shape[0] for _, y, region in pieces)
        union = torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
        for x, y, region in pieces:
            union[y - y0:y - y0 + region.shape[0], x - x0:x - x0 + region.shape[1]] |= region.cpu()
        out.extend(encode_mask_regions([(x0, y0, union)], image_size))
    return out


@torch.inference_mode()
def detect_tiled(model: MaskRCNN, image: Tensor, *, class_names: Sequence[str], tile_size: int, tile_overlap: int,
                 tiles_per_batch: int = 4, mask_format: str = "rle", precision: Optional[str] = None,
                 merge_thresh: float = 0.5, label_to_cat_id: Optional[Dict[int, int]] = None) -> Instances:
    """Detect instances in one large image tile by tile (see the module docstring).

    model: an eval-mode :class:`~maskrcnn.modeling.maskrcnn.MaskRCNN` (or any module with its inference
        interface: ``model(images, mask_format="probs")`` -> per image ``boxes``, ``scores``, ``labels``,
        ``mask_probs``, and ``num_classes``, ``mask_threshold``, ``paste_memory_mb``, ``precision`` attributes).
    image: ``(3, H, W)`` float RGB in 0-1 on the model's device.
    class_names: the name of each label 1..K. tile_size, tile_overlap: T and O, pixels of ``image``.
    tiles_per_batch: tiles per forward pass (memory grows with it).
    mask_format: "rle" (COCO RLE per merged detection) or "none".
    precision: "fp32", "bf16" for a bfloat16 autocast forward, or "auto" (bf16 where native, see
        :mod:`maskrcnn.precision`); None, the default, is the model's own ``precision``.
    merge_thresh: IoU inside their tiles' shared area from which detections of two tiles are one object.
    Returns one :class:`~maskrcnn.structures.Instances` on the CPU, in full-image pixels, by score.
    """
    if mask_format not in TILED_MASK_FORMATS:
        raise InputError(f"tiled inference returns masks as {TILED_MASK_FORMATS} (a full-size bitmap per "
                         f"detection is what tiling avoids), got mask_format={mask_format!r}")
    if tiles_per_batch < 1:
        raise InputError(f"tiles_per_batch must be at least 1, got {tiles_per_batch}")
    if not 0 < merge_thresh <= 1:
        raise InputError(f"merge_thresh must be in (0, 1], got {merge_thresh}")
    if len(class_names) != model.num_classes:
        raise InputError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
    if image.dim() != 3 or image.shape[0] != 3:
        raise InputError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    precision = model.precision if precision is None else precision
    image_size = (int(image.shape[1]), int(image.shape[2]))
    tiles = tile_grid(image_size, tile_size, tile_overlap)
    boxes, scores, labels, probs, tile_ids = [], [], [], [], []
    for start in range(0, len(tiles), tiles_per_batch):
        batch = tiles[start:start + tiles_per_batch]
        crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in batch]
        with autocast(precision, image.device):
            outputs = model(crops, mask_format="probs")
        for tile_id, (x0, y0, _, _), output in zip(range(start, start + len(batch)), batch, outputs):
            shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            boxes.append(output["boxes"].float().cpu() + shift)
            scores.append(output["scores"].float().cpu())
            labels.append(output["labels"].cpu())
            probs.append(output["mask_probs"].float().cpu())
            tile_ids.append(torch.full((len(output["boxes"]),), tile_id, dtype=torch.int64))
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    probs, tile_ids = torch.cat(probs), torch.cat(tile_ids)
    groups = merge_tile_detections(boxes, scores, labels, tile_ids, torch.tensor(tiles, dtype=torch.float32),
                                   merge_thresh)
    first = torch.tensor([group[0] for group in groups], dtype=torch.int64)
    merged_boxes = torch.stack([torch.cat([boxes[g, :2].amin(0), boxes[g, 2:].amax(0)]) for g in groups]) \
        if groups else torch.zeros(0, 4)
    masks = None
    if mask_format == "rle":
        masks = _merged_masks(groups, probs, boxes, image_size, model.mask_threshold, model.paste_memory_mb)
    merged_labels = labels[first]
    return Instances(boxes=merged_boxes, scores=scores[first], labels=merged_labels,
                     class_names=[class_names[label - 1] for label in merged_labels.tolist()], masks=masks,
                     image_size=image_size, label_to_cat_id=label_to_cat_id)
