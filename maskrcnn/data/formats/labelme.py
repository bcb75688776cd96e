"""labelme annotations: a folder of per-image ``.json`` files -> :class:`ImageRecord` objects.

A labelme file (https://github.com/wkentaro/labelme, versions 3 to 5) holds ``imagePath`` (relative to the
json file), ``imageHeight``, ``imageWidth`` and a list of ``shapes``, each with ``label``, ``points``
(``[[x, y], ...]`` pixels), ``shape_type`` and ``group_id``. Area shape types are read:

- ``polygon`` (also a missing or null ``shape_type``, as old files have): the points, at least 3;
- ``rectangle``: two opposite corners;
- ``circle``: the centre and a point on the circle, made a polygon of ``CIRCLE_VERTICES`` vertices
  (clipped to the image);
- ``mask``: two corners ``(x1, y1), (x2, y2)`` and ``mask``, a base64 PNG of the
  ``(y2 - y1 + 1, x2 - x1 + 1)`` region they span (corners truncated to integers, as labelme does).

Shapes with the same label and the same non-null ``group_id`` form one instance (as labelme's own COCO
export groups them); every other shape is an instance of its own. Point and line shapes have no area and
are an error, as is any other shape type.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from maskrcnn.data.formats.coco_writer import (ImageRecord, Instance, box_polygon, check_label, check_points,
                                               class_names_from, image_size, mask_from_box_crop, relative_name)

CIRCLE_VERTICES = 64  # a circle becomes a polygon with this many vertices (area within 0.2% of the disc)
AREA_TYPES = ("polygon", "rectangle", "circle", "mask")


def read_labelme(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None
                 ) -> Tuple[List[ImageRecord], List[str]]:
    """Read every ``*.json`` under the folder ``src`` (recursively, sorted by path).

    image_dir: the folder the COCO ``file_name`` entries are relative to (default ``src``).
    class_names: the class list (labels outside it are an error); default: the sorted labels found.
    Returns ``(records, class_names)``. Raises FileNotFoundError / ValueError naming the file and shape.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"labelme folder not found: {src}")
    image_dir = Path(image_dir) if image_dir is not None else src
    files = sorted(src.rglob("*.json"))
    if not files:
        raise ValueError(f"no labelme .json files in {src}")
    records = [read_labelme_file(path, image_dir) for path in tqdm(files, desc="labelme", unit="file",
                                                                    disable=len(files) < 100)]
    names = class_names_from(records, class_names)
    for record in records:
        for instance in record.instances:
            check_label(instance.label, names, instance.where)
    return records, names


def read_labelme_file(path: Path, image_dir: Path) -> ImageRecord:
    """One labelme json file as an :class:`ImageRecord` (image size read from the image file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) \
            or not isinstance(data.get("imagePath"), str):
        raise ValueError(f"{path}: not a labelme file (expected an object with 'shapes' and 'imagePath')")
    image_path = path.parent / data["imagePath"].replace("\\", "/")
    height, width = image_size(image_path, str(path))
    stated = (data.get("imageHeight"), data.get("imageWidth"))
    if stated != (None, None) and stated != (height, width):
        raise ValueError(f"{path}: imageHeight x imageWidth is {stated[0]}x{stated[1]} but {image_path} is "
                         f"{height}x{width}")
    instances: List[Instance] = []
    groups = {}
    for index, shape in enumerate(data["shapes"]):
        if not isinstance(shape, dict):
            raise ValueError(f"{path}: shape {index} is not an object")
        label, shape_type = shape.get("label"), shape.get("shape_type") or "polygon"
        where = f"{path}: shape {index} ({shape_type} {label!r})"
        if not isinstance(label, str) or not label:
            raise ValueError(f"{where}: missing label")
        part = _shape_part(shape, shape_type, height, width, where)
        group_id = shape.get("group_id")
        key = (label, group_id)
        if group_id is not None and key in groups:
            groups[key].parts.append(part)
            groups[key].where += f", shape {index}"
            continue
        instance = Instance(label=label, parts=[part], where=where)
        instances.append(instance)
        if group_id is not None:
            groups[key] = instance
    return ImageRecord(file_name=relative_name(image_path, image_dir), height=height, width=width,
                       instances=instances)


def _shape_part(shape: dict, shape_type: str, height: int, width: int, where: str) -> np.ndarray:
    """A shape as a polygon ``(P, 2)`` float64 or a full-image mask ``(H, W)`` bool."""
    if shape_type not in AREA_TYPES:
        raise ValueError(f"{where}: unsupported shape type {shape_type!r} (expected one of {AREA_TYPES})")
    points = shape.get("points")
    if shape_type == "polygon":
        return check_points(points, height=height, width=width, where=where)
    corners = check_points(points, height=height, width=width, where=where, min_points=2)
    if len(corners) != 2:
        raise ValueError(f"{where}: {len(corners)} points, expected 2")
    if shape_type == "rectangle":
        (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where}: the rectangle has no area")
        return box_polygon(x0, y0, x1, y1)
    if shape_type == "circle":
        centre, rim = corners
        radius = float(np.hypot(*(rim - centre)))
        if radius <= 0:
            raise ValueError(f"{where}: the circle has radius 0")
        angles = np.arange(CIRCLE_VERTICES) * (2 * np.pi / CIRCLE_VERTICES)
        polygon = centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
        return np.stack([polygon[:, 0].clip(0, width), polygon[:, 1].clip(0, height)], 1)
    encoded = shape.get("mask")
    if not isinstance(encoded, str):
        raise ValueError(f"{where}: mask shape without a base64 'mask' image")
    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as img:
            crop = np.asarray(img).astype(bool)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: 'mask' is not a base64 image: {exc}") from None
    if crop.ndim == 3:
        crop = crop.any(2)
    (x0, y0), (x1, y1) = np.asarray(points, dtype=np.float64).astype(int)
    if crop.shape != (y1 - y0 + 1, x1 - x0 + 1):
        raise ValueError(f"{where}: mask image is {crop.shape[1]}x{crop.shape[0]} but the points span "
                         f"{x1 - x0 + 1}x{y1 - y0 + 1} pixels")
    if not crop.any():
        raise ValueError(f"{where}: the mask is empty")
    return mask_from_box_crop(crop, int(x0), int(y0), height, width, where)
