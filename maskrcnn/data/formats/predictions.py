"""Detections as the shapes an annotation tool shows: the one place that turns :class:`Instances` into
pre-annotations, whatever the tool.

For each image, :func:`predicted_image` drops (and counts in :class:`Dropped`) the detections scoring below
the threshold, those of classes not kept and those whose mask covers no pixel; it turns each kept mask into
a :class:`Shape`: polygons, or the mask itself where polygons would lose a hole or a thin part.

A mask becomes polygons by :func:`outline_polygons`: the outline of each connected part traced along the
pixel edges (vertices on pixel corners, COCO's convention, which labelme, CVAT and Label Studio share:
``(0, 0)`` is the top-left corner of the top-left pixel), simplified by Douglas-Peucker with a tolerance in
pixels. The polygons are kept only when the mask has no hole and, rasterised as pycocotools rasterises
them, they cover the mask with an IoU of at least :data:`POLYGON_MIN_IOU` and no pixel of either lies
farther than the tolerance (plus one pixel) from the other: a part thinner than the tolerance, which
simplification would flatten, keeps the mask however small it is. Otherwise the mask is written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import torch

from maskrcnn.errors import InputError
from maskrcnn.structures import Instances

SIMPLIFY_TOLERANCE = 1.0  # pixels: how far a simplified polygon may stray from the mask's outline
POLYGON_MIN_IOU = 0.98  # polygons stand for a mask only when they cover it at least this well


@dataclass
class Shape:
    """One detection as a tool will show it: ``polygons`` (each ``(P, 2)`` float64 xy pixels of the image,
    vertices on pixel corners; several for a detection of several parts) or, when that list is empty, the
    mask ``crop`` (``(h, w)`` bool) whose top-left pixel is column ``left``, row ``top`` of the image."""

    label: str
    score: float
    polygons: List[np.ndarray]
    crop: Optional[np.ndarray] = None
    left: int = 0
    top: int = 0

    @property
    def is_mask(self) -> bool:
        return not self.polygons


@dataclass
class PredictedImage:
    """One image's shapes; ``path`` the image file, ``height`` x ``width`` its upright size in pixels."""

    path: Path
    height: int
    width: int
    shapes: List[Shape] = field(default_factory=list)


class Dropped:
    """Detections left out, counted by reason (``"below score 0.5"``, ``"class 'dog' not kept"``, ...)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, reason: str, count: int = 1) -> None:
        if count:
            self.counts[reason] += count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> List[str]:
        """One line per reason: ``dropped 3 detections: below score 0.5``."""
        return [f"dropped {count} detection{'s' if count > 1 else ''}: {reason}"
                for reason, count in sorted(self.counts.items())]


def check_classes(classes: Optional[Sequence[str]], class_names: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``classes`` (the ones to keep) as a list, or None for all; InputError naming a class that is not one
    of ``class_names`` (unless that is None: the classes are not known)."""
    if classes is None:
        return None
    unknown = [name for name in classes if class_names is not None and name not in class_names]
    if unknown:
        raise InputError(f"classes to keep {unknown} are not classes of the model {list(class_names)}")
    return list(classes)


