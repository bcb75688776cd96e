"""Small shared types: a padded image batch, instance masks in two storage forms, and the detections of
one image (:class:`Instances`).

Shorthand: N images, M instances of one image, R RoIs, S the side of a mask target (28).

Instance masks of one image come as either
- :class:`BitMasks`: a ``(M, H, W)`` bool tensor (from RLE or from arrays), or
- :class:`PolygonMasks`: COCO polygons in image pixels, kept as polygons until the RoI crop, so that
  no full-resolution bitmap per instance is ever built for polygon annotations.
Both offer the same operations (``scale``, ``flip``, ``crop_and_resize``, indexing), so the data
pipeline and the mask head never ask which one they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from .rle import encode_masks


def covered(soft: Tensor) -> Tensor:
    """Mask targets from coverage: ``soft`` (any shape) is the fraction of object under each cell or point, in
    [0, 1]; returns float 0/1, 1 where it exceeds half, as the paste decides at probability 0.5 (a cell or
    point exactly on an object's edge is background). The 28x28 targets and the point head's labels both use it."""
    return (soft > 0.5).float()


@dataclass
class ImageList:
    """A batch of images padded to one size.

    tensor: ``(N, 3, Hp, Wp)`` float, normalised pixels; padding is zero on the bottom and right.
    image_sizes: per image ``(h, w)`` of its unpadded content, in pixels of the resized input.
    """

    tensor: Tensor
    image_sizes: List[Tuple[int, int]]

    def __len__(self) -> int:
        return len(self.image_sizes)


class BitMasks:
    """Instance masks as a ``(M, H, W)`` bool tensor in the pixels of one image."""

    def __init__(self, tensor: Tensor):
        if tensor.dim() != 3:
            raise ValueError(f"BitMasks expects a (M, H, W) tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor.bool()

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def __getitem__(self, index) -> "BitMasks":
        if isinstance(index, int):
            index = [index]
        return BitMasks(self.tensor[index])

    def to(self, device) -> "BitMasks":
        return BitMasks(self.tensor.to(device))

    def scale(self, new_size: Tuple[int, int]) -> "BitMasks":
        """Resample (nearest) to ``new_size = (h, w)`` pixels."""
        if len(self) == 0:
            return BitMasks(self.tensor.new_zeros((0, *new_size)))
        if tuple(new_size) == self.image_size:
            return self
        out = F.interpolate(self.tensor[:, None].float(), size=tuple(new_size), mode="nearest")[:, 0]
        return BitMasks(out > 0.5)

    def flip(self) -> "BitMasks":
        """Mirror horizontally."""
        return BitMasks(self.tensor.flip(-1))

    def area(self) -> Tensor:
        """``(M,)`` float pixel counts."""
        return self.tensor.flatten(1).sum(1).float()

    def crop_and_resize(self, boxes: Tensor, size: int, indices: Optional[Tensor] = None) -> Tensor:
        """Crop masks to boxes and resample to ``size x size``.

        boxes: ``(R, 4)`` float xyxy in this image's pixels.
        indices: ``(R,)`` int64, the mask that each box crops; default ``arange(R)`` (index-aligned).
        Returns ``(R, size, size)`` float of 0/1 values: bilinear RoIAlign of the 0/1 mask with pixel ``i``
        covering ``[i, i + 1)`` (aligned), the same geometry as the polygon rasterisation, 1 where it exceeds
        0.5 (a cell covered exactly half is background, as a pasted pixel at exactly the threshold is).

        Mask targets are hard 0/1 whichever way an instance is stored (Detectron2's convention, not
        torchvision's soft RoIAlign values): a polygon is rasterised on the grid, so a bitmap is thresholded
        too, and the same shape gets the same target whether the dataset stored it as a polygon or as RLE.
        The loss then asks for the decision the inference paste makes at probability 0.5.
        """
        if len(boxes) == 0:
            return boxes.new_zeros((0, size, size), dtype=torch.float32)
        if indices is None:
            indices = torch.arange(len(boxes), device=boxes.device)
        masks = self.tensor.to(device=boxes.device, dtype=torch.float32)[:, None]
        rois = torch.cat([indices.to(boxes.device, torch.float32)[:, None], boxes.float()], 1)
        soft = roi_align(masks, rois, (size, size), 1.0, sampling_ratio=0, aligned=True)[:, 0]
        return covered(soft)


class PolygonMasks:
    """Instance masks as COCO polygons: per instance, a list of ``(2P,)`` float64 arrays
    ``x0, y0, x1, y1, ...`` in the pixels of an image of ``image_size = (h, w)``."""

    def __init__(self, polygons: Sequence[Sequence[np.ndarray]], image_size: Tuple[int, int]):
        self.polygons = [[np.asarray(p, dtype=np.float64).reshape(-1) for p in inst] for inst in polygons]
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return len(self.polygons)

    def __getitem__(self, index) -> "PolygonMasks":
        if isinstance(index, int):
            index = [index]
        if isinstance(index, Tensor):
            index = index.tolist() if index.dtype != torch.bool else index.nonzero()[:, 0].tolist()
        return PolygonMasks([self.polygons[i] for i in index], self.image_size)

    def to(self, device) -> "PolygonMasks":
        return self

    def scale(self, new_size: Tuple[int, int]) -> "PolygonMasks":
        """Rescale coordinates to an image of ``new_size = (h, w)`` pixels."""
        sy = new_size[0] / self.image_size[0]
        sx = new_size[1] / self.image_size[1]
        out = []
        for inst in self.polygons:
            scaled = []
            for p in inst:
                p = p.copy()
                p[0::2] *= sx
                p[1::2] *= sy
                scaled.append(p)
            out.append(scaled)
        return PolygonMasks(out, new_size)

    def flip(self) -> "PolygonMasks":
        """Mirror horizontally."""
        width = self.image_size[1]
        out = []
        for inst in self.polygons:
            flipped = []
            for p in inst:
                p = p.copy()
                p[0::2] = width - p[0::2]
                flipped.append(p)
            out.append(flipped)
        return PolygonMasks(out, self.image_size)

    def area(self) -> Tensor:
        """``(M,)`` float areas of the rasterised polygons (pixels)."""
        h, w = self.image_size
        areas = [float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([list(p) for p in inst], h, w))))
                 if inst else 0.0 for inst in self.polygons]
        return torch.tensor(areas, dtype=torch.float32)

    def to_bitmasks(self) -> BitMasks:
        """Rasterise at full image resolution (for display and tests, not the training path)."""
        h, w = self.image_size
        out = np.zeros((len(self), h, w), dtype=bool)
        for i, inst in enumerate(self.polygons):
            if inst:
                rle = mask_utils.merge(mask_utils.frPyObjects([list(p) for p in inst], h, w))
                out[i] = mask_utils.decode(rle).astype(bool)
        return BitMasks(torch.from_numpy(out))

    def crop_and_resize(self, boxes: Tensor, size: int, indices: Optional[Tensor] = None) -> Tensor:
        """Rasterise polygons inside boxes on a ``size x size`` grid.

        boxes: ``(R, 4)`` float xyxy in this image's pixels.
        indices: ``(R,)`` int64, the instance that each box crops; default ``arange(R)`` (index-aligned).
        Returns ``(R, size, size)`` float of 0/1 values.
        """
        if indices is None:
            indices = torch.arange(len(boxes))
        out = np.zeros((len(boxes), size, size), dtype=np.float32)
        instances = [self.polygons[j] for j in indices.tolist()]
        for i, (inst, box) in enumerate(zip(instances, boxes.detach().cpu().double().numpy())):
            if not inst:
                continue
            x0, y0, x1, y1 = box
            sx = size / max(x1 - x0, 0.1)
            sy = size / max(y1 - y0, 0.1)
            local = []
            for p in inst:
                q = p.copy()
                q[0::2] = (q[0::2] - x0) * sx
                q[1::2] = (q[1::2] - y0) * sy
                local.append(list(q))
            rle = mask_utils.merge(mask_utils.frPyObjects(local, size, size))
            out[i] = mask_utils.decode(rle)
        return torch.from_numpy(out).to(boxes.device)


InstanceMasks = Union[BitMasks, PolygonMasks]


class Instances:
    """Detections in one image, sorted as the model returned them (by score, highest first).

    boxes: ``(N, 4)`` float32 xyxy in pixels of the original image.
    scores: ``(N,)`` float32 class probabilities in [0, 1].
    labels: ``(N,)`` int64 class labels in 1..K.
    class_names: N strings, the name of each detection's label.
    masks: ``(N, H, W)`` bool tensor (bitmap), a list of N COCO RLE dicts (rle), or None.
    image_size: ``(H, W)`` of the original image (pixels).
    label_to_cat_id: the model's label -> dataset category id map, used by :meth:`to_coco`; None: the
        label is the category id.
    """

    def __init__(self, *, boxes: Tensor, scores: Tensor, labels: Tensor, class_names: List[str],
                 masks: Union[Tensor, List[dict], None], image_size: tuple,
                 label_to_cat_id: Optional[Dict[int, int]] = None):
        self.boxes = boxes
        self.scores = scores
        self.labels = labels
        self.class_names = class_names
        self.masks = masks
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.label_to_cat_id = label_to_cat_id

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, index) -> "Instances":
        """An int, a slice, a ``(N,)`` bool mask or an int64 index tensor selects detections."""
        positions = torch.arange(len(self))[index]
        if positions.dim() == 0:
            positions = positions[None]
        kept = positions.tolist()
        masks = self.masks
        if isinstance(masks, Tensor):
            masks = masks[positions]
        elif masks is not None:
            masks = [masks[i] for i in kept]
        return Instances(boxes=self.boxes[positions], scores=self.scores[positions], labels=self.labels[positions],
                         class_names=[self.class_names[i] for i in kept], masks=masks, image_size=self.image_size,
                         label_to_cat_id=self.label_to_cat_id)

    def filter(self, score_thresh: float) -> "Instances":
        """The detections scoring at least ``score_thresh``."""
        return self[self.scores >= score_thresh]

    def to_coco(self, image_id, label_to_cat_id: Optional[Dict[int, int]] = None) -> List[dict]:
        """COCO result dicts: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h pixels), ``score`` and,
        when masks are present, ``segmentation`` (RLE with string counts).

        label_to_cat_id: maps labels 1..K to dataset category ids (default: the map these detections carry,
            see :func:`maskrcnn.inference.match_categories`); detections of labels it does not map have no
            category in the dataset and are left out. Without any map the label is the category id.
        """
        mapping = self.label_to_cat_id if label_to_cat_id is None else label_to_cat_id
        kept = self if mapping is None else self[torch.tensor([label in mapping for label in self.labels.tolist()],
                                                              dtype=torch.bool)]
        labels = kept.labels.tolist()
        category_ids = labels if mapping is None else [mapping[label] for label in labels]
        xywh = kept.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        segmentations = encode_masks(kept.masks) if isinstance(kept.masks, Tensor) else kept.masks
        results = []
        for i, (box, score, category_id) in enumerate(zip(xywh.tolist(), kept.scores.tolist(), category_ids)):
            result = {"image_id": image_id, "category_id": int(category_id), "bbox": box, "score": score}
            if segmentations is not None:
                result["segmentation"] = segmentations[i]
            results.append(result)
        return results

    def __repr__(self) -> str:
        mask_kind = "none" if self.masks is None else "rle" if isinstance(self.masks, list) else "bitmap"
        return f"Instances(num={len(self)}, image_size={self.image_size}, masks={mask_kind})"
