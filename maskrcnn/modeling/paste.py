"""Mask paste: predicted ``S x S`` mask probabilities -> per-detection bool masks in an image.

Shorthand: N detections, S the side of a predicted mask (28), H x W the target image in pixels,
(h, w) the part of a box's pasted extent that lies inside the image.

The geometry is torchvision's (``roi_heads.paste_masks_in_image`` with ``padding=1``):

1. the mask is padded by one zero pixel on each side, to ``(S + 2) x (S + 2)``;
2. its box is scaled by ``(S + 2) / S`` about the box centre and truncated to integer pixels
   ``(bx1, by1, bx2, by2)``;
3. the padded mask is resized bilinearly (``align_corners=False``) to
   ``max(by2 - by1 + 1, 1) x max(bx2 - bx1 + 1, 1)`` pixels, with its top-left pixel at ``(bx1, by1)``;
4. its pixels inside the image are thresholded (``prob > threshold``).

:func:`resized_mask_regions` hands out the probabilities of step 3 before the threshold of step 4 (what the
learner's figure of the paste shows).

torchvision builds a full-image float canvas per mask. Here only the pixels of each box's clipped
extent are sampled, separably (columns, then rows), as two batched matrix products with the
bilinear weights that ``F.interpolate`` uses; detections are sampled in chunks padded to the
chunk's largest extent and bounded by a memory budget, then written into a preallocated bool output
or handed out region by region (for RLE encoding without a full canvas). The result equals
torchvision's up to float rounding of probabilities that sit on the threshold (with TF32 matmuls
enabled on CUDA, that rounding is coarser).
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig, RoIHeadsConfig

# Temporary bytes per pixel of a chunk's padded extent: the float32 values and the bool result.
_BYTES_PER_PIXEL = 5


class _Extent(NamedTuple):
    """Where one detection's resized mask lands, in integer pixels."""

    x0: int  # left column of the clipped extent in the image, in [0, W]
    y0: int  # top row of the clipped extent in the image, in [0, H]
    w: int  # clipped extent width (0 when the box misses the image)
    h: int  # clipped extent height
    col_offset: int  # column of x0 inside the resized mask
    row_offset: int  # row of y0 inside the resized mask
    box_w: int  # resized mask width, >= 1
    box_h: int  # resized mask height, >= 1


def paste_masks_in_image(
    mask_probs: Tensor,
    boxes: Tensor,
    image_size: Tuple[int, int],
    threshold: float = RoIHeadsConfig.mask_threshold,
    memory_mb: float = ModelConfig.paste_memory_mb,
) -> Tensor:
    """Paste per-detection mask probabilities into full-image bool masks.

    Args:
        mask_probs: ``(N, S, S)`` float (any float dtype) mask probabilities in [0, 1], one per detection.
        boxes: ``(N, 4)`` float xyxy boxes in pixels of the target image.
        image_size: ``(H, W)`` of the target image in pixels.
        threshold: a pixel is set where the resized probability is strictly greater than this.
        memory_mb: budget in MiB for the temporary sampling buffers; a single detection whose
            clipped extent alone exceeds it is still sampled in one piece.

    Returns:
        ``(N, H, W)`` bool tensor on the device of ``mask_probs``.
    """
    height, width = image_size
    out = torch.zeros((mask_probs.shape[0], height, width), dtype=torch.bool, device=mask_probs.device)
    extents = _paste_extents(mask_probs, boxes, image_size)
    order = sorted(range(len(extents)), key=lambda i: -extents[i].h)  # tallest extents first
    for i, x0, y0, probs in _sample_regions(mask_probs, extents, order, memory_mb):
        out[i, y0 : y0 + probs.shape[0], x0 : x0 + probs.shape[1]] = _foreground(probs, threshold)
    return out


