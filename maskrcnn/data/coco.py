"""COCO-format instance segmentation dataset.

Shorthand: M instances (non-crowd annotations) of one image, C crowd regions of that image, H, W the
image's height and width in pixels.

Annotations are read and validated once, when the dataset is built, so that a bad annotation stops the
run at once with a message naming the file, the annotation id and the image id, instead of failing later
inside a loader worker. Image files are only opened on read (``check_images`` checks them all up front).
Labels are contiguous: the K categories, sorted by COCO category id, get labels 1..K (0 is background).

A sample is ``(image, target)``:
- image: ``(3, H, W)`` float32 RGB in [0, 1], after the transforms;
- target: ``boxes`` ``(M, 4)`` float32 xyxy pixels of the returned image; ``labels`` ``(M,)`` int64 in
  1..K; ``masks`` :class:`PolygonMasks` when every instance of the image is a polygon, else
  :class:`BitMasks` (RLE decoded, polygons rasterised), index-aligned with ``boxes``; ``crowd_boxes``
  ``(C, 4)`` float32 xyxy pixels of the returned image (crowd regions: never matched, anchors inside them
  are ignored); ``image_id`` int (COCO id); ``orig_size`` ``(H, W)`` of the image file.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from maskrcnn.fileio import read_image
from maskrcnn.rle import compressed_run_lengths
from maskrcnn.structures import BitMasks, InstanceMasks, PolygonMasks

BOUNDS_TOLERANCE = 1.0  # boxes and polygons may exceed the image by this many pixels; they are clipped


class AnnotationError(ValueError):
    """A bad annotation; ``reason`` is a short category used to count skipped annotations."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class CocoDetection(torch.utils.data.Dataset):
    """Images and instance annotations from a COCO ``instances_*.json`` file.

    ann_file: the COCO json. image_dir: folder holding each image's ``file_name``.
    transforms: called as ``transforms(image, target, rng)`` with image ``(H, W, 3)`` uint8 RGB, the
    target described in the module docstring and a ``np.random.Generator``; returns ``(image, target)``.
    filter_empty: drop images without any usable non-crowd annotation.
    skip_bad_annotations: skip invalid annotations instead of raising; ``skipped`` counts them per reason
    and one warning gives the totals.

    Items are indexed by position, or by ``(position, augmentation_seed)`` so that random transforms are
    reproducible (see :class:`maskrcnn.data.samplers.TrainingSampler`); a bare position draws fresh
    randomness.
    """

    def __init__(self, ann_file: Union[str, Path], image_dir: Union[str, Path], *,
                 transforms: Optional[Callable] = None, filter_empty: bool = False,
                 skip_bad_annotations: bool = False):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        data = _load_json(self.ann_file)

        categories = _read_categories(data["categories"], self.ann_file)
        sorted_ids = sorted(categories)
        self.class_names: List[str] = [categories[cat_id] for cat_id in sorted_ids]
        self.cat_id_to_label: Dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(sorted_ids)}
        self.label_to_cat_id: Dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.categories: List[dict] = [{"id": cat_id, "name": categories[cat_id]} for cat_id in sorted_ids]

        images = _read_images(data["images"], self.ann_file)
        instances: Dict[int, list] = {image_id: [] for image_id in images}
        crowds: Dict[int, list] = {image_id: [] for image_id in images}
        skipped = Counter()
        for position, ann in enumerate(data.get("annotations", [])):
            try:
                image_id, box, label, segmentation, crowd = self._parse_annotation(ann, position, images)
            except AnnotationError as exc:
                if not skip_bad_annotations:
                    raise
                skipped[exc.reason] += 1
                continue
            if crowd:
                crowds[image_id].append(box)
            else:
                instances[image_id].append((box, label, segmentation))
        self.skipped: Dict[str, int] = dict(skipped)
        if self.skipped:
            details = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            warnings.warn(f"{self.ann_file}: skipped {sum(self.skipped.values())} bad annotations ({details})")

        records = []
        for image_id, image in images.items():
            if filter_empty and not instances[image_id]:
                continue
            items = instances[image_id]
            records.append({
                "image_id": image_id, "file_name": image["file_name"],
                "height": image["height"], "width": image["width"],
                "boxes": np.array([b for b, _, _ in items], dtype=np.float32).reshape(-1, 4),
                "labels": np.array([label for _, label, _ in items], dtype=np.int64),
                "segmentations": [s for _, _, s in items],
                "crowd_boxes": np.array(crowds[image_id], dtype=np.float32).reshape(-1, 4),
            })
        self.image_ids: List[int] = [r["image_id"] for r in records]
        self.image_sizes: List[Tuple[int, int]] = [(r["height"], r["width"]) for r in records]
        self._records = _PackedRecords(records)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[Tensor, dict]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self._records[index]
        image = self._read_image(record)
        target = {
            "boxes": torch.from_numpy(record["boxes"]),
            "labels": torch.from_numpy(record["labels"]),
            "masks": _instance_masks(record),
            "crowd_boxes": torch.from_numpy(record["crowd_boxes"]),
            "image_id": record["image_id"],
            "orig_size": (record["height"], record["width"]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target, np.random.default_rng(seed))
        # (H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return image, target

    def check_images(self, *, progress: bool = False) -> None:
        """Check that every image file exists, is a readable image and has the size the json gives.

        Reads only file headers (a progress bar with ``progress``). Raises ``FileNotFoundError`` when
        every problem is a missing file and ``ValueError`` otherwise, listing every bad file with its image id.
        """
        problems = []
        missing = 0
        for index in tqdm(range(len(self)), desc="checking images", unit="img", disable=not progress,
                          mininterval=1.0):
            record = self._records[index]
            path = self.image_dir / record["file_name"]
            where = f"image id {record['image_id']} in {self.ann_file}"
            if not path.is_file():
                problems.append(f"image file {path} not found ({where})")
                missing += 1
                continue
            try:
                with Image.open(path) as img:
                    width, height = img.size
            except OSError as exc:
                problems.append(f"cannot read image file {path} ({where}): {exc}")
                continue
            if (height, width) != (record["height"], record["width"]):
                problems.append(_size_mismatch(path, (height, width), record, self.ann_file))
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            error = FileNotFoundError if missing == len(problems) else ValueError
            raise error(f"{len(problems)} bad image file{'s' if len(problems) > 1 else ''}:\n  {shown}{more}")

    def _read_image(self, record: dict) -> np.ndarray:
        """The image file as ``(H, W, 3)`` uint8 RGB, raw pixel order (EXIF orientation ignored, as COCO)."""
        path = self.image_dir / record["file_name"]
        image = read_image(path, where=f"image id {record['image_id']} in {self.ann_file}")
        if image.shape[:2] != (record["height"], record["width"]):
            raise ValueError(_size_mismatch(path, image.shape[:2], record, self.ann_file))
        return image

    def _parse_annotation(self, ann: dict, position: int, images: Dict[int, dict]):
        """Validate one annotation; returns ``(image_id, box xyxy, label, segmentation, iscrowd)`` with the
        box and polygons clipped to the image, or raises :class:`AnnotationError`."""
        if not isinstance(ann, dict) or "id" not in ann:
            raise ValueError(f"{self.ann_file}: annotation #{position} is not an object with an 'id'")
        image_id = ann.get("image_id")
        where = f"{self.ann_file}: annotation id {ann['id']} (image id {image_id})"
        if image_id not in images:
            raise AnnotationError(f"{where}: unknown image id", "unknown image id")
        category_id = ann.get("category_id")
        if category_id not in self.cat_id_to_label:
            raise AnnotationError(f"{where}: unknown category id {category_id!r}", "unknown category id")
        height, width = images[image_id]["height"], images[image_id]["width"]
        box = _parse_box(ann.get("bbox"), height, width, where)
        segmentation = _parse_segmentation(ann.get("segmentation"), height, width, where)
        return image_id, box, self.cat_id_to_label[category_id], segmentation, bool(ann.get("iscrowd", 0))


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} "
                         f"(character {exc.pos}): {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path}: expected a COCO object with 'images' and 'categories' lists "
                         "(and an 'annotations' list)")
    return data


