"""What the format readers share: the converted records, point checks, COCO json, train/val split.

A reader turns its annotation files into a :class:`Conversion`: :class:`ImageRecord` objects (one per
image, instances in file order, each with the subset the source puts it in, if any), a list of class
names and the shapes it left out (:class:`Skipped`); :func:`to_coco` makes the COCO instances dict of
records and :func:`write_conversion` writes them (one file per subset of the source, or optionally split
into train and val files). Coordinates are pixels of the upright image (EXIF orientation applied, as the
annotation tools show it), ``x`` right and ``y`` down, with ``(0, 0)`` the top-left corner of the top-left
pixel (COCO's convention, which labelme, CVAT and YOLO share).
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from maskrcnn.errors import InputError
from maskrcnn.data.coco import BOUNDS_TOLERANCE
from maskrcnn.fileio import atomic_write, exif_orientation, image_header, save_json, swaps_axes

Part = np.ndarray  # a polygon ``(P, 2)`` float64 xy pixels, or a mask ``(H, W)`` bool of the whole image


ELLIPSE_VERTICES = 64  # circles and ellipses become polygons of this many vertices (area within 0.2%)


@dataclass
class Instance:
    """One object: its class name and the parts that form it (polygons and/or full-image masks).

    ignore: a region to leave out (labelme's ``__ignore__``) rather than an object: written as a COCO crowd
    region (``iscrowd: 1``, RLE) of every category, so that training and evaluation match nothing there.
    """

    label: str
    parts: List[Part]
    where: str  # the file and shape(s) it came from, for messages
    ignore: bool = False


@dataclass
class ImageRecord:
    """One image: ``file_name`` relative to the image folder, its upright size in pixels, its instances and
    the subset (``""`` when the source has none) it belongs to. ``embedded``: the image file's bytes, taken
    from the annotation file, to be written to ``embedded_path`` with the COCO json (the file is missing)."""

    file_name: str
    height: int
    width: int
    instances: List[Instance] = field(default_factory=list)
    subset: str = ""
    embedded: Optional[bytes] = None
    embedded_path: Optional[Path] = None


class Skipped:
    """Shapes a reader leaves out, by kind: how many and in which files. With ``strict`` each one is an
    error (ValueError naming the file and shape) instead."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.shapes: Counter = Counter()
        self.files: Dict[str, set] = defaultdict(set)
        self.reasons: Dict[str, str] = {}

    def add(self, kind: str, reason: str, file, where: str) -> None:
        """Count one shape of ``kind`` (e.g. "labelme line") left out of ``file`` because of ``reason``."""
        if self.strict:
            raise InputError(f"{where}: {reason} (left out without --strict)")
        self.shapes[kind] += 1
        self.files[kind].add(str(file))
        self.reasons[kind] = reason

    def lines(self) -> List[str]:
        """One line per kind: ``skipped 3 labelme line shapes in 2 files (no area)``."""
        return [f"skipped {count} {kind} shape{'s' if count > 1 else ''} in {len(self.files[kind])} "
                f"file{'s' if len(self.files[kind]) > 1 else ''} ({self.reasons[kind]})"
                for kind, count in sorted(self.shapes.items())]


@dataclass
class Conversion:
    """What a reader returns: the images, the class names (categories 1..K in this order) and what it
    left out."""

    records: List[ImageRecord]
    class_names: List[str]
    skipped: Skipped = field(default_factory=Skipped)

    @property
    def subsets(self) -> List[str]:
        """The subsets of the records in order of first appearance; ``[]`` when the source has none."""
        return list(dict.fromkeys(r.subset for r in self.records)) if any(r.subset for r in self.records) else []


def check_points(points, *, height: int, width: int, where: str, min_points: int = 3) -> np.ndarray:
    """Validate a list of ``[x, y]`` pairs; returns them as ``(P, 2)`` float64 clipped to the image.

    Raises ValueError naming ``where`` when the points are not finite number pairs, fewer than
    ``min_points``, or more than ``BOUNDS_TOLERANCE`` pixels outside the ``width`` x ``height`` image.
    """
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: points are not [x, y] number pairs") from None
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise InputError(f"{where}: points are not [x, y] number pairs")
    if len(array) < min_points:
        raise InputError(f"{where}: {len(array)} points, at least {min_points} needed")
    tol = BOUNDS_TOLERANCE
    lo, hi = array.min(0), array.max(0)
    if lo[0] < -tol or lo[1] < -tol or hi[0] > width + tol or hi[1] > height + tol:
        raise InputError(f"{where}: points span x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}..{hi[1]:g}, outside the "
                         f"{width}x{height} image by more than {tol:g} pixel")
    return clip_to_image(array, height, width)


def clip_to_image(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(P, 2)`` xy points moved into the ``width`` x ``height`` image (x in 0..width, y in 0..height)."""
    return np.stack([points[:, 0].clip(0, width), points[:, 1].clip(0, height)], 1)


def box_polygon(x0: float, y0: float, x1: float, y1: float, angle_deg: float = 0.0) -> np.ndarray:
    """The 4 corners ``(4, 2)`` of the box ``x0, y0, x1, y1`` turned ``angle_deg`` clockwise (on screen,
    y down) about its centre."""
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    if angle_deg:
        centre = corners.mean(0)
        a = np.deg2rad(angle_deg)
        rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        corners = (corners - centre) @ rotation.T + centre
    return corners


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0) -> np.ndarray:
    """``(ELLIPSE_VERTICES, 2)`` vertices of the ellipse of centre ``cx, cy`` and radii ``rx, ry`` (pixels)
    turned ``angle_deg`` clockwise (on screen, y down) about its centre."""
    t = np.arange(ELLIPSE_VERTICES) * (2 * np.pi / ELLIPSE_VERTICES)
    a = np.deg2rad(angle_deg)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)], 1)


def _header(path: Path, where: str) -> Tuple[int, int, int]:
    try:
        return image_header(path)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def image_size(path: Path, where: str) -> Tuple[int, int]:
    """``(height, width)`` of the upright image (EXIF orientation applied) from the file's header;
    FileNotFoundError / ValueError naming ``where``."""
    return _header(path, where)[:2]


def embedded_image_size(data: bytes, where: str) -> Tuple[int, int]:
    """``(height, width)`` of the upright image held in ``data`` (the bytes of an image file)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{where}: the embedded image does not decode: {exc}") from None
    return (width, height) if swaps_axes(exif_orientation(data)) else (height, width)


def check_size(stated: Optional[Tuple[int, int]], path: Path, where: str) -> Tuple[int, int]:
    """The upright ``(height, width)`` of the image file ``path``; ValueError naming ``where`` when the
    annotation file states (``stated``, unless None) another ``(height, width)``, saying so when it is the
    size before EXIF rotation."""
    height, width, orientation = _header(path, where)
    if stated is not None and tuple(stated) != (height, width):
        turned = (f"; that is its size as stored, before its EXIF orientation {orientation} turns it upright "
                  "(the annotations were made on the sideways pixels)"
                  if tuple(stated) == (width, height) and swaps_axes(orientation) else "")
        raise InputError(f"{where}: the annotations give {stated[1]}x{stated[0]} (WxH) but {path} is "
                         f"{width}x{height} upright{turned}")
    return height, width


def check_label(label, class_names: Sequence[str], where: str) -> str:
    """``label`` when it is one of ``class_names``; ValueError naming ``where`` and the known names."""
    if label not in class_names:
        raise InputError(f"{where}: label {label!r} is not in the class list {list(class_names)}")
    return label


def segmentation_of(instance: Instance, height: int, width: int) -> Union[List[List[float]], dict]:
    """COCO segmentation of an instance: polygon lists when all its parts are polygons, else the
    compressed RLE (string counts) of the union of its parts."""
    if all(part.dtype != bool for part in instance.parts):
        return [part.reshape(-1).tolist() for part in instance.parts]
    rles = []
    for part in instance.parts:
        if part.dtype == bool:
            rles.append(mask_utils.encode(np.asfortranarray(part.astype(np.uint8))))
        else:
            rles.extend(mask_utils.frPyObjects([part.reshape(-1).tolist()], height, width))
    rle = mask_utils.merge(rles)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def to_coco(records: Sequence[ImageRecord], class_names: Sequence[str]) -> dict:
    """The COCO instances dict: categories 1..K in the order of ``class_names``, images 1..N in the order of
    ``records``, annotations numbered from 1 with ``bbox`` and ``area`` those of the segmentation as
    pycocotools decodes it; an ignore region becomes one ``iscrowd: 1`` RLE annotation per category.
    Raises ValueError naming the shape when an instance covers no pixel."""
    category_ids = {name: i + 1 for i, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": record.file_name, "height": record.height,
                       "width": record.width})
        for instance in record.instances:
            segmentation = segmentation_of(instance, record.height, record.width)
            rle = (mask_utils.merge(mask_utils.frPyObjects(segmentation, record.height, record.width))
                   if isinstance(segmentation, list) else segmentation)
            area = float(mask_utils.area(rle))
            if area == 0:
                raise InputError(f"{instance.where}: the shape covers no pixel of the "
                                 f"{record.width}x{record.height} image")
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            if instance.ignore:  # a crowd region of every category: COCO matches detections of a class only
                counts = rle["counts"] if isinstance(rle["counts"], str) else rle["counts"].decode("ascii")
                first_id = len(annotations) + 1
                annotations.extend([{"id": first_id + k, "image_id": image_id, "category_id": cat_id,
                                     "segmentation": {"size": [record.height, record.width], "counts": counts},
                                     "area": area, "bbox": bbox, "iscrowd": 1}
                                    for k, cat_id in enumerate(category_ids.values())])
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[instance.label],
                "segmentation": segmentation, "area": area, "bbox": bbox, "iscrowd": 0})
    categories = [{"id": category_ids[name], "name": name, "supercategory": ""} for name in class_names]
    return {"images": images, "annotations": annotations, "categories": categories}


