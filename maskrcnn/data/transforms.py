"""Training augmentation: resize to a random shortest side or large-scale jitter, horizontal flip.

Shorthand: M instances, C crowd regions, H, W the image's height and width in pixels, S the side of the
large-scale jitter's square.

Every transform is called as ``transform(image, target, rng)`` and returns ``(image, target)``:
- image: ``(H, W, 3)`` RGB numpy array of values in 0-255: uint8 as read, float32 once resized;
- target: the dict of :class:`maskrcnn.data.coco.CocoDetection` (``boxes`` and ``crowd_boxes`` ``(M, 4)``
  / ``(C, 4)`` float32 xyxy pixels of ``image``, ``masks`` in ``image``'s size, ...); a new dict is
  returned, the input is not modified;
- rng: ``np.random.Generator``, the only source of randomness, so that a sample's augmentation is fixed by
  its seed.
The model trains on its inputs at the size they come, so the training resize is the transforms' (the
shortest-side resize, or large-scale jitter instead of it); evaluation needs no transform: the model
resizes its inputs itself. Copy-paste, which reads a second image, is in :mod:`maskrcnn.data.copy_paste`.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor

from maskrcnn.errors import InputError
from maskrcnn.config import Config, DataConfig
from maskrcnn.structures import BitMasks, PolygonMasks


class ResizeShortestEdge:
    """Scale the image so that its shorter side is a size drawn from ``min_sizes`` (pixels), unless its
    longer side would then exceed ``max_size``, in which case the longer side becomes ``max_size``. Sides
    are rounded down, as :func:`maskrcnn.modeling.maskrcnn.resize_image` and torchvision round them.

    The resampling is the inference resize's (``resize_image``: bilinear, pixel centres aligned, no
    antialiasing) and so are the values, to float rounding: OpenCV resamples the image as float32 (its
    uint8 path rounds the weights to 11 bits and every output to an integer: one grey level off the rounded
    inference values in about 12% of them). The resized image is float32, values in 0-255; an image already
    at its size is returned as it is."""

    def __init__(self, min_sizes: Sequence[int], max_size: int):
        if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
            raise InputError(f"expected positive sizes, got min_sizes={list(min_sizes)}, max_size={max_size}")
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
        height, width = image.shape[:2]
        short = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        new_h, new_w = int(height * scale), int(width * scale)  # rounded down, as inference and torchvision
        if (new_h, new_w) == (height, width):
            return image, target
        image = cv2.resize(image.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        factors = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        target = dict(target, boxes=target["boxes"] * factors, crowd_boxes=target["crowd_boxes"] * factors,
                      masks=target["masks"].scale((new_h, new_w)))
        return image, target


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al., 2021; Detectron2's ``ResizeScale`` then ``FixedSizeCrop``): scale
    the image by a random factor, then crop (at a random place) or pad (bottom and right) to a ``size x size``
    square.

    size: the square's side S in pixels. scale_range: ``(low, high)``, the factor ``f`` is uniform in it:
    the image is scaled so that its longer side is ``f * S`` (``f = 1`` fits the whole image in the square;
    sides rounded down, as :class:`ResizeShortestEdge` rounds them). A larger image is cropped to a random
    ``S x S`` window, a smaller one padded with ``pad_value`` (0-255 RGB, three values). Resampling as
    :class:`ResizeShortestEdge`: bilinear, float32. This replaces the shortest-side resize in training: the
    model trains on its inputs at the size they come (it resizes at inference only).

    Masks: bitmaps are resampled at the window only (nearest, pixel centres aligned with the image's),
    polygons are scaled and clipped to the window (Sutherland-Hodgman). Every instance's box is then the
    tight box of its mask's pixels (polygons rasterised by pycocotools), and an instance with no pixel left
    in the square is dropped. Crowd boxes are scaled, clipped to the image inside the square and
    dropped when nothing is left.
    """

    def __init__(self, size: int, scale_range: Sequence[float], pad_value: Sequence[float]):
        if size <= 0:
            raise InputError(f"large-scale jitter needs a positive square side, got {size}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1] < math.inf:
            raise InputError(f"data.scale_jitter must be [low, high] with 0 < low <= high, got {list(scale_range)}")
        if len(pad_value) != 3:
            raise InputError(f"large-scale jitter pads with one value per RGB channel (3), got {list(pad_value)}")
        self.size = int(size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.pad_value = np.asarray(pad_value, dtype=np.float32)

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
        height, width = image.shape[:2]
        size = self.size
        scale = rng.uniform(*self.scale_range) * size / max(height, width)
        new_h, new_w = max(int(height * scale), 1), max(int(width * scale), 1)
        top = int(rng.integers(new_h - size + 1)) if new_h > size else 0
        left = int(rng.integers(new_w - size + 1)) if new_w > size else 0
        # the part of the scaled image inside the square: rows top..top+h-1, columns left..left+w-1
        h, w = min(new_h - top, size), min(new_w - left, size)

        resized = image.astype(np.float32)
        if (new_h, new_w) != (height, width):
            resized = cv2.resize(resized, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        out = np.empty((size, size, 3), dtype=np.float32)
        out[...] = self.pad_value
        out[:h, :w] = resized[top:top + h, left:left + w]

        masks = target["masks"]
        if isinstance(masks, PolygonMasks):
            masks = _window_polygons(masks, (new_h, new_w), (top, left, h, w), size)
            boxes, areas = _polygon_boxes(masks)
            keep = areas > 0
        else:
            masks = _window_bitmasks(masks, (new_h, new_w), (top, left, h, w), size)
            boxes = mask_boxes(masks.tensor)
            keep = masks.tensor.flatten(1).any(1)
        crowd = target["crowd_boxes"] * torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        crowd = (crowd - torch.tensor([left, top] * 2, dtype=torch.float32)).clamp(min=0)
        crowd = torch.minimum(crowd, torch.tensor([w, h] * 2, dtype=torch.float32))
        crowd = crowd[(crowd[:, 2] > crowd[:, 0]) & (crowd[:, 3] > crowd[:, 1])]
        return out, dict(target, boxes=boxes[keep], labels=target["labels"][keep], masks=masks[keep],
                         crowd_boxes=crowd)


class RandomHorizontalFlip:
    """Mirror the image, boxes, crowd boxes and masks left-right with probability ``prob``."""

    def __init__(self, prob: float = DataConfig.flip_prob):
        if not 0.0 <= prob <= 1.0:
            raise InputError(f"flip probability must be in [0, 1], got {prob}")
        self.prob = prob

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
        if rng.random() >= self.prob:
            return image, target
        width = image.shape[1]
        target = dict(target, boxes=_flip_boxes(target["boxes"], width),
                      crowd_boxes=_flip_boxes(target["crowd_boxes"], width), masks=target["masks"].flip())
        return np.ascontiguousarray(image[:, ::-1]), target


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: List):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target


def build_transforms(cfg: Config, train: bool) -> Compose:
    """Training: large-scale jitter to a square of side ``max(cfg.model.input.min_size)`` by a factor in
    ``cfg.data.scale_jitter`` (padding with ``cfg.model.input.pixel_mean``, which the model's normalisation
    turns into 0, as its own batch padding) when that is set, else a resize to one of
    ``cfg.model.input.min_size`` (capped by ``max_size``); then a flip with ``cfg.data.flip_prob``.
    Evaluation: nothing (the model resizes). Copy-paste is added by
    :func:`maskrcnn.data.loader.build_train_dataset`, which has the images to paste from."""
    if not train:
        return Compose([])
    inputs = cfg.model.input
    if cfg.data.scale_jitter:
        resize = LargeScaleJitter(max(inputs.min_size), cfg.data.scale_jitter, [255.0 * m for m in inputs.pixel_mean])
    else:
        resize = ResizeShortestEdge(inputs.min_size, inputs.max_size)
    return Compose([resize, RandomHorizontalFlip(cfg.data.flip_prob)])


def mask_boxes(bits: Tensor) -> Tensor:
    """``(M, H, W)`` bool masks -> ``(M, 4)`` float32 xyxy tight boxes of their set pixels, pixel ``i``
    covering ``[i, i + 1)``; an empty mask gets ``(0, 0, 0, 0)``."""
    height, width = bits.shape[1:]
    rows, cols = bits.any(2).byte(), bits.any(1).byte()  # (M, H), (M, W): the rows and columns a mask touches
    boxes = torch.stack([cols.argmax(1), rows.argmax(1), width - cols.flip(1).argmax(1),
                         height - rows.flip(1).argmax(1)], dim=1).float()
    return boxes * rows.any(1, keepdim=True)


def _polygon_boxes(masks: PolygonMasks) -> Tuple[Tensor, Tensor]:
    """The ``(M, 4)`` float32 xyxy tight boxes (as :func:`mask_boxes`) and ``(M,)`` float32 pixel areas of the
    instances' polygons rasterised by pycocotools in their image; an instance without a polygon gets a zero
    box and area."""
    height, width = masks.image_size
    boxes, areas = np.zeros((len(masks), 4), dtype=np.float32), np.zeros(len(masks), dtype=np.float32)
    for i, instance in enumerate(masks.polygons):
        if instance:
            rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in instance], height, width))
            boxes[i], areas[i] = mask_utils.toBbox(rle), mask_utils.area(rle)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    return torch.from_numpy(boxes), torch.from_numpy(areas)


