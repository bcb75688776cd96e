"""RoIAlign as a weighted gather: one ``embedding_bag`` over the feature map's pixels.

Shorthand: N images, C channels, H x W the feature map, R RoIs, (oh, ow) output bins per RoI,
s the sampling ratio (s x s samples per bin), T = 4 s^2 bilinear taps per bin.

Each output bin is the mean of s x s bilinear samples, i.e. a weighted sum of T feature pixels.
The pixel indices and weights depend only on the RoIs, so they are computed without gradient; the
sum itself is ``F.embedding_bag(mode="sum", per_sample_weights=...)`` over the ``(N*H*W, C)``
channels-last rows of the feature map. The backward is the same weighted gather with the taps
transposed (per feature pixel, the bins that read it), again one ``embedding_bag``: it accumulates
in float32 also for bfloat16 and runs several times faster on CPU than ``embedding_bag``'s own
backward. Values match ``torchvision.ops.roi_align`` (its sampling positions and edge rules), to
float rounding.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.autograd.function import once_differentiable


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
    chunk_rois: int = 4096,
) -> Tensor:
    """Pool each RoI of a feature map into ``output_size`` bins, as ``torchvision.ops.roi_align``.

    Args:
        features: ``(N, C, H, W)`` float feature map (float32, bfloat16 or float16).
        rois: ``(R, 5)`` float: batch index into ``features``, then ``x1, y1, x2, y2`` in pixels of the
            input image (the resized network input).
        output_size: ``oh`` or ``(oh, ow)`` bins per RoI.
        spatial_scale: feature-map pixels per input-image pixel (e.g. 1/4 for a stride-4 level).
        sampling_ratio: ``s`` samples per bin along each axis; ``<= 0`` (an adaptive count per RoI)
            is handed to ``torchvision.ops.roi_align``.
        aligned: if True, pixel centres sit at half-integer coordinates (shift by -0.5 feature pixel)
            and RoIs may be smaller than one feature pixel; if False, RoI sides are at least 1.
        chunk_rois: RoIs whose taps are built and gathered at once; bounds the temporary index and
            weight memory to about ``chunk_rois * oh * ow * T * 12`` bytes.

    Returns:
        ``(R, C, oh, ow)`` tensor of the dtype of ``features``, in ``torch.channels_last`` memory
        format (use ``reshape``/``flatten``, not ``view``, to flatten it).
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if sampling_ratio <= 0:
        return torchvision.ops.roi_align(features, rois, (oh, ow), spatial_scale, sampling_ratio, aligned)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (R, 5) = (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    n, c, height, width = features.shape
    rows = features.permute(0, 2, 3, 1).reshape(n * height * width, c)  # (N, C, H, W) -> (N*H*W, C)
    pooled = []
    for start in range(0, max(rois.shape[0], 1), chunk_rois):
        with torch.no_grad():
            index, weight = _bin_taps(
                rois[start : start + chunk_rois], (n, height, width), (oh, ow), spatial_scale, sampling_ratio, aligned
            )
        pooled.append(_WeightedGather.apply(rows, index, weight.to(rows.dtype)))
    out = pooled[0] if len(pooled) == 1 else torch.cat(pooled)  # (R*oh*ow, C)
    return out.to(features.dtype).view(rois.shape[0], oh, ow, c).permute(0, 3, 1, 2)  # -> (R, C, oh, ow)


class _WeightedGather(torch.autograd.Function):
    """``out[b] = sum_t weight[b, t] * rows[index[b, t]]`` with a gather-based backward.

    rows: ``(P, C)`` float table; index: ``(B, T)`` int32/int64 rows of it; weight: ``(B, T)`` of the
    dtype of ``rows``. Returns ``(B, C)``. Gradient flows to ``rows`` only.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.num_rows = rows.shape[0]
        return F.embedding_bag(index, rows, per_sample_weights=weight, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> Tuple[Tensor, None, None]:
        index, weight = ctx.saved_tensors
        flat = index.flatten()  # (B, T) -> (B*T,)
        order = torch.argsort(flat)  # taps grouped by the table row they read
        bags = torch.div(order, index.shape[1], rounding_mode="floor")  # bin of each grouped tap
        offsets = F.pad(torch.bincount(flat, minlength=ctx.num_rows).cumsum(0), (1, 0))  # (P + 1,)
        grad_rows = F.embedding_bag(
            bags,
            grad_out.contiguous(),
            offsets,
            per_sample_weights=weight.flatten()[order],
            mode="sum",
            include_last_offset=True,
        )
        return grad_rows, None, None


def _bin_taps(
    rois: Tensor,
    feature_shape: Tuple[int, int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tuple[Tensor, Tensor]:
    """Feature-row indices and weights of every output bin.

    Args:
        rois: ``(R, 5)`` float, as for :func:`roi_align`.
        feature_shape: ``(N, H, W)`` of the feature map.
        output_size: ``(oh, ow)``.
        spatial_scale, sampling_ratio, aligned: as for :func:`roi_align` (``sampling_ratio > 0``).

    Returns:
        ``index`` ``(R*oh*ow, T)`` int32 (int64 for tables of 2^31 rows or more): rows of the
        ``(N*H*W, C)`` feature table; ``weight`` ``(R*oh*ow, T)`` float32: bilinear weights divided by
        the ``s*s`` sample count (0 for samples outside the map).
    """
    n, height, width = feature_shape
    oh, ow = output_size
    rois = rois.float()
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w = roi_w.clamp_min(1.0)
        roi_h = roi_h.clamp_min(1.0)
    taps = 2 * sampling_ratio
    y_rows, y_weights = _axis_taps(y1, roi_h / oh, oh, sampling_ratio, height)  # (R, oh, 2s)
    x_cols, x_weights = _axis_taps(x1, roi_w / ow, ow, sampling_ratio, width)  # (R, ow, 2s)
    index_dtype = torch.int32 if n * height * width < 2**31 else torch.int64
    y_rows = (rois[:, 0].long()[:, None, None] * (height * width) + y_rows * width).to(index_dtype)  # row of (n, y, 0)
    x_cols = x_cols.to(index_dtype)
    y_weights = y_weights / (sampling_ratio * sampling_ratio)
    # Outer sum / product of the y and x taps of each bin, laid out so that the broadcast runs over
    # whole bins (y taps repeated entry by entry, x taps tiled):
    # (R, oh, 1, 2s x 2s) op (R, 1, ow, 2s x 2s) -> (R, oh, ow, 4s^2) -> (R*oh*ow, T).
    index = y_rows.repeat_interleave(taps, dim=2)[:, :, None, :] + x_cols.repeat(1, 1, taps)[:, None, :, :]
    weight = y_weights.repeat_interleave(taps, dim=2)[:, :, None, :] * x_weights.repeat(1, 1, taps)[:, None, :, :]
    return index.reshape(-1, taps * taps), weight.reshape(-1, taps * taps)


def _axis_taps(start: Tensor, bin_size: Tensor, bins: int, sampling_ratio: int, size: int) -> Tuple[Tensor, Tensor]:
    """Sample positions along one axis and their linear-interpolation taps, with torchvision's edge rules.

    Args:
        start: ``(R,)`` float32 RoI start in feature-map pixels.
        bin_size: ``(R,)`` float32 bin length in feature-map pixels.
        bins: number of bins along the axis.
        sampling_ratio: samples per bin.
        size: feature-map length along the axis.

    Returns:
        ``taps`` ``(R, bins, 2s)`` int64 pixel indices, (low, high) per sample, and ``weights``
        ``(R, bins, 2s)`` float32 their linear weights; both weights of a sample are 0 when it lies
        more than one pixel outside the map.
    """
    steps = torch.arange(bins, device=start.device, dtype=torch.float32)[None, :, None]
    grid = torch.arange(sampling_ratio, device=start.device, dtype=torch.float32)[None, None, :] + 0.5
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    pos = (start + steps * bin_size) + grid * bin_size / sampling_ratio  # (R, bins, s), in torchvision's order
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp_min(0.0)
    low = pos.long()
    at_edge = low >= size - 1
    low = low.clamp_max(size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low)
    taps = torch.stack([low, high], dim=-1).flatten(2)  # (R, bins, s) -> (R, bins, s, 2) -> (R, bins, 2s)
    weights = (torch.stack([1.0 - frac, frac], dim=-1) * valid[..., None]).flatten(2)
    return taps, weights
