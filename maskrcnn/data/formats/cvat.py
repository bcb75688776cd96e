"""CVAT for images 1.1 XML (task and project exports) -> a :class:`Conversion`.

The file (``annotations.xml`` of a "CVAT for images 1.1" export) holds ``<meta>`` with the label list
(``<labels><label><name>``, under ``<task>`` or ``<project>``) and one ``<image name= width= height=
[subset=]>`` element per image, whose children are the shapes, each with a ``label`` attribute and an
optional ``group_id``. Shapes with area are read:

- ``<polygon points="x0,y0;x1,y1;...">``, at least 3 points;
- ``<box xtl= ytl= xbr= ybr= [rotation=]>``, rotation in degrees clockwise about the box centre;
- ``<ellipse cx= cy= rx= ry= [rotation=]>``, made a polygon of ``ELLIPSE_VERTICES`` vertices;
- ``<mask rle= left= top= width= height=>``: ``rle`` the comma-separated run lengths of the
  ``width`` x ``height`` region at ``(left, top)``, in row-major order, starting with a run of 0s.

Shapes with the same label and ``group_id`` form one instance; other shapes are instances of their own.
``<polyline>``, ``<points>``, ``<skeleton>``, ``<cuboid>`` and ``<tag>`` (no outline of an object) and
shapes without a label are skipped and counted (errors with ``strict``); any other element is an error.

A project export puts images in subsets: each ``<image>`` names its ``subset`` and its file lies in
``images/<subset>/`` (the same name may appear in several subsets); each record keeps its subset, and the
images are written as one COCO file per subset. A task export has no subsets; its images lie in
``images/``.

:func:`write_cvat` writes detections as such a file, to upload into a CVAT task as pre-annotations.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write
from maskrcnn.data.formats.predictions import PredictedImage, Shape
from maskrcnn.data.formats.coco_writer import (Conversion, ImageRecord, Instance, Skipped, box_polygon,
                                               check_labels, check_points, check_size, class_names_from,
                                               clip_to_image, ellipse_polygon, mask_from_box_crop, relative_name)

SHAPE_TAGS = ("polygon", "box", "ellipse", "mask")
SKIPPED_TAGS = ("polyline", "points", "skeleton", "cuboid", "tag")  # no outline of an object


def read_cvat(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None,
              strict: bool = False) -> Conversion:
    """Read a CVAT for images 1.1 XML file.

    image_dir: the folder holding the images by their ``name``, under ``<subset>/`` for images of a
    subset (default: ``images/`` beside the XML file when it exists, else the XML file's folder); every
    image must exist there. COCO ``file_name`` entries are relative to it.
    class_names: the class list; default: the labels of ``<meta>``, else the sorted labels found.
    strict: shapes that are not read (see the module docstring) are errors instead of being skipped.
    Raises FileNotFoundError / ValueError naming the file, the image and the shape.
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
        raise InputError(f"{src}: not well-formed XML: {exc}") from None
    if root.tag != "annotations":
        raise InputError(f"{src}: root element is <{root.tag}>, expected <annotations> (CVAT for images 1.1)")
    meta_names = [label.findtext("name") for label in root.iterfind("meta//labels/label")
                  if label.find("parent") is None and label.findtext("type") not in SKIPPED_TAGS + ("skeleton",)]
    skipped = Skipped(strict)
    records = [_read_image(element, src, image_dir, skipped) for element in root.iter("image")]
    names = class_names_from(records, class_names if class_names is not None else meta_names or None)
    check_labels(records, names)
    return Conversion(records, names, skipped)


def _read_image(element: ET.Element, src: Path, image_dir: Path, skipped: Skipped) -> ImageRecord:
    name = element.get("name")
    try:
        height, width = int(element.get("height")), int(element.get("width"))
    except (TypeError, ValueError):
        raise InputError(f"{src}: <image name={name!r}> needs integer width and height") from None
    if name is None:
        raise InputError(f"{src}: <image id={element.get('id')!r}> has no name")
    subset = element.get("subset") or ""
    where_image = f"{src}: image {name!r}" + (f" of subset {subset!r}" if subset else "")
    path = image_dir / subset / name
    if subset and not path.is_file() and (image_dir / name).is_file():
        path = image_dir / name  # a task export that names the subset but keeps its images in images/
    check_size((height, width), path, where_image)
    instances: List[Instance] = []
    groups = {}
    for index, shape in enumerate(element):
        label = shape.get("label")
        where = f"{where_image}: shape {index} ({shape.tag} {label!r})"
        if shape.tag in SKIPPED_TAGS:
            skipped.add(f"CVAT {shape.tag}", "no outline of an object", src, where)
            continue
        if shape.tag not in SHAPE_TAGS:
            raise InputError(f"{where}: unsupported element <{shape.tag}> (expected one of "
                             f"{SHAPE_TAGS + SKIPPED_TAGS})")
        if not label:
            skipped.add(f"CVAT unlabelled {shape.tag}", "no label", src, where)
            continue
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
    return ImageRecord(file_name=relative_name(path, image_dir), height=height, width=width,
                       instances=instances, subset=subset)


def _numbers(shape: ET.Element, keys: Sequence[str], where: str) -> List[float]:
    try:
        return [float(shape.get(key)) for key in keys]
    except (TypeError, ValueError):
        raise InputError(f"{where}: attributes {', '.join(keys)} must all be numbers") from None


def _shape_part(shape: ET.Element, height: int, width: int, where: str) -> np.ndarray:
    """A shape as a polygon ``(P, 2)`` float64 or a full-image mask ``(H, W)`` bool."""
    if shape.tag == "polygon":
        try:
            points = [[float(v) for v in pair.split(",")] for pair in (shape.get("points") or "").split(";")]
        except ValueError:
            raise InputError(f"{where}: points {shape.get('points')!r} are not 'x,y;x,y;...'") from None
        return check_points(points, height=height, width=width, where=where)
    if shape.tag == "box":
        x0, y0, x1, y1 = _numbers(shape, ("xtl", "ytl", "xbr", "ybr"), where)
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"{where}: the box has no area")
        corners = box_polygon(x0, y0, x1, y1, float(shape.get("rotation", 0.0)))
        return check_points(corners, height=height, width=width, where=where)
    if shape.tag == "ellipse":
        cx, cy, rx, ry = _numbers(shape, ("cx", "cy", "rx", "ry"), where)
        if rx <= 0 or ry <= 0:
            raise InputError(f"{where}: the ellipse has no area (rx {rx:g}, ry {ry:g})")
        return clip_to_image(ellipse_polygon(cx, cy, rx, ry, float(shape.get("rotation", 0.0))), height, width)
    left, top, w, h = (int(v) for v in _numbers(shape, ("left", "top", "width", "height"), where))
    try:
        runs = np.array([int(v) for v in (shape.get("rle") or "").split(",")], dtype=np.int64)
    except ValueError:
        raise InputError(f"{where}: rle {shape.get('rle')[:50]!r}... is not comma-separated integers") from None
    if w <= 0 or h <= 0 or (runs < 0).any() or runs.sum() != w * h:
        raise InputError(f"{where}: rle runs sum to {runs.sum()}, expected width x height = {w}x{h} = {w * h}")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0s, 1s, 0s, ...
    crop = np.repeat(values, runs).reshape(h, w)
    if not crop.any():
        raise InputError(f"{where}: the mask is empty")
    return mask_from_box_crop(crop, left, top, height, width, where)


