"""COCO annotations packed into flat numpy arrays, validated a chunk at a time.

At COCO scale the annotations are not kept as Python objects: boxes, labels and polygons (float32
coordinates) live in a handful of flat numpy arrays, RLE masks as bytes in one buffer
(:class:`PackedAnnotations`), which :mod:`maskrcnn.data.annotation_cache` writes to a file that every
process memory-maps. :func:`pack_annotations` builds them: validation is vectorised over chunks of
annotations; an annotation that fails a check is parsed again by
:func:`maskrcnn.data.coco_json.parse_annotation`, which words the error.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from maskrcnn.data.coco_json import (AnnotationError, BOUNDS_TOLERANCE, contiguous_labels, load_json,
                                     parse_annotation, parse_segmentation, read_categories, read_images)

_CHUNK = 65536  # annotations validated together
_NUMBER_TYPES = frozenset((int, float))


def pack_annotations(ann_file: Path, skip_bad_annotations: bool) -> "PackedAnnotations":
    """Read and validate the json into packed arrays (see :class:`PackedAnnotations`).

    Annotations are validated a chunk at a time: a loop that only reads fields and checks their types,
    then numpy checks of every box and polygon of the chunk at once. An annotation that fails either is
    handed to :func:`parse_annotation`, which raises (or, with ``skip_bad_annotations``, counts) its error;
    the first bad annotation in file order is the one reported. The json's annotation objects are released
    chunk by chunk, so that the peak memory is that of the parsed json. The cyclic garbage collector is
    paused meanwhile: the json's millions of objects hold no cycles, and each collection would walk them all.
    """
    with _gc_paused():
        data = load_json(ann_file)
        categories = read_categories(data["categories"], ann_file)
        cat_id_to_label = contiguous_labels(categories)
        images = read_images(data["images"], ann_file)
        image_ids = list(images)
        position_of = {image_id: i for i, image_id in enumerate(image_ids)}
        heights = np.array([images[i]["height"] for i in image_ids], dtype=np.int64)
        widths = np.array([images[i]["width"] for i in image_ids], dtype=np.int64)
        annotations = data.get("annotations", [])
        skipped = Counter()
        parts = _PackBuffers()
        for start in range(0, len(annotations), _CHUNK):
            end = min(start + _CHUNK, len(annotations))
            chunk = _ChunkReader(ann_file, cat_id_to_label, annotations, start, end, images, position_of)
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
            annotations[start:end] = [None] * (end - start)
        names = [images[i]["file_name"].encode("utf-8") for i in image_ids]
        return PackedAnnotations.from_parts(parts, image_ids=image_ids, heights=heights, widths=widths, names=names,
                                            categories=categories, skipped=dict(skipped))


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


class _ChunkReader:
    """Annotations ``start..end-1`` of the json read into flat lists, one entry per annotation that passed the
    type checks: its offset in the chunk, image position, label, crowd flag, box ``x, y, w, h`` and
    segmentation (polygon lengths and coordinates, or a compressed RLE dict). Annotations that failed are in
    ``rejected`` as ``(offset, exception)``; :meth:`check` finds the numerically bad entries."""

    def __init__(self, ann_file: Path, cat_id_to_label: Dict[int, int], annotations: list, start: int, end: int,
                 images: Dict[int, dict], position_of: Dict[int, int]):
        self.ann_file, self.cat_id_to_label = ann_file, cat_id_to_label
        self.annotations, self.start, self.images = annotations, start, images
        self.offsets, self.image_positions, self.labels, self.crowd, self.boxes = [], [], [], [], []
        self.polygon_counts, self.polygon_lengths, self.coords = [], [], []  # polygon_counts 0: an RLE
        self.rles: Dict[int, dict] = {}  # entry -> compressed RLE
        self.rejected: List[Tuple[int, Exception]] = []
        number_types = _NUMBER_TYPES
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
                        rle = parse_segmentation(segmentation, image["height"], image["width"], "")
                    except AnnotationError:
                        rle = None  # the one-annotation parser below words the error (its box comes first)
                    if rle is not None:
                        self._add(offset, image_position, label, bool(ann.get("iscrowd", 0)), bbox, rle)
                        continue
            # Anything else: the one-annotation parser raises its error, or returns what it accepts.
            try:
                image_id, box, label, segmentation, is_crowd = parse_annotation(ann, start + offset, images,
                                                                                cat_id_to_label, ann_file)
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
        """``(E,)`` bool, per entry: its box or a polygon fails a check of :func:`parse_box` or
        :func:`parse_segmentation` (not finite, empty, outside the image beyond the tolerance). Also keeps,
        for :meth:`_PackBuffers.add`, the boxes clipped to xyxy and the polygons clipped to the image."""
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
        """The error :func:`parse_annotation` gives for the entry :meth:`check` found bad."""
        offset = self.offsets[entry]
        try:
            parse_annotation(self.annotations[self.start + offset], self.start + offset, self.images,
                             self.cat_id_to_label, self.ann_file)
        except ValueError as exc:
            return exc
        return RuntimeError(f"{self.ann_file}: annotation #{self.start + offset} failed the packed checks "
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

    def __init__(self, arrays: Dict[str, np.ndarray], categories: Dict[int, str], skipped: Dict[str, int]):
        self.arrays, self.categories, self.skipped = arrays, categories, skipped

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
        """The record of the image at ``position`` in the json (see :meth:`maskrcnn.data.coco.CocoDetection.record`)."""
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
