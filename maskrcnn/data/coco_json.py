"""Parsing and validation of a COCO instances json, entry by entry.

Every function raises with a message naming the file and the entry (image id, annotation id, category):
:class:`AnnotationError` for a bad annotation (skippable, counted by its ``reason``), :class:`InputError`
for a json that cannot be used at all. :mod:`maskrcnn.data.packing` validates annotations in vectorised
chunks and hands those that fail to :func:`parse_annotation`, which words the error;
:mod:`maskrcnn.data.check` uses the same checks to list every problem of a dataset.

Shorthand: P points of a polygon; boxes are pixels of the image the annotation belongs to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_utils

from maskrcnn.errors import InputError
from maskrcnn.rle import compressed_run_lengths

BOUNDS_TOLERANCE = 1.0  # boxes and polygons may exceed the image by this many pixels; they are clipped


class AnnotationError(InputError):
    """A bad annotation; ``reason`` is a short category used to count skipped annotations."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def contiguous_labels(categories: Dict[int, str]) -> Dict[int, int]:
    """COCO category id -> label: the K categories, sorted by id, get labels 1..K (0 is background)."""
    return {cat_id: i + 1 for i, cat_id in enumerate(sorted(categories))}


def parse_annotation(ann: dict, position: int, images: Dict[int, dict], cat_id_to_label: Dict[int, int],
                     ann_file: Path) -> Tuple[int, List[float], int, object, bool]:
    """Validate annotation ``position`` of ``ann_file``; returns ``(image_id, box xyxy, label, segmentation,
    iscrowd)`` with the box and polygons clipped to the image (see :func:`parse_box`,
    :func:`parse_segmentation`), or raises :class:`AnnotationError` (:class:`InputError` for an entry that
    is not an annotation object)."""
    if not isinstance(ann, dict) or "id" not in ann:
        raise InputError(f"{ann_file}: annotation #{position} is not an object with an 'id'")
    image_id = ann.get("image_id")
    where = f"{ann_file}: annotation id {ann['id']} (image id {image_id})"
    if image_id not in images:
        raise AnnotationError(f"{where}: unknown image id", "unknown image id")
    category_id = ann.get("category_id")
    if category_id not in cat_id_to_label:
        raise AnnotationError(f"{where}: unknown category id {category_id!r}", "unknown category id")
    height, width = images[image_id]["height"], images[image_id]["width"]
    box = parse_box(ann.get("bbox"), height, width, where)
    segmentation = parse_segmentation(ann.get("segmentation"), height, width, where)
    return image_id, box, cat_id_to_label[category_id], segmentation, bool(ann.get("iscrowd", 0))


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} "
                         f"(character {exc.pos}): {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        raise InputError(f"{path}: expected a COCO object with 'images' and 'categories' lists "
                         "(and an 'annotations' list)")
    return data


def read_categories(entries: list, ann_file: Path) -> Dict[int, str]:
    """COCO category id -> name."""
    categories = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
            raise InputError(f"{ann_file}: category {entry!r} needs an integer 'id' and a 'name'")
        if entry["id"] in categories:
            raise InputError(f"{ann_file}: duplicate category id {entry['id']}")
        categories[entry["id"]] = str(entry["name"])
    return categories


def read_images(entries: list, ann_file: Path) -> Dict[int, dict]:
    """COCO image id -> ``{"file_name", "height", "width"}``, in file order."""
    images = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise InputError(f"{ann_file}: image entry {str(entry)[:200]} needs an integer 'id'")
        image_id = entry["id"]
        if image_id in images:
            raise InputError(f"{ann_file}: duplicate image id {image_id}")
        height, width, file_name = entry.get("height"), entry.get("width"), entry.get("file_name")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
                and isinstance(file_name, str)):
            raise InputError(f"{ann_file}: image id {image_id} needs a 'file_name' and positive integer "
                             f"'height' and 'width', got {file_name!r}, {height!r}, {width!r}")
        images[image_id] = {"file_name": file_name, "height": height, "width": width}
    return images


def parse_box(bbox, height: int, width: int, where: str) -> List[float]:
    """COCO ``[x, y, w, h]`` -> xyxy clipped to the image; at most ``BOUNDS_TOLERANCE`` pixels outside."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise AnnotationError(f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]", "malformed bbox")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise AnnotationError(f"{where}: bbox {bbox} has non-positive width or height", "non-positive box size")
    tol = BOUNDS_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise AnnotationError(f"{where}: bbox {bbox} lies outside the {width}x{height} image",
                              "box outside image")
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        raise AnnotationError(f"{where}: bbox {bbox} has no area inside the {width}x{height} image",
                              "non-positive box size")
    return [x0, y0, x1, y1]


def parse_segmentation(segmentation, height: int, width: int, where: str):
    """Polygons -> list of ``(2P,)`` float64 arrays clipped to the image; RLE -> compressed RLE dict."""
    if not segmentation:
        raise AnnotationError(f"{where}: missing segmentation", "missing segmentation")
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            coords = _number_array(polygon)
            if coords is None or len(coords) % 2 or not np.isfinite(coords).all():
                raise AnnotationError(f"{where}: polygon is not a flat list of x, y numbers",
                                      "malformed segmentation")
            if len(coords) < 6:
                raise AnnotationError(f"{where}: polygon with fewer than 3 points ({len(coords) // 2})",
                                      "polygon with fewer than 3 points")
            coords = coords.astype(np.float64)
            xs, ys = coords[0::2], coords[1::2]
            tol = BOUNDS_TOLERANCE
            if xs.min() < -tol or ys.min() < -tol or xs.max() > width + tol or ys.max() > height + tol:
                raise AnnotationError(f"{where}: polygon lies outside the {width}x{height} image",
                                      "segmentation outside image")
            coords[0::2] = xs.clip(0, width)
            coords[1::2] = ys.clip(0, height)
            polygons.append(coords)
        return polygons
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise AnnotationError(f"{where}: RLE size {segmentation['size']} differs from the image size "
                                  f"[{height}, {width}]", "segmentation size mismatch")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            runs = _number_array(counts)
            if runs is None or runs.dtype.kind not in "iu" or (runs < 0).any() or runs.sum() != height * width:
                raise AnnotationError(f"{where}: uncompressed RLE counts must be non-negative integers "
                                      f"summing to {height * width}", "malformed segmentation")
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            counts = counts.encode("utf-8")
        if isinstance(counts, bytes):
            try:
                total = int(compressed_run_lengths(counts).sum())
            except ValueError as exc:
                raise AnnotationError(f"{where}: compressed RLE counts do not decode: {exc}",
                                      "malformed segmentation") from None
            if total != height * width:
                raise AnnotationError(f"{where}: compressed RLE runs cover {total} pixels, the {width}x{height} "
                                      f"image has {height * width}", "malformed segmentation")
            return {"size": [height, width], "counts": counts}
    raise AnnotationError(f"{where}: segmentation is neither a list of polygons nor an RLE object",
                          "malformed segmentation")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_array(values) -> Optional[np.ndarray]:
    """A JSON list of numbers as a 1-D int or float array; ``None`` for anything else (strings, null,
    nested lists, mixed types)."""
    if not isinstance(values, list):
        return None
    array = np.array(values)
    return array if array.ndim == 1 and array.dtype.kind in "iuf" else None