def paste_mask_regions(
    mask_probs: Tensor,
    boxes: Tensor,
    image_size: Tuple[int, int],
    threshold: float = RoIHeadsConfig.mask_threshold,
    memory_mb: float = ModelConfig.paste_memory_mb,
) -> Iterator[Tuple[int, int, Tensor]]:
    """Paste masks region by region: only each box's extent inside the image is materialised.

    Arguments are those of :func:`paste_masks_in_image`.

    Yields:
        per detection, in input order, ``(x0, y0, region)``: ``region`` is an ``(h, w)`` bool tensor
        holding the pasted mask over the box's pasted extent clipped to the image, with its top-left
        pixel at column ``x0``, row ``y0`` of the image; every pixel of the full ``(H, W)`` mask
        outside it is False. A box wholly outside the image gives an empty region (``h`` or ``w``
        is 0), with ``x0``, ``y0`` clamped to ``[0, W]`` and ``[0, H]``.
    """
    for x0, y0, probs in resized_mask_regions(mask_probs, boxes, image_size, memory_mb):
        yield x0, y0, _foreground(probs, threshold)


def resized_mask_regions(
    mask_probs: Tensor,
    boxes: Tensor,
    image_size: Tuple[int, int],
    memory_mb: float = ModelConfig.paste_memory_mb,
) -> Iterator[Tuple[int, int, Tensor]]:
    """The resized probabilities that the paste thresholds (steps 1-3 of the module docstring).

    Arguments are those of :func:`paste_masks_in_image`.

    Yields:
        per detection, in input order, ``(x0, y0, probs)``: ``probs`` is an ``(h, w)`` float32 tensor over
        the region that :func:`paste_mask_regions` yields for it, at the same place.
    """
    extents = _paste_extents(mask_probs, boxes, image_size)
    for _, x0, y0, probs in _sample_regions(mask_probs, extents, range(len(extents)), memory_mb):
        yield x0, y0, probs


def _foreground(probs: Tensor, threshold: float) -> Tensor:
    """Step 4: a pixel is foreground where its probability is strictly greater than ``threshold``."""
    return probs > threshold


def _paste_extents(mask_probs: Tensor, boxes: Tensor, image_size: Tuple[int, int]) -> List[_Extent]:
    """Integer paste geometry of each detection (see the module docstring, steps 2 and 3)."""
    if mask_probs.dim() != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ValueError(f"mask_probs must have shape (N, S, S), got {tuple(mask_probs.shape)}")
    if boxes.shape != (mask_probs.shape[0], 4):
        raise ValueError(
            f"boxes must have shape ({mask_probs.shape[0]}, 4) to match mask_probs, got {tuple(boxes.shape)}"
        )
    height, width = image_size
    side = mask_probs.shape[-1]
    scale = float(side + 2) / side
    # Box scaled about its centre, in the order of operations torchvision uses, then truncated.
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    bx1 = (center_x - half_w).to(torch.int64)
    by1 = (center_y - half_h).to(torch.int64)
    bx2 = (center_x + half_w).to(torch.int64)
    by2 = (center_y + half_h).to(torch.int64)
    x0 = bx1.clamp(0, width)
    y0 = by1.clamp(0, height)
    w = ((bx2 + 1).clamp(0, width) - x0).clamp_min(0)
    h = ((by2 + 1).clamp(0, height) - y0).clamp_min(0)
    box_w = (bx2 - bx1 + 1).clamp_min(1)
    box_h = (by2 - by1 + 1).clamp_min(1)
    extents = torch.stack([x0, y0, w, h, x0 - bx1, y0 - by1, box_w, box_h], dim=1)  # (N, 8)
    return [_Extent(*row) for row in extents.tolist()]


def _sample_regions(
    mask_probs: Tensor,
    extents: List[_Extent],
    order: Sequence[int],
    memory_mb: float,
) -> Iterator[Tuple[int, int, int, Tensor]]:
    """Sample the clipped extents of the detections in ``order``, chunk by chunk.

    Yields:
        ``(i, x0, y0, probs)`` per detection ``i``, in ``order``; ``probs`` is ``(h, w)`` float32.
    """
    padded = F.pad(mask_probs.float(), (1, 1, 1, 1))  # (N, S, S) -> (N, S+2, S+2), zero border
    for chunk in _chunks(extents, order, memory_mb * 2**20 / _BYTES_PER_PIXEL):
        regions = _sample_chunk(padded, [extents[i] for i in chunk], chunk)
        for k, i in enumerate(chunk):
            extent = extents[i]
            yield i, extent.x0, extent.y0, regions[k, : extent.h, : extent.w]