def split_coco(dataset: dict, val_fraction: float, seed: int) -> Tuple[dict, dict]:
    """Split a COCO dict by image into ``(train, val)``; ``round(val_fraction * N)`` images (at least one,
    and at least one left for training) drawn at random with ``seed`` go to val. Ids are kept."""
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    count = len(dataset["images"])
    if count < 2:
        raise InputError(f"cannot split {count} image(s) into a training and a validation set")
    num_val = min(max(1, round(val_fraction * count)), count - 1)
    val_ids = {dataset["images"][i]["id"] for i in np.random.default_rng(seed).permutation(count)[:num_val]}

    def subset(keep) -> dict:
        return {"images": [im for im in dataset["images"] if keep(im["id"])],
                "annotations": [a for a in dataset["annotations"] if keep(a["image_id"])],
                "categories": dataset["categories"]}

    return subset(lambda i: i not in val_ids), subset(lambda i: i in val_ids)


def write_coco(out: Union[str, Path], dataset: dict, *, val_fraction: float = 0.0,
               seed: int = 0) -> Dict[str, Path]:
    """Write ``dataset`` to ``out`` atomically, or with ``val_fraction`` > 0 to ``<stem>_train.json`` and
    ``<stem>_val.json`` beside it. Returns the written files by split name (``"all"``, or ``"train"`` and
    ``"val"``)."""
    out = Path(out)
    if val_fraction <= 0:
        save_json(out, dataset)
        return {"all": out}
    train, val = split_coco(dataset, val_fraction, seed)
    files = {"train": out.with_name(f"{out.stem}_train{out.suffix}"),
             "val": out.with_name(f"{out.stem}_val{out.suffix}")}
    save_json(files["train"], train)
    save_json(files["val"], val)
    return files


