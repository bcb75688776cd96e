"""labelme annotations: a folder of per-image ``.json`` files -> a :class:`Conversion`, and detections -> such
files (pre-annotations to correct in labelme).

A labelme file (https://github.com/wkentaro/labelme, versions 3 to 5) holds ``imagePath`` (relative to the
json file), ``imageHeight``, ``imageWidth``, optionally ``imageData`` (the image file itself, base64) and a
list of ``shapes``, each with ``label``, ``points`` (``[[x, y], ...]`` pixels of the upright image: labelme
applies EXIF orientation), ``shape_type`` and ``group_id``. Area shape types are read:

- ``polygon`` (also a missing or null ``shape_type``, as old files have): the points, at least 3;
- ``rectangle``: two opposite corners;
- ``circle``: the centre and a point on the circle, made a polygon of ``ELLIPSE_VERTICES`` vertices
  (clipped to the image);
- ``mask``: two corners ``(x1, y1), (x2, y2)`` and ``mask``, a base64 PNG of the
  ``(y2 - y1 + 1, x2 - x1 + 1)`` region they span (corners truncated to integers, as labelme does).

Shapes with the same label and the same non-null ``group_id`` form one instance (as labelme's own COCO
export groups them); every other shape is an instance of its own. Shapes labelled ``__ignore__`` (labelme's
label for regions to leave out) are ignore regions, written as COCO crowd regions. Shapes without area
(``line``, ``linestrip``, ``point``, ``points``) are skipped and counted (errors with ``strict``); any other
shape type is an error. A file whose image is missing but embedded (``imageData``) gets that image written
beside it, at ``imagePath``, when the COCO json is written.

A class list in labelme's own ``labels.txt`` layout (``__ignore__`` and ``_background_`` first) is
accepted: those two names are not classes.

:func:`write_labelme_file` writes one image's detections as labelme writes a file: ``imagePath`` relative to
the json, ``imageData`` null, a ``polygon`` shape per polygon (the parts of one detection share a
``group_id``) or a ``mask`` shape, and the score in each shape's ``description`` (``score=0.9731``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from maskrcnn.errors import InputError
from maskrcnn.fileio import read_json, save_json
from maskrcnn.data.formats.predictions import PredictedImage, Shape
from maskrcnn.data.formats.coco_writer import (Conversion, ImageRecord, Instance, Skipped, box_polygon,
                                               check_labels, check_points, check_size, class_names_from,
                                               clip_to_image, ellipse_polygon, embedded_image_size, mask_from_box_crop,
                                               relative_name)

AREA_TYPES = ("polygon", "rectangle", "circle", "mask")
LINE_TYPES = ("line", "linestrip", "point", "points")  # no area: skipped
IGNORE_LABEL = "__ignore__"  # labelme's label for regions to leave out
RESERVED_LABELS = (IGNORE_LABEL, "_background_")  # the first lines of labelme's labels.txt, not classes
LABELME_VERSION = "5.5.0"  # the file layout written: labelme 5.2 and later (6 included) read it as their own


def read_labelme(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None,
                 strict: bool = False) -> Conversion:
    """Read every ``*.json`` under the folder ``src`` (recursively, sorted by path).

    image_dir: the folder the COCO ``file_name`` entries are relative to (default ``src``).
    class_names: the class list (labels outside it are an error; ``__ignore__`` and ``_background_`` are
        dropped from it); default: the sorted labels found.
    strict: shapes without area are errors instead of being skipped.
    Raises FileNotFoundError / ValueError naming the file and shape.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"labelme folder not found: {src}")
    image_dir = Path(image_dir) if image_dir is not None else src
    files = sorted(src.rglob("*.json"))
    if not files:
        raise InputError(f"no labelme .json files in {src}")
    skipped = Skipped(strict)
    records = [read_labelme_file(path, image_dir, skipped)
               for path in tqdm(files, desc="labelme", unit="file", disable=len(files) < 100)]
    given = [name for name in class_names if name not in RESERVED_LABELS] if class_names is not None else None
    names = class_names_from(records, given)
    check_labels(records, names)
    return Conversion(records, names, skipped)


