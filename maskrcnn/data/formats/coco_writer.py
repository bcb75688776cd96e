"""What the format readers share: the converted records, point checks, COCO json, train/val split.

A reader turns its annotation files into :class:`ImageRecord` objects (one per image, instances in file
order) and a list of class names; :func:`to_coco` makes the COCO instances dict from them and
:func:`write_coco` writes it (optionally split into train and val files). Coordinates are pixels of the
image, ``x`` right and ``y`` down, with ``(0, 0)`` the top-left corner of the top-left pixel (COCO's
convention, which labelme, CVAT and YOLO share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from maskrcnn.data.coco import BOUNDS_TOLERANCE
from maskrcnn.fileio import save_json

Part = np.ndarray  # a polygon ``(P, 2)`` float64 xy pixels, or a mask ``(H, W)`` bool of the whole image


@dataclass
class Instance:
    """One object: its class name and the parts that form it (polygons and/or full-image masks)."""

    label: str
    parts: List[Part]
    where: str  # the file and shape(s) it came from, for messages


@dataclass
class ImageRecord:
    """One image: ``file_name`` relative to the image folder, its size in pixels and its instances."""

    file_name: str
    height: int
    width: int
    instances: List[Instance] = field(default_factory=list)


def check_points(points, *, height: int, width: int, where: str, min_points: int = 3) -> np.ndarray:
    """Validate a list of ``[x, y]`` pairs; returns them as ``(P, 2)`` float64 clipped to the image.

    Raises ValueError naming ``where`` when the points are not finite number pairs, fewer than
    ``min_points``, or more than ``BOUNDS_TOLERANCE`` pixels outside the ``width`` x ``height`` image.
    """
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: points are not [x, y] number pairs") from None
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise ValueError(f"{where}: points are not [x, y] number pairs")
    if len(array) < min_points:
        raise ValueError(f"{where}: {len(array)} points, at least {min_points} needed")
    tol = BOUNDS_TOLERANCE
    lo, hi = array.min(0), array.max(0)
    if lo[0] < -tol or lo[1] < -tol or hi[0] > width + tol or hi[1] > height + tol:
        raise ValueError(f"{where}: points span x {lo[0]:g}..{hi[0]:g}, y {lo[1]:g}..{hi[1]:g}, outside the "
                         f"{width}x{height} image by more than {tol:g} pixel")
    return np.stack([array[:, 0].clip(0, width), array[:, 1].clip(0, height)], 1)


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


def image_size(path: Path, where: str) -> Tuple[int, int]:
    """``(height, width)`` from the image file's header; FileNotFoundError / ValueError naming ``where``."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except OSError as exc:
        raise ValueError(f"{where}: cannot read image {path}: {exc}") from None
    return height, width


def check_label(label, class_names: Sequence[str], where: str) -> str:
    """``label`` when it is one of ``class_names``; ValueError naming ``where`` and the known names."""
    if label not in class_names:
        raise ValueError(f"{where}: label {label!r} is not in the class list {list(class_names)}")
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
    pycocotools decodes it. Raises ValueError naming the shape when an instance covers no pixel."""
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
                raise ValueError(f"{instance.where}: the shape covers no pixel of the "
                                 f"{record.width}x{record.height} image")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[instance.label],
                "segmentation": segmentation, "area": area,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    categories = [{"id": category_ids[name], "name": name, "supercategory": ""} for name in class_names]
    return {"images": images, "annotations": annotations, "categories": categories}


def split_coco(dataset: dict, val_fraction: float, seed: int) -> Tuple[dict, dict]:
    """Split a COCO dict by image into ``(train, val)``; ``round(val_fraction * N)`` images (at least one,
    and at least one left for training) drawn at random with ``seed`` go to val. Ids are kept."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    count = len(dataset["images"])
    if count < 2:
        raise ValueError(f"cannot split {count} image(s) into a training and a validation set")
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
        raise ValueError(f"{where}: mask of {w}x{h} at ({left}, {top}) lies outside the {width}x{height} image")
    mask = np.zeros((height, width), dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    mask[y0:y1, x0:x1] = crop[y0 - top:y1 - top, x0 - left:x1 - left]
    return mask


def class_names_from(records: Sequence[ImageRecord], given: Optional[Sequence[str]]) -> List[str]:
    """``given`` when set, else the sorted set of labels the records use."""
    if given is not None:
        return list(given)
    return sorted({instance.label for record in records for instance in record.instances})
