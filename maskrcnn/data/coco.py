"""COCO-format instance segmentation dataset.

Shorthand: M instances (non-crowd annotations) of one image, C crowd regions of that image, H, W the
image's height and width in pixels.

Annotations are read and validated once, when the dataset is built (:mod:`maskrcnn.data.coco_json` checks
each entry, :mod:`maskrcnn.data.packing` packs them into flat arrays), so that a bad annotation stops the
run at once with a message naming the file, the annotation id and the image id, instead of failing later
inside a loader worker. The packed arrays are cached in a file that every process memory-maps
(:mod:`maskrcnn.data.annotation_cache`). Image files are only opened on read (``check_images`` checks them
all up front). Labels are contiguous: the K categories, sorted by COCO category id, get labels 1..K (0 is
background).

A sample is ``(image, target)``:
- image: ``(3, H, W)`` float32 RGB in [0, 1], after the transforms (:meth:`CocoDetection.load` gives it
  before them: ``(H, W, 3)`` uint8);
- target: ``boxes`` ``(M, 4)`` float32 xyxy pixels of the returned image; ``labels`` ``(M,)`` int64 in
  1..K; ``masks`` :class:`PolygonMasks` when every instance of the image is a polygon, else
  :class:`BitMasks` (RLE decoded, polygons rasterised), index-aligned with ``boxes``; ``crowd_boxes``
  ``(C, 4)`` float32 xyxy pixels of the returned image (crowd regions: never matched, anchors inside them
  are ignored); ``image_id`` int (COCO id); ``orig_size`` ``(H, W)`` of the image file.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor
from tqdm import tqdm

from maskrcnn.config import DataConfig
from maskrcnn.data.annotation_cache import load_or_build
from maskrcnn.data.coco_json import AnnotationError, BOUNDS_TOLERANCE, contiguous_labels
from maskrcnn.data.packing import pack_annotations
from maskrcnn.data.samplers import repeat_factors_from_category_frequency
from maskrcnn.errors import InputError
from maskrcnn.fileio import image_header, read_image
from maskrcnn.structures import BitMasks, InstanceMasks, PolygonMasks

__all__ = ["AnnotationError", "BOUNDS_TOLERANCE", "CocoDetection"]  # the first two live in coco_json


class CocoDetection(torch.utils.data.Dataset):
    """Images and instance annotations from a COCO ``instances_*.json`` file.

    ann_file: the COCO json. image_dir: folder holding each image's ``file_name``.
    transforms: called as ``transforms(image, target, rng)`` with image ``(H, W, 3)`` uint8 RGB, the
    target described in the module docstring and a ``np.random.Generator``; returns ``(image, target)``.
    skip_bad_annotations: skip invalid annotations instead of raising; ``skipped`` counts them per reason
    and one warning gives the totals.
    cache: read the packed annotations from (and write them first to) their cache file, memory-mapped (see
    :mod:`maskrcnn.data.annotation_cache`); False packs them in memory every time.
    cache_dir: the folder of the cache file; None or "" puts it beside ``ann_file`` (as
    ``<ann_file>.maskrcnn-cache``).
    repeat_factor_threshold: the category frequency below which the training sampler repeats an image
    (:meth:`repeat_factors`); 0: every image once per epoch.

    Every image of the json is served; :meth:`drop_empty` keeps only those with a usable non-crowd
    annotation (training with ``data.filter_empty``).

    Items are indexed by position, or by ``(position, augmentation_seed)`` so that random transforms are
    reproducible (see :class:`maskrcnn.data.samplers.TrainingSampler`); a bare position draws fresh
    randomness.
    """

    def __init__(self, ann_file: Union[str, Path], image_dir: Union[str, Path], *,
                 transforms: Optional[Callable] = None,
                 skip_bad_annotations: bool = DataConfig.skip_bad_annotations,
                 cache: bool = DataConfig.annotation_cache, cache_dir: Optional[Union[str, Path]] = None,
                 repeat_factor_threshold: float = DataConfig.repeat_factor_threshold):
        if not 0 <= repeat_factor_threshold < math.inf:
            raise InputError(f"data.repeat_factor_threshold must be a fraction of images >= 0 (0: off), got "
                             f"{repeat_factor_threshold}")
        self.repeat_factor_threshold = float(repeat_factor_threshold)
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        if cache:
            packed = load_or_build(self.ann_file, skip_bad_annotations,
                                   lambda: pack_annotations(self.ann_file, skip_bad_annotations), cache_dir=cache_dir)
        else:
            packed = pack_annotations(self.ann_file, skip_bad_annotations)
        self._records = packed
        self._set_categories(packed.categories)
        self.skipped: Dict[str, int] = dict(packed.skipped)
        if self.skipped:
            details = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            warnings.warn(f"{self.ann_file}: skipped {sum(self.skipped.values())} bad annotations ({details})")

        self._serve(np.arange(len(packed)))

    def drop_empty(self) -> None:
        """Serve only the images that have at least one usable non-crowd annotation."""
        instance_counts = np.diff(self._records.arrays["instance_ends"], prepend=0)
        self._serve(self._positions[instance_counts[self._positions] > 0])

    def _serve(self, positions: np.ndarray) -> None:
        """Serve the images at ``positions`` (indices in the json's image order), in that order."""
        arrays = self._records.arrays
        self._positions = positions
        self.image_ids: List[int] = arrays["image_ids"][positions].tolist()
        self.image_sizes: List[Tuple[int, int]] = list(zip(arrays["heights"][positions].tolist(),
                                                           arrays["widths"][positions].tolist()))

    def _set_categories(self, categories: Dict[int, str]) -> None:
        sorted_ids = sorted(categories)
        self.class_names: List[str] = [categories[cat_id] for cat_id in sorted_ids]
        self.cat_id_to_label: Dict[int, int] = contiguous_labels(categories)
        self.label_to_cat_id: Dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.categories: List[dict] = [{"id": cat_id, "name": categories[cat_id]} for cat_id in sorted_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[Tensor, dict]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target, np.random.default_rng(seed))
        # (H, W, 3) 0-255 -> (3, H, W) float32 in [0, 1]
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return image, target

    def load(self, index: int) -> Tuple[np.ndarray, dict]:
        """Image ``index`` (a position in this dataset) as read, before the transforms: ``(H, W, 3)`` uint8 RGB
        and the target of the module docstring in the file's pixels (what the transforms receive)."""
        record = self.record(index)
        return self._read_image(record), {
            "boxes": torch.from_numpy(record["boxes"]),
            "labels": torch.from_numpy(record["labels"]),
            "masks": _instance_masks(record),
            "crowd_boxes": torch.from_numpy(record["crowd_boxes"]),
            "image_id": record["image_id"],
            "orig_size": (record["height"], record["width"]),
        }

    def repeat_factors(self) -> Optional[np.ndarray]:
        """``(N,)`` float64, per image: how many times an epoch of the training sampler holds it on average,
        the LVIS repeat factors for ``repeat_factor_threshold`` among the images served
        (:func:`~maskrcnn.data.samplers.repeat_factors_from_category_frequency`); None when the threshold is
        0 (each image once). Read from the packed labels: no image or segmentation is touched."""
        if not self.repeat_factor_threshold:
            return None
        ends = self._records.arrays["instance_ends"]
        starts = np.concatenate([[0], ends[:-1]])
        labels = self._records.arrays["labels"]
        return repeat_factors_from_category_frequency([labels[starts[p]:ends[p]] for p in self._positions.tolist()],
                                                      self.repeat_factor_threshold)

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
        every problem is a missing file and :class:`InputError` otherwise, listing every bad file with its image id.
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
                height, width, _ = image_header(path)  # the upright size: EXIF orientation applied
            except ValueError as exc:
                problems.append(f"{exc} ({where})")
                continue
            if (height, width) != (record["height"], record["width"]):
                problems.append(_size_mismatch(path, (height, width), record, self.ann_file))
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            error = FileNotFoundError if missing == len(problems) else InputError
            raise error(f"{len(problems)} bad image file{'s' if len(problems) > 1 else ''}:\n  {shown}{more}")

    def _read_image(self, record: dict) -> np.ndarray:
        """The image file as ``(H, W, 3)`` uint8 RGB, raw pixel order (EXIF orientation ignored, as COCO)."""
        path = self.image_dir / record["file_name"]
        image = read_image(path, where=f"image id {record['image_id']} in {self.ann_file}")
        if image.shape[:2] != (record["height"], record["width"]):
            raise InputError(_size_mismatch(path, image.shape[:2], record, self.ann_file))
        return image


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