SUBSET_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # subset names usable in a file name


def write_conversion(out: Union[str, Path], conversion: Conversion, *, val_fraction: float = 0.0,
                     seed: int = 0) -> Dict[str, Path]:
    """Write a conversion as COCO json: ``out`` (or its ``_train`` / ``_val`` split, see :func:`write_coco`)
    when the source has no subsets, else one ``<stem>_<subset>.json`` per subset of the source. Images
    embedded in the annotation files are written first, where they were missing. Every file is checked
    and built before the first one is written; each is written atomically. Returns the files by split."""
    out = Path(out)
    subsets = conversion.subsets
    if subsets and val_fraction > 0:
        raise InputError(f"the source already splits its images into subsets {subsets}; "
                         "--val-fraction splits only a source without subsets")
    for subset in subsets:
        if not SUBSET_NAME.fullmatch(subset):
            raise InputError(f"subset name {subset!r} cannot be part of a file name (letters, digits, _ . - only)")
    datasets = {subset: to_coco([r for r in conversion.records if r.subset == subset], conversion.class_names)
                for subset in subsets} or {"all": to_coco(conversion.records, conversion.class_names)}
    for record in conversion.records:
        if record.embedded is not None:
            record.embedded_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(record.embedded_path, lambda f, data=record.embedded: f.write(data))
    if not subsets:
        return write_coco(out, datasets["all"], val_fraction=val_fraction, seed=seed)
    files = {subset: out.with_name(f"{out.stem}_{subset}{out.suffix}") for subset in subsets}
    for subset, path in files.items():
        save_json(path, datasets[subset])
    return files


def relative_name(path: Path, image_dir: Path) -> str:
    """``path`` relative to ``image_dir`` in POSIX form (``..`` steps where it lies outside)."""
    return Path(os.path.relpath(path.resolve(), image_dir.resolve())).as_posix()


def mask_from_box_crop(crop: np.ndarray, left: int, top: int, height: int, width: int, where: str) -> np.ndarray:
    """A ``(height, width)`` bool mask of the whole image holding ``crop`` (bool ``(h, w)``) at
    ``(left, top)``; ValueError naming ``where`` when the crop leaves the image by more than a pixel (the
    part outside is dropped)."""
    h, w = crop.shape
    tol = BOUNDS_TOLERANCE
    if left < -tol or top < -tol or left + w > width + tol or top + h > height + tol:
        raise InputError(f"{where}: mask of {w}x{h} at ({left}, {top}) lies outside the {width}x{height} image")
    mask = np.zeros((height, width), dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    mask[y0:y1, x0:x1] = crop[y0 - top:y1 - top, x0 - left:x1 - left]
    return mask


def class_names_from(records: Sequence[ImageRecord], given: Optional[Sequence[str]]) -> List[str]:
    """``given`` when set, else the sorted set of labels the records' objects (not ignore regions) use."""
    if given is not None:
        return list(given)
    return sorted({instance.label for record in records for instance in record.instances if not instance.ignore})


def check_labels(records: Sequence[ImageRecord], class_names: Sequence[str]) -> None:
    """ValueError naming the shape of the first object whose label is not one of ``class_names``."""
    for record in records:
        for instance in record.instances:
            if not instance.ignore:
                check_label(instance.label, class_names, instance.where)
