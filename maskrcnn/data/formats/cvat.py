"""CVAT for images 1.1 XML -> :class:`ImageRecord` objects.

The file (``annotations.xml`` of a "CVAT for images 1.1" export) holds ``<meta>`` with the label list
(``<labels><label><name>``) and one ``<image name= width= height=>`` element per image, whose children
are the shapes, each with a ``label`` attribute and an optional ``group_id``:

- ``<polygon points="x0,y0;x1,y1;...">``, at least 3 points;
- ``<box xtl= ytl= xbr= ybr= [rotation=]>``, rotation in degrees clockwise about the box centre;
- ``<mask rle= left= top= width= height=>``: ``rle`` the comma-separated run lengths of the
  ``width`` x ``height`` region at ``(left, top)``, in row-major order, starting with a run of 0s.

Shapes with the same label and ``group_id`` form one instance; other shapes are instances of their own.
``<tag>`` elements (image-level labels) are ignored; any other shape kind is an error.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from maskrcnn.data.formats.coco_writer import (ImageRecord, Instance, box_polygon, check_label, check_points,
                                               class_names_from, image_size, mask_from_box_crop)

SHAPE_TAGS = ("polygon", "box", "mask")


def read_cvat(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None
              ) -> Tuple[List[ImageRecord], List[str]]:
    """Read a CVAT for images 1.1 XML file.

    image_dir: the folder holding the images by their ``name`` (default: ``images/`` beside the XML file
    when it exists, else the XML file's folder); every image must exist there.
    class_names: the class list; default: the labels of ``<meta>``, else the sorted labels found.
    Returns ``(records, class_names)``. Raises FileNotFoundError / ValueError naming the file and shape.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"CVAT XML file not found: {src}")
    if image_dir is None:
        image_dir = src.parent / "images" if (src.parent / "images").is_dir() else src.parent
    image_dir = Path(image_dir)
    try:
        root = ET.parse(src).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{src}: not well-formed XML: {exc}") from None
    if root.tag != "annotations":
        raise ValueError(f"{src}: root element is <{root.tag}>, expected <annotations> (CVAT for images 1.1)")
    meta_names = [label.findtext("name") for label in root.iterfind("meta//labels/label")]
    records = [_read_image(element, src, image_dir) for element in root.iter("image")]
    names = class_names_from(records, class_names if class_names is not None else meta_names or None)
    for record in records:
        for instance in record.instances:
            check_label(instance.label, names, instance.where)
    return records, names


def _read_image(element: ET.Element, src: Path, image_dir: Path) -> ImageRecord:
    name = element.get("name")
    try:
        height, width = int(element.get("height")), int(element.get("width"))
    except (TypeError, ValueError):
        raise ValueError(f"{src}: <image name={name!r}> needs integer width and height") from None
    if name is None:
        raise ValueError(f"{src}: <image id={element.get('id')!r}> has no name")
    where_image = f"{src}: image {name!r}"
    file_height, file_width = image_size(image_dir / name, where_image)
    if (file_height, file_width) != (height, width):
        raise ValueError(f"{where_image}: the XML gives {width}x{height} but {image_dir / name} is "
                         f"{file_width}x{file_height}")
    instances: List[Instance] = []
    groups = {}
    for index, shape in enumerate(child for child in element if child.tag != "tag"):
        label = shape.get("label")
        where = f"{where_image}: shape {index} ({shape.tag} {label!r})"
        if shape.tag not in SHAPE_TAGS:
            raise ValueError(f"{where}: unsupported shape <{shape.tag}> (expected one of {SHAPE_TAGS})")
        if not label:
            raise ValueError(f"{where}: missing label")
        part = _shape_part(shape, height, width, where)
        group_id = shape.get("group_id")
        key = (label, group_id)
        if group_id not in (None, "0") and key in groups:
            groups[key].parts.append(part)
            groups[key].where += f", shape {index}"
            continue
        instance = Instance(label=label, parts=[part], where=where)
        instances.append(instance)
        if group_id not in (None, "0"):
            groups[key] = instance
    return ImageRecord(file_name=name, height=height, width=width, instances=instances)


def _numbers(shape: ET.Element, keys: Sequence[str], where: str) -> List[float]:
    try:
        return [float(shape.get(key)) for key in keys]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: attributes {', '.join(keys)} must all be numbers") from None


def _shape_part(shape: ET.Element, height: int, width: int, where: str) -> np.ndarray:
    """A shape as a polygon ``(P, 2)`` float64 or a full-image mask ``(H, W)`` bool."""
    if shape.tag == "polygon":
        try:
            points = [[float(v) for v in pair.split(",")] for pair in (shape.get("points") or "").split(";")]
        except ValueError:
            raise ValueError(f"{where}: points {shape.get('points')!r} are not 'x,y;x,y;...'") from None
        return check_points(points, height=height, width=width, where=where)
    if shape.tag == "box":
        x0, y0, x1, y1 = _numbers(shape, ("xtl", "ytl", "xbr", "ybr"), where)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where}: the box has no area")
        corners = box_polygon(x0, y0, x1, y1, float(shape.get("rotation", 0.0)))
        return check_points(corners, height=height, width=width, where=where)
    left, top, w, h = (int(v) for v in _numbers(shape, ("left", "top", "width", "height"), where))
    try:
        runs = np.array([int(v) for v in (shape.get("rle") or "").split(",")], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{where}: rle {shape.get('rle')[:50]!r}... is not comma-separated integers") from None
    if w <= 0 or h <= 0 or (runs < 0).any() or runs.sum() != w * h:
        raise ValueError(f"{where}: rle runs sum to {runs.sum()}, expected width x height = {w}x{h} = {w * h}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0s, 1s, 0s, ...
    crop = np.repeat(values, runs).reshape(h, w)
    if not crop.any():
        raise ValueError(f"{where}: the mask is empty")
    return mask_from_box_crop(crop, left, top, height, width, where)
