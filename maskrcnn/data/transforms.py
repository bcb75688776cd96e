"""Training augmentation: resize to a random shortest side, horizontal flip.

Every transform is called as ``transform(image, target, rng)`` and returns ``(image, target)``:
- image: ``(H, W, 3)`` RGB numpy array of values in 0-255: uint8 as read, float32 once resized;
- target: the dict of :class:`maskrcnn.data.coco.CocoDetection` (``boxes`` and ``crowd_boxes`` ``(M, 4)``
  / ``(C, 4)`` float32 xyxy pixels of ``image``, ``masks`` in ``image``'s size, ...); a new dict is
  returned, the input is not modified;
- rng: ``np.random.Generator``, the only source of randomness, so that a sample's augmentation is fixed by
  its seed.
Evaluation needs no transform: the model resizes its inputs itself.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch

from maskrcnn.errors import InputError
from maskrcnn.config import Config, DataConfig


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
    """Training: resize to one of ``cfg.model.input.min_size`` (capped by ``max_size``), then flip with
    ``cfg.data.flip_prob``. Evaluation: nothing (the model resizes)."""
    if not train:
        return Compose([])
    return Compose([ResizeShortestEdge(cfg.model.input.min_size, cfg.model.input.max_size),
                    RandomHorizontalFlip(cfg.data.flip_prob)])


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, 4)`` xyxy boxes mirrored in an image ``width`` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