def _read_categories(entries: list, ann_file: Path) -> Dict[int, str]:
    """COCO category id -> name."""
    categories = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
            raise ValueError(f"{ann_file}: category {entry!r} needs an integer 'id' and a 'name'")
        if entry["id"] in categories:
            raise ValueError(f"{ann_file}: duplicate category id {entry['id']}")
        categories[entry["id"]] = str(entry["name"])
    return categories


def _read_images(entries: list, ann_file: Path) -> Dict[int, dict]:
    """COCO image id -> ``{"file_name", "height", "width"}``, in file order."""
    images = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise ValueError(f"{ann_file}: image entry {str(entry)[:200]} needs an integer 'id'")
        image_id = entry["id"]
        if image_id in images:
            raise ValueError(f"{ann_file}: duplicate image id {image_id}")
        height, width, file_name = entry.get("height"), entry.get("width"), entry.get("file_name")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
                and isinstance(file_name, str)):
            raise ValueError(f"{ann_file}: image id {image_id} needs a 'file_name' and positive integer "
                             f"'height' and 'width', got {file_name!r}, {height!r}, {width!r}")
        images[image_id] = {"file_name": file_name, "height": height, "width": width}
    return images


def _parse_box(bbox, height: int, width: int, where: str) -> List[float]:
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


def _parse_segmentation(segmentation, height: int, width: int, where: str):
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


def _size_mismatch(path: Path, actual: Tuple[int, int], record: dict, ann_file: Path) -> str:
    return (f"image file {path} (image id {record['image_id']}) is {actual[1]}x{actual[0]} (WxH) but "
            f"{ann_file} gives {record['width']}x{record['height']}")


def _instance_masks(record: dict) -> InstanceMasks:
    """The record's instance masks: polygons kept as such if all are polygons, else ``(M, H, W)`` bits."""
    segmentations, height, width = record["segmentations"], record["height"], record["width"]
    if all(isinstance(s, list) for s in segmentations):
        return PolygonMasks(segmentations, (height, width))
    rles = [mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in s], height, width))
            if isinstance(s, list) else s for s in segmentations]
    bits = mask_utils.decode(rles)  # (H, W, M) uint8
    return BitMasks(torch.from_numpy(np.ascontiguousarray(bits.transpose(2, 0, 1))))


class _PackedRecords:
    """A list of per-image records pickled into one byte array.

    Forked loader workers then share one buffer instead of touching (and so copying) millions of small
    Python objects through their reference counts.
    """

    def __init__(self, records: list):
        blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
                 for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(self._data[start:int(self._ends[index])].data)