def write_cvat(images: Sequence[PredictedImage], class_names: Sequence[str], path) -> Path:
    """Write the shapes of ``images`` as a CVAT for images 1.1 XML file at ``path`` (a task's
    ``annotations.xml``): ``<meta>`` lists ``class_names`` as labels, each ``<image>`` is named by its file
    name (CVAT matches a task's images by name) and holds a ``<polygon>`` per polygon (the parts of one
    detection share a ``group_id``) or a ``<mask>``, all ``source="auto"``. Returns ``path``."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = "pre-annotations"
    ET.SubElement(task, "size").text = str(len(images))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for name in class_names:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = "any"
        ET.SubElement(label, "attributes")
    group_id = 0
    for index, image in enumerate(images):
        element = ET.SubElement(root, "image", id=str(index), name=image.path.name, width=str(image.width),
                                height=str(image.height))
        for shape in image.shapes:
            if len(shape.polygons) > 1:
                group_id += 1
            for attributes in _cvat_shapes(shape, group_id if len(shape.polygons) > 1 else 0):
                ET.SubElement(element, "mask" if shape.is_mask else "polygon", attributes)
    ET.indent(root)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    atomic_write(path, lambda f: f.write(data))
    return path


def _cvat_shapes(shape: Shape, group_id: int) -> List[dict]:
    """The attributes of a detection's CVAT elements: a ``<polygon>`` per part, or one ``<mask>`` whose
    ``rle`` runs alternate 0s and 1s over its box, row by row, starting with 0s."""
    common = {"label": shape.label, "source": "auto", "occluded": "0", "z_order": "0"}
    if group_id:
        common["group_id"] = str(group_id)
    if shape.is_mask:
        h, w = shape.crop.shape
        flat = np.concatenate([[False], shape.crop.reshape(-1), [False]])
        edges = np.flatnonzero(flat[1:] != flat[:-1])  # where runs of 1s start and end
        runs = np.diff(np.concatenate([[0], edges, [h * w]]))
        runs = runs[:-1] if runs[-1] == 0 else runs
        return [{**common, "rle": ", ".join(str(v) for v in runs), "left": str(shape.left), "top": str(shape.top),
                 "width": str(w), "height": str(h)}]
    return [{**common, "points": ";".join(f"{x:.2f},{y:.2f}" for x, y in polygon)} for polygon in shape.polygons]
