"""COCO run-length encoding (RLE) of instance masks.

COCO RLE flattens an ``H x W`` mask column by column (Fortran order) and stores alternating run lengths
of 0s and 1s, starting with 0s. :func:`encode_mask_regions` builds those runs from each mask's box-sized
region alone, so that no full-image mask is ever allocated; :func:`encode_masks` encodes full bitmaps.
Both return COCO RLE dicts ``{"size": [H, W], "counts": str}`` (compressed counts as a utf-8 string, the
form COCO result files use), identical to ``pycocotools.mask.encode`` of the full-image mask.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import numpy as np
import pycocotools.mask as mask_utils
import torch


def _compress(counts: np.ndarray, height: int, width: int) -> dict:
    """Uncompressed run lengths -> COCO RLE dict with string counts."""
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("utf-8")}


def region_run_lengths(x0: int, y0: int, region: np.ndarray, image_size: Tuple[int, int]) -> np.ndarray:
    """Uncompressed COCO run lengths of a full-image mask that is zero outside one region.

    x0, y0: column and row (pixels) of the region's top-left corner in the full image.
    region: ``(h, w)`` bool array, the mask over image rows ``y0..y0+h-1`` and columns ``x0..x0+w-1``.
    image_size: ``(H, W)`` of the full image; the region must lie inside it.
    Returns ``(R,)`` int64 run lengths (0s first) summing to ``H * W``, as ``pycocotools`` would produce.
    """
    height, width = image_size
    h, w = region.shape
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise ValueError(f"mask region at (x0={x0}, y0={y0}) of size {h}x{w} lies outside the {height}x{width} image")
    # Pad every column with a 0 above and below, so each run of 1s has a rising and a falling edge.
    padded = np.zeros((w, h + 2), dtype=np.int8)
    padded[:, 1:-1] = region.T  # (h, w) -> (w, h): one row per image column, in COCO's column-major order
    edges = np.diff(padded, axis=1)  # (w, h + 1); +1 where a run starts, -1 one past where it ends
    col_s, row_s = np.nonzero(edges == 1)  # np.nonzero walks column by column, top to bottom
    col_e, row_e = np.nonzero(edges == -1)
    starts = (x0 + col_s).astype(np.int64) * height + y0 + row_s
    ends = (x0 + col_e).astype(np.int64) * height + y0 + row_e
    total = height * width
    if starts.size == 0:
        return np.array([total], dtype=np.int64)
    # A run ending on the last row of one column and one starting on the first row of the next are a
    # single run in the flattened mask: drop the shared boundary.
    touching = ends[:-1] == starts[1:]
    keep_start = np.concatenate([[True], ~touching])
    keep_end = np.concatenate([~touching, [True]])
    boundaries = np.stack([starts[keep_start], ends[keep_end]], axis=1).reshape(-1)
    if not boundaries.size or boundaries[-1] != total:  # close with the trailing run of 0s
        boundaries = np.append(boundaries, total)
    return np.diff(boundaries, prepend=0)


def encode_mask_regions(regions: Iterable[Tuple[int, int, object]], image_size: Tuple[int, int]) -> List[dict]:
    """COCO RLE of each full-image mask given only its region.

    regions: iterable of ``(x0, y0, region)``, with ``region`` a ``(h, w)`` bool tensor or array placed
        with its top-left corner at column ``x0``, row ``y0`` of the full image (zero elsewhere), as
        :func:`maskrcnn.modeling.paste.paste_mask_regions` yields them.
    image_size: ``(H, W)`` of the full image (pixels).
    Returns one ``{"size": [H, W], "counts": str}`` dict per region, in order.
    """
    height, width = int(image_size[0]), int(image_size[1])
    out = []
    for x0, y0, region in regions:
        if isinstance(region, torch.Tensor):
            region = region.detach().cpu().numpy()
        counts = region_run_lengths(int(x0), int(y0), np.asarray(region, dtype=bool), (height, width))
        out.append(_compress(counts, height, width))
    return out


def encode_masks(masks) -> List[dict]:
    """COCO RLE of full-image masks.

    masks: ``(N, H, W)`` bool tensor or array.
    Returns one ``{"size": [H, W], "counts": str}`` dict per mask.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks expects an (N, H, W) mask array, got shape {masks.shape}")
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))  # (N, H, W) -> (H, W, N)
    rles = mask_utils.encode(fortran)
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")} for rle in rles]


def compressed_run_lengths(counts: bytes) -> np.ndarray:
    """The run lengths of COCO's compressed RLE string, as pycocotools reads it, checking its form.

    Each run is a signed number in 5-bit groups, one character (``48 + group``, 0x20 = more groups
    follow, 0x10 of the last group = negative) per group; from the third run on, the number is a
    difference from the run two before. Returns ``(R,)`` int64; raises ValueError for a character outside
    the alphabet, a number cut off at the end, or a negative run.
    """
    runs: List[int] = []
    position, length = 0, len(counts)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position == length:
                raise ValueError("the counts string ends inside a run length")
            code = counts[position] - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {chr(counts[position])!r} at {position} is not an RLE count character")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs)} has a negative length ({value})")
        runs.append(value)
    return np.asarray(runs, dtype=np.int64)