def predicted_image(path, instances: Instances, *, dropped: Dropped, score_thresh: Optional[float] = None,
                    keep: Optional[Sequence[str]] = None, tolerance: Optional[float] = None,
                    multipart: bool = True) -> PredictedImage:
    """The shapes of one image's detections.

    path: the image file the detections are of; instances: its detections, masks as a ``(N, H, W)`` bool
        tensor or COCO RLE dicts, in pixels of the upright image.
    score_thresh: detections scoring below are dropped (None: keep what the model returned).
    keep: class names to keep (None: all). tolerance: polygon simplification in pixels (None:
        :data:`SIMPLIFY_TOLERANCE`; 0: the exact pixel outline).
    multipart: polygons may stand for a detection of several parts (tools that group shapes); without it
        such a detection is written as a mask.
    dropped: counts what is left out.
    """
    if instances.masks is None:
        raise InputError(f"{path}: the detections have no masks (pre-annotations are masks or polygons)")
    tolerance = SIMPLIFY_TOLERANCE if tolerance is None else float(tolerance)
    if tolerance < 0:
        raise InputError(f"the polygon simplification tolerance must be >= 0 pixels, got {tolerance:g}")
    height, width = instances.image_size
    image = PredictedImage(Path(path), height, width)
    for i, (score, label) in enumerate(zip(instances.scores.tolist(), instances.class_names)):
        if score_thresh is not None and score < score_thresh:
            dropped.add(f"below score {score_thresh:g}")
            continue
        if keep is not None and label not in keep:
            dropped.add(f"class {label!r} not kept")
            continue
        mask = _mask(instances.masks, i)
        if not mask.any():
            dropped.add("empty mask")
            continue
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        top, left = int(rows[0]), int(cols[0])
        crop = mask[top:rows[-1] + 1, left:cols[-1] + 1]
        polygons = outline_polygons(crop, tolerance)
        if polygons is None or (len(polygons) > 1 and not multipart):
            image.shapes.append(Shape(label, float(score), [], crop.copy(), left, top))
        else:
            image.shapes.append(Shape(label, float(score), [p + (left, top) for p in polygons]))
    return image


def _mask(masks, index: int) -> np.ndarray:
    """Detection ``index``'s full-image ``(H, W)`` bool mask from a bitmap tensor or a list of COCO RLE."""
    if isinstance(masks, torch.Tensor):
        return masks[index].cpu().numpy().astype(bool, copy=False)
    rle = dict(masks[index])
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def outline_polygons(crop: np.ndarray, tolerance: float) -> Optional[List[np.ndarray]]:
    """The outline of the mask ``crop`` (``(h, w)`` bool, at least one pixel set) as polygons, one per
    connected part (8-connected), each ``(P, 2)`` float64 xy pixels of the crop with vertices on pixel
    corners, simplified by ``tolerance`` pixels; None when the mask has a hole, or the polygons would cover it
    with an IoU below :data:`POLYGON_MIN_IOU` (a small mask) or lose a part thinner than the tolerance."""
    h, w = crop.shape
    # Pixel edges from pixel centres: at twice the resolution every pixel is a 2x2 block and the contour
    # of the blocks' border pixels, at upsampled column u, lies on the pixel edge x = ceil(u / 2).
    doubled = np.zeros((2 * h + 2, 2 * w + 2), dtype=np.uint8)
    doubled[1:-1, 1:-1] = crop.repeat(2, 0).repeat(2, 1)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if (hierarchy[0, :, 3] >= 0).any():  # a contour with a parent is a hole
        return None
    polygons = []
    for contour in contours:
        # (P, 1, 2) upsampled pixels u + 1 (the padding) -> (P, 2) pixel corners ceil(u / 2) = (u + 1) // 2
        points = contour[:, 0, :] // 2
        points = points[np.any(points != np.roll(points, 1, 0), axis=1)]  # consecutive repeats
        if tolerance > 0:
            points = cv2.approxPolyDP(points.astype(np.int32)[:, None, :], tolerance, True)[:, 0, :]
        if len(points) < 3:
            return None
        polygons.append(points.astype(np.float64))
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polygons],
                                                                      h, w))).astype(bool)
    if np.logical_and(drawn, crop).sum() < POLYGON_MIN_IOU * np.logical_or(drawn, crop).sum():
        return None
    # Nothing lost beyond the tolerance: a part thinner than it collapses when simplified, however small.
    reach = tolerance + 1.0
    for source, target in ((crop, drawn), (drawn, crop)):
        if not target.any() or (_distance_to(target)[source & ~target] > reach).any():
            return None
    return polygons


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """``(h, w)`` float32: each pixel's distance (pixels, Euclidean) to the nearest pixel set in ``mask``."""
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
