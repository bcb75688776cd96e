"""Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for
Instance Segmentation", 2021): instances of a second training image, cut out along their masks, are pasted
onto the image being trained on.

Shorthand: M instances of the image pasted onto (the destination), K instances pasted, C crowd regions of
the destination, H, W the destination's height and width in pixels, Hs, Ws the source image's.

As in the paper, both images are augmented on their own first (large-scale jitter, flip: the same
transforms, each with its own draws), a random subset of the source's instances is pasted without
blending (the paper found Gaussian blending of the edges made no difference), and the destination is
updated: a pasted pixel belongs to the pasted instance on top of it and to no other instance.
- Destination instances lose the pasted pixels; one left with less than ``min_visible`` of its pixels
  (nearly or fully covered) is dropped.
- Pasted instances cover one another where they overlap in the source (its annotations may): smaller ones
  on top, as a small object in front of a large one is the more common case; the same ``min_visible`` rule
  drops one that others cover.
- Every box is then the tight box of its instance's remaining pixels, and every mask a bitmap
  (:class:`~maskrcnn.structures.BitMasks`: polygons cannot have holes cut into them).
- Crowd regions are boxes here (the packed annotations keep no crowd masks): a destination crowd box
  loses its pasted pixels as an instance does, is dropped under the same rule, and otherwise shrinks to the
  tight box of what is left of it. The source's crowd regions are not pasted, neither as instances (they are
  not one object) nor as crowd (only instance pixels are cut out of the source).
The source is placed at the destination's top left corner; with large-scale jitter both are the same square,
otherwise the parts of the source outside the destination are cut off.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from maskrcnn.data.transforms import mask_boxes
from maskrcnn.errors import InputError
from maskrcnn.structures import BitMasks, InstanceMasks

MIN_VISIBLE = 0.05  # an instance left with less than this fraction of its pixels visible is dropped


class CopyPaste:
    """Paste instances of another image of ``source`` onto the image, a transform called as the others are
    (``transform(image, target, rng)``, see :mod:`maskrcnn.data.transforms`).

    source: the dataset to draw from (``len(source)`` and ``source.load(index)``, as
    :class:`~maskrcnn.data.coco.CocoDetection`; drawing the image itself is allowed). source_transforms:
    what the source image goes through first (those the destination went through). min_visible: see the
    module docstring.

    From ``rng``, in order: the source index, the source's own augmentation, the number of instances pasted
    (uniform in 1..K of the source's), which ones. The whole result is fixed by the sample's seed, so a
    resumed run pastes what the uninterrupted run pasted. A source left with no instance pastes nothing.
    """

    def __init__(self, source, source_transforms, *, min_visible: float = MIN_VISIBLE):
        if not 0.0 <= min_visible <= 1.0:
            raise InputError(f"copy-paste min_visible must be a fraction in [0, 1], got {min_visible}")
        self.source, self.source_transforms, self.min_visible = source, source_transforms, min_visible

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
        source_image, source_target = self.source.load(int(rng.integers(len(self.source))))
        source_image, source_target = self.source_transforms(source_image, source_target, rng)
        count = len(source_target["labels"])
        if count == 0:
            return image, target
        chosen = np.sort(rng.choice(count, size=int(rng.integers(1, count + 1)), replace=False)).tolist()
        pasted = {"masks": source_target["masks"][chosen], "labels": source_target["labels"][chosen]}
        return paste_instances(image, target, source_image, pasted, min_visible=self.min_visible)


def paste_instances(image: np.ndarray, target: dict, source_image: np.ndarray, pasted: dict, *,
                    min_visible: float = MIN_VISIBLE) -> Tuple[np.ndarray, dict]:
    """Paste every instance of ``pasted`` onto ``image`` (the rules of the module docstring).

    image: ``(H, W, 3)`` 0-255 RGB; target: its target dict (``boxes``, ``labels``, ``masks``,
    ``crowd_boxes``, ...). source_image: ``(Hs, Ws, 3)`` 0-255 RGB; pasted: ``masks`` (K instances in
    ``source_image``'s size) and ``labels`` ``(K,)`` int64. Returns the new image (``(H, W, 3)``, float32 if
    either image is) and a new target: the destination's surviving instances then the pasted ones that
    survive, ``masks`` :class:`~maskrcnn.structures.BitMasks` ``(M', H, W)``, ``boxes`` their tight boxes,
    ``crowd_boxes`` ``(C', 4)``; other keys as they were. The inputs are not modified.
    """
    height, width = image.shape[:2]
    source = _on_canvas(_bits(pasted["masks"]), height, width)  # (K, H, W)
    # Smaller instances on top: each keeps the pixels that no instance above it covers.
    order = torch.argsort(source.flatten(1).sum(1), descending=True, stable=True).tolist()
    visible = torch.zeros_like(source)
    covered = torch.zeros((height, width), dtype=torch.bool)
    for k in reversed(order):  # top first
        visible[k] = source[k] & ~covered
        covered |= source[k]
    pasted_keep = _enough_left(source, visible, min_visible)

    destination = _bits(target["masks"])  # (M, H, W)
    left = destination & ~covered
    keep = _enough_left(destination, left, min_visible)
    masks = torch.cat([left[keep], visible[pasted_keep]])

    out = image.astype(np.result_type(image.dtype, source_image.dtype), copy=True)
    rows, cols = min(height, source_image.shape[0]), min(width, source_image.shape[1])
    where = covered[:rows, :cols].numpy()
    out[:rows, :cols][where] = source_image[:rows, :cols][where]
    return out, dict(target, boxes=mask_boxes(masks), masks=BitMasks(masks),
                     labels=torch.cat([target["labels"][keep], pasted["labels"][pasted_keep]]),
                     crowd_boxes=_uncovered_crowd(target["crowd_boxes"], covered, min_visible))


def _bits(masks: InstanceMasks) -> Tensor:
    """``(M, H, W)`` bool bitmaps of either mask storage."""
    return masks.tensor if isinstance(masks, BitMasks) else masks.to_bitmasks().tensor


def _on_canvas(bits: Tensor, height: int, width: int) -> Tensor:
    """``(K, Hs, Ws)`` bool -> ``(K, height, width)``: placed at the top left, cut or padded with False."""
    out = torch.zeros((len(bits), height, width), dtype=torch.bool)
    rows, cols = min(height, bits.shape[1]), min(width, bits.shape[2])
    out[:, :rows, :cols] = bits[:, :rows, :cols]
    return out


def _enough_left(before: Tensor, after: Tensor, min_visible: float) -> Tensor:
    """``(M,)`` bool: the masks ``after`` (``(M, H, W)``, a part of ``before``) keep at least one pixel and at
    least ``min_visible`` of the pixels of ``before``."""
    left = after.flatten(1).sum(1)
    return (left > 0) & (left >= min_visible * before.flatten(1).sum(1))


def _uncovered_crowd(crowd_boxes: Tensor, covered: Tensor, min_visible: float) -> Tensor:
    """``(C, 4)`` crowd boxes -> ``(C', 4)``. A box with pixels (those whose centre it holds) that ``covered``
    ``(H, W)`` bool covers is dropped where less than ``min_visible`` of its pixels is left, else each side
    whose pixels are all covered moves in to the tight box of what is left; the other sides, and the boxes
    nothing covers, stay as they are."""
    if len(crowd_boxes) == 0:
        return crowd_boxes
    height, width = covered.shape
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5  # (1, H, 1) pixel centres
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5  # (1, 1, W)
    x0, y0, x1, y1 = (crowd_boxes[:, i, None, None] for i in range(4))  # each (C, 1, 1)
    inside = (ys > y0) & (ys < y1) & (xs > x0) & (xs < x1)  # (C, H, W)
    left = inside & ~covered
    whole, tight = mask_boxes(inside), mask_boxes(left)
    out = torch.where(tight == whole, crowd_boxes, tight)
    touched = (inside & covered).flatten(1).any(1)
    return out[~touched | _enough_left(inside, left, min_visible)]