def read_labelme_file(path: Path, image_dir: Path, skipped: Skipped) -> ImageRecord:
    """One labelme json file as an :class:`ImageRecord` (image size read from the image file, or from the
    embedded image when the file is missing); shapes without area are counted in ``skipped``."""
    data = read_json(path, "labelme file", dict)
    if not isinstance(data.get("shapes"), list) \
            or not isinstance(data.get("imagePath"), str):
        raise InputError(f"{path}: not a labelme file (expected an object with 'shapes' and 'imagePath')")
    image_path = path.parent / data["imagePath"].replace("\\", "/")
    embedded = None
    if not image_path.is_file() and data.get("imageData"):
        try:
            embedded = base64.b64decode(data["imageData"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InputError(f"{path}: image {image_path} not found and 'imageData' is not base64") from None
        height, width = embedded_image_size(embedded, f"{path}: imageData")
    else:
        stated = (data.get("imageHeight"), data.get("imageWidth"))
        height, width = check_size(stated if stated != (None, None) else None, image_path, str(path))
    instances: List[Instance] = []
    groups = {}
    for index, shape in enumerate(data["shapes"]):
        if not isinstance(shape, dict):
            raise InputError(f"{path}: shape {index} is not an object")
        label, shape_type = shape.get("label"), shape.get("shape_type") or "polygon"
        where = f"{path}: shape {index} ({shape_type} {label!r})"
        if not isinstance(label, str) or not label:
            raise InputError(f"{where}: missing label")
        if shape_type in LINE_TYPES:
            skipped.add(f"labelme {shape_type}", "no area", path, where)
            continue
        part = _shape_part(shape, shape_type, height, width, where)
        group_id = shape.get("group_id")
        key = (label, group_id)
        if group_id is not None and key in groups:
            groups[key].parts.append(part)
            groups[key].where += f", shape {index}"
            continue
        instance = Instance(label=label, parts=[part], where=where, ignore=label == IGNORE_LABEL)
        instances.append(instance)
        if group_id is not None:
            groups[key] = instance
    return ImageRecord(file_name=relative_name(image_path, image_dir), height=height, width=width,
                       instances=instances, embedded=embedded, embedded_path=image_path if embedded else None)


def _shape_part(shape: dict, shape_type: str, height: int, width: int, where: str) -> np.ndarray:
    """A shape as a polygon ``(P, 2)`` float64 or a full-image mask ``(H, W)`` bool."""
    if shape_type not in AREA_TYPES:
        raise InputError(f"{where}: unsupported shape type {shape_type!r} (expected one of {AREA_TYPES})")
    points = shape.get("points")
    if shape_type == "polygon":
        return check_points(points, height=height, width=width, where=where)
    corners = check_points(points, height=height, width=width, where=where, min_points=2)
    if len(corners) != 2:
        raise InputError(f"{where}: {len(corners)} points, expected 2")
    if shape_type == "rectangle":
        (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"{where}: the rectangle has no area")
        return box_polygon(x0, y0, x1, y1)
    if shape_type == "circle":
        centre, rim = corners
        radius = float(np.hypot(*(rim - centre)))
        if radius <= 0:
            raise InputError(f"{where}: the circle has radius 0")
        return clip_to_image(ellipse_polygon(centre[0], centre[1], radius, radius), height, width)
    encoded = shape.get("mask")
    if not isinstance(encoded, str):
        raise InputError(f"{where}: mask shape without a base64 'mask' image")
    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as img:
            crop = np.asarray(img).astype(bool)
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: 'mask' is not a base64 image: {exc}") from None
    if crop.ndim == 3:
        crop = crop.any(2)
    (x0, y0), (x1, y1) = np.asarray(points, dtype=np.float64).astype(int)
    if crop.shape != (y1 - y0 + 1, x1 - x0 + 1):
        raise InputError(f"{where}: mask image is {crop.shape[1]}x{crop.shape[0]} but the points span "
                         f"{x1 - x0 + 1}x{y1 - y0 + 1} pixels")
    if not crop.any():
        raise InputError(f"{where}: the mask is empty")
    return mask_from_box_crop(crop, int(x0), int(y0), height, width, where)


def write_labelme_file(image: PredictedImage, folder) -> Path:
    """Write ``<folder>/<image stem>.json``, the labelme file of one image's shapes (see the module
    docstring), with ``imagePath`` relative to ``folder``; returns its path."""
    folder = Path(folder)
    path = folder / f"{image.path.stem}.json"
    shapes, group_id = [], 0
    for shape in image.shapes:
        if len(shape.polygons) > 1:
            group_id += 1
        shapes.extend(_labelme_shapes(shape, group_id if len(shape.polygons) > 1 else None))
    save_json(path, {"version": LABELME_VERSION, "flags": {}, "shapes": shapes,
                     "imagePath": Path(os.path.relpath(image.path.resolve(), folder.resolve())).as_posix(),
                     "imageData": None, "imageHeight": image.height, "imageWidth": image.width})
    return path


def _labelme_shapes(shape: Shape, group_id: Optional[int]) -> List[dict]:
    """A detection's labelme shapes: one ``polygon`` per part, or one ``mask`` (corners of its box,
    inclusive, and the box's pixels as a base64 PNG of 0s and 1s, as labelme writes it)."""
    common = {"label": shape.label, "group_id": group_id, "description": f"score={shape.score:.4f}", "flags": {}}
    if shape.is_mask:
        h, w = shape.crop.shape
        png = io.BytesIO()
        Image.fromarray(shape.crop.astype(np.uint8)).save(png, format="PNG")
        return [{**common, "shape_type": "mask",
                 "points": [[float(shape.left), float(shape.top)],
                            [float(shape.left + w - 1), float(shape.top + h - 1)]],
                 "mask": base64.b64encode(png.getvalue()).decode("ascii")}]
    return [{**common, "shape_type": "polygon", "points": polygon.tolist(), "mask": None}
            for polygon in shape.polygons]