def _chunks(extents: List[_Extent], order: Sequence[int], max_pixels: float) -> Iterator[List[int]]:
    """Split ``order`` into runs of consecutive detections sampled together.

    A run grows while its padded extent (run length x tallest x widest) stays within ``max_pixels``
    and at most doubles the pixels the run actually needs (plus a 64 x 64 allowance, so that small
    extents of different shapes still batch).
    """
    chunk: List[int] = []
    max_h = max_w = needed = 0
    for i in order:
        w, h = extents[i].w, extents[i].h
        padded = (len(chunk) + 1) * max(max_h, h) * max(max_w, w)
        if chunk and (padded > max_pixels or padded > 2 * (needed + w * h) + 64 * 64):
            yield chunk
            chunk, max_h, max_w, needed = [], 0, 0, 0
        chunk.append(i)
        max_h, max_w, needed = max(max_h, h), max(max_w, w), needed + w * h
    if chunk:
        yield chunk


def _sample_chunk(padded: Tensor, extents: List[_Extent], indices: List[int]) -> Tensor:
    """Bilinearly resized mask values over the clipped extents of one chunk of detections.

    Args:
        padded: ``(N, S+2, S+2)`` float32 zero-bordered masks of all detections.
        extents: the chunk's extents.
        indices: the chunk's detection indices into ``padded``.

    Returns:
        ``(n, h_max, w_max)`` float32 for the chunk's n detections; entries beyond a detection's
        ``(h, w)`` are 0.
    """
    size = padded.shape[-1]
    _, _, w, h, col_offset, row_offset, box_w, box_h = torch.tensor(
        extents, dtype=torch.int64, device=padded.device
    ).unbind(1)  # (n, 8) -> 8 x (n,)
    max_w, max_h = max(e.w for e in extents), max(e.h for e in extents)
    cols = _interpolation_matrix(col_offset, w, box_w, max_w, size)  # (n, w_max, S+2)
    rows = _interpolation_matrix(row_offset, h, box_h, max_h, size)  # (n, h_max, S+2)
    masks = padded[torch.tensor(indices, device=padded.device)]  # (n, S+2, S+2)
    # Columns first, then rows, as F.interpolate combines its taps:
    # (n, h_max, S+2) @ ((n, S+2, S+2) @ (n, S+2, w_max)) -> (n, h_max, w_max).
    # In float32 also inside a bf16 autocast forward: the paste's outline must not depend on the precision.
    with torch.autocast(padded.device.type, enabled=False):
        return torch.bmm(rows, torch.bmm(masks, cols.transpose(1, 2)))


def _interpolation_matrix(offset: Tensor, length: Tensor, box_length: Tensor, max_length: int, size: int) -> Tensor:
    """Linear interpolation along one axis as a matrix, with the taps of ``F.interpolate(align_corners=False)``.

    Args:
        offset: ``(n,)`` int64 first sampled pixel, in pixels of the resized mask.
        length: ``(n,)`` int64 number of sampled pixels (``<= max_length``).
        box_length: ``(n,)`` int64 length of the resized mask in pixels.
        max_length: the padded number of sampled pixels.
        size: input length ``S + 2``.

    Returns:
        ``(n, max_length, size)`` float32: row ``j`` holds the two weights of sampled pixel ``j``;
        rows beyond ``length`` are 0.
    """
    steps = torch.arange(max_length, device=offset.device)
    dst = (offset[:, None] + steps).double()  # (n, max_length)
    scale = (torch.full_like(box_length, size, dtype=torch.float32) / box_length.float()).double()
    # Source coordinate rounded once to float32, as the fused multiply-add of PyTorch's kernels does.
    src = (scale[:, None] * (dst + 0.5) - 0.5).float().clamp_min(0)
    low = src.floor().long().clamp_max(size - 1)
    high = (low + 1).clamp_max(size - 1)
    high_weight = (src - low).clamp(0, 1)
    valid = steps < length[:, None]
    matrix = torch.zeros((offset.shape[0], max_length, size), device=offset.device)
    matrix.scatter_add_(2, low[:, :, None], ((1 - high_weight) * valid)[:, :, None])
    return matrix.scatter_add_(2, high[:, :, None], (high_weight * valid)[:, :, None])