def _window_bitmasks(masks: BitMasks, scaled_size: Tuple[int, int], window: Tuple[int, int, int, int],
                     size: int) -> BitMasks:
    """Masks scaled to ``scaled_size = (h, w)`` and cut to ``window = (top, left, height, width)`` of it,
    placed at the top left of a ``size x size`` canvas; only the window's pixels are resampled (nearest,
    the source pixel under each output pixel's centre)."""
    top, left, h, w = window
    height, width = masks.image_size
    rows = np.minimum(((np.arange(top, top + h) + 0.5) * (height / scaled_size[0])).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(left, left + w) + 0.5) * (width / scaled_size[1])).astype(np.int64), width - 1)
    out = torch.zeros((len(masks), size, size), dtype=torch.bool)
    out[:, :h, :w] = masks.tensor[:, torch.from_numpy(rows)[:, None], torch.from_numpy(cols)[None, :]]
    return BitMasks(out)


def _window_polygons(masks: PolygonMasks, scaled_size: Tuple[int, int], window: Tuple[int, int, int, int],
                     size: int) -> PolygonMasks:
    """Polygons scaled to ``scaled_size = (h, w)``, shifted to ``window = (top, left, height, width)`` and
    clipped to it, in a ``size x size`` image; a polygon clipped to fewer than 3 vertices is dropped (an
    instance may be left with none)."""
    top, left, h, w = window
    out = []
    for instance in masks.scale(scaled_size).polygons:
        clipped = [_clip_polygon(p.reshape(-1, 2) - (left, top), w, h) for p in instance]
        out.append([p.reshape(-1) for p in clipped if len(p) >= 3])
    return PolygonMasks(out, (size, size))


def _clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """``(P, 2)`` polygon vertices ``x, y`` -> the ``(Q, 2)`` vertices of its part inside ``[0, width] x
    [0, height]`` (Sutherland-Hodgman: one pass per side of the rectangle; a concave polygon cut in two
    keeps both parts, joined along the side)."""
    for axis, bound, sign in ((0, 0.0, 1.0), (0, width, -1.0), (1, 0.0, 1.0), (1, height, -1.0)):
        if len(points) == 0:
            break
        depth = sign * (points[:, axis] - bound)  # (P,) >= 0 inside this side
        following, following_depth = np.roll(points, -1, axis=0), np.roll(depth, -1)
        inside = depth >= 0
        crossing = inside != (following_depth >= 0)  # the edge to the following vertex crosses the side
        t = depth[crossing] / (depth[crossing] - following_depth[crossing])
        candidates = np.stack([points, points], axis=1)  # (P, 2, 2): the vertex, then its edge's crossing
        candidates[crossing, 1] += t[:, None] * (following[crossing] - points[crossing])
        points = candidates[np.stack([inside, crossing], axis=1)]
    return points


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, 4)`` xyxy boxes mirrored in an image ``width`` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
