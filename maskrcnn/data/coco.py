"""COCO-format instance segmentation dataset.

Shorthand: M instances (non-crowd annotations) of one image, C crowd regions of that image, H, W the
image's height and width in pixels.

Annotations are read and validated once, when the dataset is built, so that a bad annotation stops the
run at once with a message naming the file, the annotation id and the image id, instead of failing later
inside a loader worker. Image files are only opened on read (``check_images`` checks them all up front).
Labels are contiguous: the K categories, sorted by COCO category id, get labels 1..K (0 is background).

At COCO scale the annotations are packed, not kept as Python objects: boxes, labels and polygons (float32
coordinates) live in a handful of flat numpy arrays, RLE masks as bytes in one buffer
(:class:`PackedAnnotations`). The packed arrays are written once to a cache file beside the json
(``<json>.maskrcnn-cache``, keyed by the json's size, modification time and content hash, written
atomically under a file lock, so that of several processes or jobs starting at once one builds and the
others wait and read) and memory-mapped by every process: ranks on one machine and their loader workers
share one copy of the pages, and reading a sample touches no Python object of the dataset, so workers do
not grow by copy-on-read. A changed json is noticed and the cache rebuilt; where the folder is read-only
the arrays stay in memory (with a warning). Validation is vectorised over chunks of annotations; an
annotation that fails a check is parsed again by the one-annotation parser, which words the error.

A sample is ``(image, target)``:
- image: ``(3, H, W)`` float32 RGB in [0, 1], after the transforms;
- target: ``boxes`` ``(M, 4)`` float32 xyxy pixels of the returned image; ``labels`` ``(M,)`` int64 in
  1..K; ``masks`` :class:`PolygonMasks` when every instance of the image is a polygon, else
  :class:`BitMasks` (RLE decoded, polygons rasterised), index-aligned with ``boxes``; ``crowd_boxes``
  ``(C, 4)`` float32 xyxy pixels of the returned image (crowd regions: never matched, anchors inside them
  are ignored); ``image_id`` int (COCO id); ``orig_size`` ``(H, W)`` of the image file.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import itertools
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from maskrcnn.fileio import atomic_write, read_image
from maskrcnn.rle import compressed_run_lengths
from maskrcnn.structures import BitMasks, InstanceMasks, PolygonMasks

BOUNDS_TOLERANCE = 1.0  # boxes and polygons may exceed the image by this many pixels; they are clipped
CACHE_SUFFIX = ".maskrcnn-cache"  # the packed annotations of ``x.json`` are cached in ``x.json.maskrcnn-cache``
_CACHE_MAGIC = b"MRCNNPK1"  # the cache file format; a new format gets a new magic (old caches are rebuilt)
_CHUNK = 65536  # annotations validated together
_NUMBER_TYPES = frozenset((int, float))


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
    cache: read the packed annotations from (and write them first to) ``<ann_file>.maskrcnn-cache``, memory-
    mapped; False packs them in memory every time.

    Items are indexed by position, or by ``(position, augmentation_seed)`` so that random transforms are
    reproducible (see :class:`maskrcnn.data.samplers.TrainingSampler`); a bare position draws fresh
    randomness.
    """

    def __init__(self, ann_file: Union[str, Path], image_dir: Union[str, Path], *,
                 transforms: Optional[Callable] = None, filter_empty: bool = False,
                 skip_bad_annotations: bool = False, cache: bool = True):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        if cache:
            packed = _load_or_build_cache(self.ann_file, skip_bad_annotations,
                                          lambda: self._pack(skip_bad_annotations))
        else:
            packed = self._pack(skip_bad_annotations)
        self._records = packed
        self._set_categories(packed.categories)
        self.skipped: Dict[str, int] = dict(packed.skipped)
        if self.skipped:
            details = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            warnings.warn(f"{self.ann_file}: skipped {sum(self.skipped.values())} bad annotations ({details})")

        arrays = packed.arrays
        instance_counts = np.diff(arrays["instance_ends"], prepend=0)
        # positions (in the json's image order) of the images this dataset serves
        self._positions = np.flatnonzero(instance_counts > 0) if filter_empty else np.arange(len(packed))
        self.image_ids: List[int] = arrays["image_ids"][self._positions].tolist()
        self.image_sizes: List[Tuple[int, int]] = list(zip(arrays["heights"][self._positions].tolist(),
                                                           arrays["widths"][self._positions].tolist()))

    def _set_categories(self, categories: Dict[int, str]) -> None:
        sorted_ids = sorted(categories)
        self.class_names: List[str] = [categories[cat_id] for cat_id in sorted_ids]
        self.cat_id_to_label: Dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(sorted_ids)}
        self.label_to_cat_id: Dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.categories: List[dict] = [{"id": cat_id, "name": categories[cat_id]} for cat_id in sorted_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[Tensor, dict]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        record = self.record(index)
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

    def record(self, index: int) -> dict:
        """The annotations of image ``index`` (a position in this dataset) without reading the image file.

        Returns ``image_id``, ``file_name``, ``height``, ``width``, ``boxes`` ``(M, 4)`` float32 xyxy pixels of
        the file, ``labels`` ``(M,)`` int64, ``segmentations`` (per instance a list of ``(2P,)`` float32
        polygons or a compressed RLE dict), ``crowd_boxes`` ``(C, 4)`` float32 xyxy pixels.
        """
        return self._records[int(self._positions[range(len(self))[index]])]

    def check_images(self, *, progress: bool = False) -> None:
        """Check that every image file exists, is a readable image and has the size the json gives.

        Reads only file headers (a progress bar with ``progress``). Raises ``FileNotFoundError`` when
        every problem is a missing file and ``ValueError`` otherwise, listing every bad file with its image id.
        """
        problems = []
        missing = 0
        for index in tqdm(range(len(self)), desc="checking images", unit="img", disable=not progress,
                          mininterval=1.0):
            record = self.record(index)
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

    def _pack(self, skip_bad_annotations: bool) -> "PackedAnnotations":
        """Read and validate the json into packed arrays (see :class:`PackedAnnotations`).

        Annotations are validated a chunk at a time: a loop that only reads fields and checks their types,
        then numpy checks of every box and polygon of the chunk at once. An annotation that fails either is
        handed to :meth:`_parse_annotation`, which raises (or, skipping, counts) its error; the first bad
        annotation in file order is the one reported. The json's annotation objects are released chunk by
        chunk, so that the peak memory is that of the parsed json. The cyclic garbage collector is paused
        meanwhile: the json's millions of objects hold no cycles, and each collection would walk them all.
        """
        with _gc_paused():
            return self._pack_json(skip_bad_annotations)

    def _pack_json(self, skip_bad_annotations: bool) -> "PackedAnnotations":
        data = _load_json(self.ann_file)
        categories = _read_categories(data["categories"], self.ann_file)
        self._set_categories(categories)
        images = _read_images(data["images"], self.ann_file)
        image_ids = list(images)
        position_of = {image_id: i for i, image_id in enumerate(image_ids)}
        heights = np.array([images[i]["height"] for i in image_ids], dtype=np.int64)
        widths = np.array([images[i]["width"] for i in image_ids], dtype=np.int64)
        annotations = data.get("annotations", [])
        skipped = Counter()
        parts = _PackBuffers()
        for start in range(0, len(annotations), _CHUNK):
            chunk = _ChunkReader(self, annotations, start, min(start + _CHUNK, len(annotations)), images,
                                 position_of)
            bad = chunk.check(heights, widths)
            # (offset in the chunk, the exception or the entry whose exception is still to be worded)
            errors = chunk.rejected + [(chunk.offsets[entry], int(entry)) for entry in np.flatnonzero(bad)]
            for _, error in sorted(errors, key=lambda e: e[0]):
                if isinstance(error, int):
                    error = chunk.error_of(error)
                if not skip_bad_annotations or not isinstance(error, AnnotationError):
                    raise error
                skipped[error.reason] += 1
            parts.add(chunk, ~bad)
            annotations[start:start + _CHUNK] = [None] * (min(start + _CHUNK, len(annotations)) - start)
        names = [images[i]["file_name"].encode("utf-8") for i in image_ids]
        return PackedAnnotations.from_parts(parts, image_ids=image_ids, heights=heights, widths=widths, names=names,
                                            categories=categories, skipped=dict(skipped))

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


class _ChunkReader:
    """Annotations ``start..end-1`` of the json read into flat lists, one entry per annotation that passed the
    type checks: its offset in the chunk, image position, label, crowd flag, box ``x, y, w, h`` and
    segmentation (polygon lengths and coordinates, or a compressed RLE dict). Annotations that failed are in
    ``rejected`` as ``(offset, exception)``; :meth:`check` finds the numerically bad entries."""

    def __init__(self, dataset: "CocoDetection", annotations: list, start: int, end: int, images: Dict[int, dict],
                 position_of: Dict[int, int]):
        self.dataset, self.annotations, self.start, self.images = dataset, annotations, start, images
        self.offsets, self.image_positions, self.labels, self.crowd, self.boxes = [], [], [], [], []
        self.polygon_counts, self.polygon_lengths, self.coords = [], [], []  # polygon_counts 0: an RLE
        self.rles: Dict[int, dict] = {}  # entry -> compressed RLE
        self.rejected: List[Tuple[int, Exception]] = []
        cat_id_to_label, number_types = dataset.cat_id_to_label, _NUMBER_TYPES
        offsets, image_positions, labels, crowd, boxes = self.offsets, self.image_positions, self.labels, self.crowd, \
            self.boxes
        polygon_counts, polygon_lengths, coords = self.polygon_counts, self.polygon_lengths, self.coords
        for offset, ann in enumerate(itertools.islice(annotations, start, end)):
            # The fast path: field look-ups and type checks only (this loop runs once per annotation).
            try:
                image_position = position_of[ann["image_id"]] if "id" in ann else None
                label = cat_id_to_label[ann["category_id"]]
                bbox, segmentation = ann["bbox"], ann["segmentation"]
            except (KeyError, TypeError):
                image_position = None
            if image_position is not None and type(bbox) is list and len(bbox) == 4 \
                    and number_types.issuperset(map(type, bbox)) and segmentation:
                if type(segmentation) is list:
                    count = 0
                    for polygon in segmentation:
                        if type(polygon) is not list or len(polygon) < 6 or len(polygon) % 2 \
                                or not number_types.issuperset(map(type, polygon)):
                            break
                        polygon_lengths.append(len(polygon))
                        coords.extend(polygon)
                        count += 1
                    if count == len(segmentation):
                        polygon_counts.append(count)
                        offsets.append(offset)
                        image_positions.append(image_position)
                        labels.append(label)
                        crowd.append(bool(ann.get("iscrowd", 0)))
                        boxes.extend(bbox)
                        continue
                    del coords[len(coords) - sum(polygon_lengths[len(polygon_lengths) - count:]):]
                    del polygon_lengths[len(polygon_lengths) - count:]
                elif type(segmentation) is dict:
                    image = images[ann["image_id"]]
                    try:
                        rle = _parse_segmentation(segmentation, image["height"], image["width"], "")
                    except AnnotationError:
                        rle = None  # the one-annotation parser below words the error (its box comes first)
                    if rle is not None:
                        self._add(offset, image_position, label, bool(ann.get("iscrowd", 0)), bbox, rle)
                        continue
            # Anything else: the one-annotation parser raises its error, or returns what it accepts.
            try:
                image_id, box, label, segmentation, is_crowd = dataset._parse_annotation(ann, start + offset, images)
            except ValueError as exc:
                self.rejected.append((offset, exc))
                continue
            x0, y0, x1, y1 = box
            self._add(offset, position_of[image_id], label, is_crowd, [x0, y0, x1 - x0, y1 - y0],
                      segmentation if isinstance(segmentation, dict) else [p.tolist() for p in segmentation])

    def _add(self, offset: int, image_position: int, label: int, is_crowd: bool, bbox: list, segmentation) -> None:
        if isinstance(segmentation, dict):
            self.rles[len(self.offsets)] = segmentation
            self.polygon_counts.append(0)
        else:
            self.polygon_counts.append(len(segmentation))
            for polygon in segmentation:
                self.polygon_lengths.append(len(polygon))
                self.coords.extend(polygon)
        self.offsets.append(offset)
        self.image_positions.append(image_position)
        self.labels.append(label)
        self.crowd.append(is_crowd)
        self.boxes.extend(bbox)

    def check(self, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """``(E,)`` bool, per entry: its box or a polygon fails a check of :func:`_parse_box` or
        :func:`_parse_segmentation` (not finite, empty, outside the image beyond the tolerance). Also keeps,
        for :meth:`PackBuffers.add`, the boxes clipped to xyxy and the polygons clipped to the image."""
        tol = BOUNDS_TOLERANCE
        self.image_positions = np.array(self.image_positions, dtype=np.int64)
        height = heights[self.image_positions].astype(np.float64)
        width = widths[self.image_positions].astype(np.float64)
        x, y, w, h = np.array(self.boxes, dtype=np.float64).reshape(-1, 4).T
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(np.stack([x, y, w, h])).all(0) | (w <= 0) | (h <= 0) | (x < -tol) | (y < -tol) \
                | (x + w > width + tol) | (y + h > height + tol)
            self.boxes = np.stack([np.maximum(x, 0.0), np.maximum(y, 0.0), np.minimum(x + w, width),
                                   np.minimum(y + h, height)], axis=1)  # (E, 4) xyxy
            bad |= (self.boxes[:, 2] <= self.boxes[:, 0]) | (self.boxes[:, 3] <= self.boxes[:, 1])
        self.polygon_counts = np.array(self.polygon_counts, dtype=np.int64)
        self.polygon_lengths = np.array(self.polygon_lengths, dtype=np.int64)
        self.coords = np.array(self.coords, dtype=np.float64)
        if len(self.polygon_lengths):
            owner = np.repeat(np.arange(len(self.offsets)), self.polygon_counts)  # (P,) entry of each polygon
            starts = np.cumsum(self.polygon_lengths) - self.polygon_lengths
            xs, ys = self.coords[0::2], self.coords[1::2]  # every polygon starts at an even offset
            poly_width, poly_height = width[owner], height[owner]
            with np.errstate(invalid="ignore"):
                polygon_bad = ~np.logical_and.reduceat(np.isfinite(self.coords), starts) \
                    | (np.minimum.reduceat(xs, starts // 2) < -tol) | (np.minimum.reduceat(ys, starts // 2) < -tol) \
                    | (np.maximum.reduceat(xs, starts // 2) > poly_width + tol) \
                    | (np.maximum.reduceat(ys, starts // 2) > poly_height + tol)
            bad |= np.bincount(owner, weights=polygon_bad, minlength=len(bad)) > 0
            vertices = self.polygon_lengths // 2
            self.coords[0::2] = xs.clip(0, np.repeat(poly_width, vertices))
            self.coords[1::2] = ys.clip(0, np.repeat(poly_height, vertices))
        return bad

    def error_of(self, entry: int) -> Exception:
        """The error :meth:`CocoDetection._parse_annotation` gives for the entry :meth:`check` found bad."""
        offset = self.offsets[entry]
        try:
            self.dataset._parse_annotation(self.annotations[self.start + offset], self.start + offset, self.images)
        except ValueError as exc:
            return exc
        return RuntimeError(f"{self.dataset.ann_file}: annotation #{self.start + offset} failed the packed checks "
                            "but passes the one-annotation parser")


class _PackBuffers:
    """The valid entries of every chunk, in file order, as lists of arrays to concatenate."""

    def __init__(self):
        self.instance_images, self.boxes, self.labels, self.crowd_images, self.crowd_boxes = [], [], [], [], []
        self.is_rle, self.segment_ranges, self.polygon_ranges, self.coords, self.rle_bytes = [], [], [], [], []
        self.num_polygons = self.num_coords = self.num_rle_bytes = 0

    def add(self, chunk: _ChunkReader, keep: np.ndarray) -> None:
        crowd = np.array(chunk.crowd, dtype=bool)
        instance = keep & ~crowd
        self.crowd_images.append(chunk.image_positions[keep & crowd])
        self.crowd_boxes.append(chunk.boxes[keep & crowd].astype(np.float32))
        self.instance_images.append(chunk.image_positions[instance])
        self.boxes.append(chunk.boxes[instance].astype(np.float32))
        self.labels.append(np.array(chunk.labels, dtype=np.int64)[instance])
        is_rle = chunk.polygon_counts == 0
        self.is_rle.append(is_rle[instance])
        # polygons of kept instances: their coordinates, then each polygon's [start, end) in them
        polygon_kept = np.repeat(instance, chunk.polygon_counts)
        lengths = chunk.polygon_lengths[polygon_kept]
        self.coords.append(chunk.coords[np.repeat(polygon_kept, chunk.polygon_lengths)].astype(np.float32))
        ends = self.num_coords + np.cumsum(lengths)
        self.polygon_ranges.append(np.stack([ends - lengths, ends], axis=1))
        self.num_coords += int(lengths.sum())
        # each instance's segment: [first, end) polygon, or [start, end) RLE byte
        counts = np.where(instance, chunk.polygon_counts, 0)
        polygon_ends = self.num_polygons + np.cumsum(counts)
        ranges = np.stack([polygon_ends - counts, polygon_ends], axis=1)
        for entry in np.flatnonzero(instance & is_rle):
            counts_bytes = chunk.rles[int(entry)]["counts"]
            ranges[entry] = (self.num_rle_bytes, self.num_rle_bytes + len(counts_bytes))
            self.rle_bytes.append(counts_bytes)
            self.num_rle_bytes += len(counts_bytes)
        self.segment_ranges.append(ranges[instance])
        self.num_polygons += int(counts.sum())


class PackedAnnotations:
    """Every image's annotations in flat numpy arrays (in memory, or memory-mapped from a cache file).

    Shorthand: I images (the json's order), M instances, C crowd regions, P polygons, V coordinates.
    ``arrays``: ``image_ids`` (I,) int64, ``heights``/``widths`` (I,) int64, ``name_ends`` (I,) int64 end of
    each file name in ``names`` (utf-8 bytes), ``instance_ends``/``crowd_ends`` (I,) int64 end of each
    image's rows in the instance / crowd arrays; ``boxes`` (M, 4) float32 xyxy pixels, ``labels`` (M,)
    int64, ``is_rle`` (M,) bool, ``segments`` (M, 2) int64 [start, end) of the instance's rows of
    ``polygons`` or bytes of ``rle_bytes``; ``polygons`` (P, 2) int64 [start, end) in ``coords`` (V,)
    float32 ``x, y, ...``; ``crowd_boxes`` (C, 4) float32. ``categories``: id -> name; ``skipped``: counts
    of skipped annotations per reason.
    """

    def __init__(self, arrays: Dict[str, np.ndarray], categories: Dict[int, str], skipped: Dict[str, int],
                 source: Optional[Path] = None):
        self.arrays, self.categories, self.skipped, self.source = arrays, categories, skipped, source
        self.key: Optional[dict] = None  # the cache key, for a cache-backed instance

    @classmethod
    def from_parts(cls, parts: _PackBuffers, *, image_ids: List[int], heights: np.ndarray, widths: np.ndarray,
                   names: List[bytes], categories: Dict[int, str], skipped: Dict[str, int]) -> "PackedAnnotations":
        num_images = len(image_ids)
        instance_images = np.concatenate(parts.instance_images) if parts.instance_images else np.zeros(0, np.int64)
        crowd_images = np.concatenate(parts.crowd_images) if parts.crowd_images else np.zeros(0, np.int64)
        order = np.argsort(instance_images, kind="stable")  # group by image, file order within an image
        crowd_order = np.argsort(crowd_images, kind="stable")

        def joined(pieces, dtype, shape=()):
            return np.concatenate(pieces) if pieces else np.zeros((0, *shape), dtype=dtype)

        arrays = {
            "image_ids": np.array(image_ids, dtype=np.int64), "heights": heights, "widths": widths,
            "name_ends": np.cumsum([len(n) for n in names], dtype=np.int64),
            "names": np.frombuffer(b"".join(names), dtype=np.uint8),
            "instance_ends": np.cumsum(np.bincount(instance_images, minlength=num_images), dtype=np.int64),
            "crowd_ends": np.cumsum(np.bincount(crowd_images, minlength=num_images), dtype=np.int64),
            "boxes": joined(parts.boxes, np.float32, (4,))[order],
            "labels": joined(parts.labels, np.int64)[order],
            "is_rle": joined(parts.is_rle, bool)[order],
            "segments": joined(parts.segment_ranges, np.int64, (2,))[order],
            "polygons": joined(parts.polygon_ranges, np.int64, (2,)),
            "coords": joined(parts.coords, np.float32),
            "rle_bytes": np.frombuffer(b"".join(parts.rle_bytes), dtype=np.uint8),
            "crowd_boxes": joined(parts.crowd_boxes, np.float32, (4,))[crowd_order],
        }
        return cls(arrays, categories, skipped)

    def __len__(self) -> int:
        return len(self.arrays["image_ids"])

    def __getitem__(self, position: int) -> dict:
        """The record of the image at ``position`` in the json (see :meth:`CocoDetection.record`)."""
        a = self.arrays
        height, width = int(a["heights"][position]), int(a["widths"][position])
        name_start = int(a["name_ends"][position - 1]) if position else 0
        first = int(a["instance_ends"][position - 1]) if position else 0
        last = int(a["instance_ends"][position])
        crowd_first = int(a["crowd_ends"][position - 1]) if position else 0
        segmentations = []
        for (start, end), is_rle in zip(a["segments"][first:last].tolist(), a["is_rle"][first:last].tolist()):
            if is_rle:
                segmentations.append({"size": [height, width], "counts": a["rle_bytes"][start:end].tobytes()})
            else:
                segmentations.append([np.array(a["coords"][s:e]) for s, e in a["polygons"][start:end].tolist()])
        return {
            "image_id": int(a["image_ids"][position]),
            "file_name": a["names"][name_start:int(a["name_ends"][position])].tobytes().decode("utf-8"),
            "height": height, "width": width,
            "boxes": np.array(a["boxes"][first:last]),
            "labels": np.array(a["labels"][first:last]),
            "segmentations": segmentations,
            "crowd_boxes": np.array(a["crowd_boxes"][crowd_first:int(a["crowd_ends"][position])]),
        }

    def save(self, path: Path, key: dict) -> None:
        """Write the arrays to ``path`` atomically: magic, header length, JSON header, 64-byte aligned arrays."""
        layout, offset = {}, 0
        for name, array in self.arrays.items():
            layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
            offset += -(-array.nbytes // 64) * 64
        header = json.dumps({"key": key, "categories": [[i, n] for i, n in self.categories.items()],
                             "skipped": self.skipped, "arrays": layout}).encode("utf-8")
        data_start = -(-(len(_CACHE_MAGIC) + 8 + len(header)) // 64) * 64

        def write(f: BinaryIO) -> None:
            f.write(_CACHE_MAGIC + len(header).to_bytes(8, "little") + header)
            for name, array in self.arrays.items():
                f.seek(data_start + layout[name]["offset"])
                f.write(np.ascontiguousarray(array).tobytes())
            f.truncate(data_start + offset)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path, key: dict) -> Optional["PackedAnnotations"]:
        """The arrays memory-mapped from a cache file; ``None`` if it is missing, unreadable, of another format
        or written for another ``key``."""
        try:
            with open(path, "rb") as f:
                if f.read(len(_CACHE_MAGIC)) != _CACHE_MAGIC:
                    return None
                header_length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_length))
            if header.get("key") != key:
                return None
            buffer = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError):
            return None
        data_start = -(-(len(_CACHE_MAGIC) + 8 + header_length) // 64) * 64
        arrays = {}
        for name, spec in header["arrays"].items():
            dtype = np.dtype(spec["dtype"])
            start = data_start + spec["offset"]
            count = int(np.prod(spec["shape"], dtype=np.int64))
            arrays[name] = buffer[start:start + count * dtype.itemsize].view(dtype).reshape(spec["shape"])
        packed = cls(arrays, {int(i): n for i, n in header["categories"]}, header["skipped"], source=Path(path))
        packed.key = key
        return packed

    def __getstate__(self) -> dict:
        """Pickled (for spawned loader workers) as the cache file's path and key where there is one."""
        if self.source is not None:
            return {"source": self.source, "key": self.key}
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        if "arrays" in state:
            self.__dict__.update(state)
            return
        packed = PackedAnnotations.load(state["source"], state["key"])
        if packed is None:
            raise ValueError(f"annotation cache {state['source']} changed or vanished since the dataset was built")
        self.__dict__.update(packed.__dict__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (if it runs) for the duration of the block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _json_key(ann_file: Path, skip_bad_annotations: bool) -> dict:
    """What a cache of ``ann_file`` must match: its size, modification time and blake2b content hash, the
    format and the one option that changes the packed content."""
    stat = ann_file.stat()
    with open(ann_file, "rb") as f:
        digest = hashlib.file_digest(f, "blake2b").hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": digest,
            "skip_bad_annotations": skip_bad_annotations}


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed; left in place, as removing a lock file
    races with its next user). Where it cannot be created or locked, proceed without it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load_or_build_cache(ann_file: Path, skip_bad_annotations: bool,
                         build: Callable[[], PackedAnnotations]) -> PackedAnnotations:
    """The packed annotations of ``ann_file`` from its cache, built (by ``build``) and written there first
    where the cache is missing or stale. Of processes that find it so at once, one builds while the others
    wait on the lock, then read what it wrote."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    key = _json_key(ann_file, skip_bad_annotations)
    path = ann_file.with_name(ann_file.name + CACHE_SUFFIX)
    packed = PackedAnnotations.load(path, key)
    if packed is not None:
        return packed
    with _exclusive(path.with_name(path.name + ".lock")):
        packed = PackedAnnotations.load(path, key)
        if packed is not None:
            return packed
        packed = build()
        try:
            packed.save(path, key)
        except OSError as exc:
            warnings.warn(f"cannot write the annotation cache {path} ({exc}); keeping the annotations in memory")
            return packed
    return PackedAnnotations.load(path, key) or packed
