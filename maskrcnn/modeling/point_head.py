"""Point head (PointRend): mask logits recomputed at chosen points from fine features, for sharper masks.

The mask head predicts each RoI's mask on a coarse S x S grid from 14 x 14 pooled features, so that a box of
200 pixels gets one logit per 7 pixels and its boundary is blurred. The point head predicts the logit at
single points instead, from the finest pyramid level (stride 4) sampled at the point and the coarse logit
there; it is spent only where the coarse mask is unsure (logit near 0), which is along the boundary.

Shorthand: R RoIs (positive RoIs in training, detections at inference), N images, C feature channels,
K object classes, P points per RoI, S the coarse mask side (28), M = S * 2**steps the refined side.
Points are ``(x, y)`` in [0, 1]^2 of their box: (0, 0) its top-left corner, (1, 1) its bottom-right; cell
``(i, j)`` of an M x M grid over the box has its centre at ``((j + 0.5) / M, (i + 0.5) / M)``, the
convention of the mask paste and of ``F.interpolate(align_corners=False)``.
Naming: ``coarse_logits`` (R, S, S) of each RoI's class from the mask head; ``point_logits`` (R, P) of each
RoI's class at its points; ``point_labels`` (R, P) 0/1 ground truth at those points.

Training (:meth:`PointHead.loss`): per positive RoI, draw ``oversample_ratio * P`` uniform candidate points,
keep the ``importance_ratio * P`` where the coarse logits (interpolated) are least certain and add uniform
points up to P; the loss is the binary cross-entropy of the point logits against the ground-truth mask read
at the same points (bilinearly, thresholded at 0.5 as the S x S targets are).

Inference (:meth:`PointHead.refine`): adaptive subdivision. ``steps`` times: upsample the logits 2x
bilinearly and, for each detection whose box spans more input pixels than the grid had cells, take the
``subdivision_points`` least certain cells, recompute them with the point head and write them back. Every step
is tensor operations without a Python branch on the data (nonzero, topk, gather, scatter), so the exporter
traces it for any number of detections.

The fine features at the points are one weighted gather of the level's channels-last rows
(:func:`point_sample_indexed`), and the head's layers run in the dtype of those features (bfloat16 under a
bfloat16 autocast).
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RoIHeadsConfig
from ..structures import PolygonMasks, covered
from .mask_head import mask_loss
from .roi_align import _WeightedGather
from .selection import to_rois


def uncertainty(logits: Tensor) -> Tensor:
    """``-|logit|`` of any shape: 0 where the probability is 0.5, more negative the more certain."""
    return -logits.abs()


def point_sample_indexed(maps: Tensor, index: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of map ``index[r]`` at each point of row r, channels last.

    maps: (N, C, H, W) float (any float dtype; channels-last memory makes its rows a view, not a copy); index: (R,)
    int64 in 0..N-1; points: (R, P, 2) ``(x, y)`` in [0, 1]^2 of the map, cell ``(i, j)`` covering
    ``[j / W, (j + 1) / W) x [i / H, (i + 1) / H)`` with its value at the centre; beyond the border cells' centres
    the values fall to 0 half a cell outside (``grid_sample`` with ``align_corners=False`` and zero padding).
    Returns (R, P, C) of the dtype of ``maps``.

    Each point is a weighted sum of four rows of the (N H W, C) table of the maps' cells, with its bilinear weights
    (computed in float32 and applied in the maps' dtype, 0 for a cell outside the map): one weighted gather for all
    rows and points (that of :mod:`~maskrcnn.modeling.roi_align`, an ``embedding_bag`` with a gather-based
    backward), which reads each cell's C channels at once where ``grid_sample`` reads them one by one (on this
    repository's CPU the gather takes less than half the time for 100 detections x 784 points of a 256-channel
    stride-4 level). No loop over maps or rows, so a traced export holds for any N and R.
    """
    n, c, h, w = maps.shape
    rows = maps.permute(0, 2, 3, 1).reshape(n * h * w, c)  # (N, C, H, W) -> (N*H*W, C)
    with torch.no_grad():
        x = points[..., 0].float() * w - 0.5  # (R, P) in cell units, cell centres at integers
        y = points[..., 1].float() * h - 0.5
        left, top = x.floor(), y.floor()
        right_weight, bottom_weight = x - left, y - top
        cells, weights = [], []
        for row, row_weight in ((top, 1 - bottom_weight), (top + 1, bottom_weight)):
            for col, col_weight in ((left, 1 - right_weight), (left + 1, right_weight)):
                inside = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
                weights.append(row_weight * col_weight * inside)
                cells.append(index[:, None] * (h * w) + row.clamp(0, h - 1).long() * w + col.clamp(0, w - 1).long())
        # Reshapes name no size that can be 0 (R): ONNX's Reshape reads a 0 as "this input dimension".
        cells = torch.stack(cells, dim=-1).reshape(-1, 4)  # 4 x (R, P) -> (R*P, 4)
        weights = torch.stack(weights, dim=-1).reshape(-1, 4).to(rows.dtype)
    return _WeightedGather.apply(rows, cells, weights).reshape(-1, points.shape[1], c)  # (R*P, C) -> (R, P, C)


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of each map at its own points: maps (B, C, H, W), points (B, P, 2) -> (B, P, C), as
    :func:`point_sample_indexed` with map ``b`` for row ``b``."""
    return point_sample_indexed(maps, torch.arange(maps.shape[0], device=maps.device), points)


def image_points(boxes: Tensor, points: Tensor) -> Tensor:
    """boxes: (R, 4) xyxy pixels of an image; points: (R, P, 2) in [0, 1]^2 of each box -> (R, P, 2) ``(x, y)``
    pixels of that image."""
    corner = boxes[:, None, :2]
    return corner + points * (boxes[:, None, 2:] - corner)


@torch.no_grad()
def training_points(coarse_logits: Tensor, num_points: int, oversample_ratio: float,
                    importance_ratio: float) -> Tensor:
    """PointRend's training points: the least certain of many random candidates, plus uniform ones.

    coarse_logits: (R, S, S) logits of each RoI's class. Draws (R, int(oversample_ratio * num_points), 2)
    uniform candidates, keeps the ``int(importance_ratio * num_points)`` whose coarse logits (bilinear,
    :func:`point_sample`) are least certain, then draws the remaining points uniformly, both draws in this
    order from torch's global generator. Returns (R, num_points, 2) in [0, 1]^2: the chosen candidates by
    decreasing uncertainty, then the uniform points.
    """
    rois = coarse_logits.shape[0]
    device = coarse_logits.device
    candidates = torch.rand(rois, int(oversample_ratio * num_points), 2, device=device)
    num_uncertain = int(importance_ratio * num_points)
    scores = uncertainty(point_sample(coarse_logits[:, None].float(), candidates)[..., 0])  # (R, kP, 1) -> (R, kP)
    chosen = scores.topk(num_uncertain, dim=1).indices
    uncertain = candidates.gather(1, chosen[:, :, None].expand(-1, -1, 2))  # (R, kP, 2) -> (R, βP, 2)
    uniform = torch.rand(rois, num_points - num_uncertain, 2, device=device)
    return torch.cat([uncertain, uniform], dim=1)


def uncertain_cells(logits: Tensor, num_points: int) -> Tuple[Tensor, Tensor]:
    """The ``min(num_points, H W)`` least certain cells of each map.

    logits: (R, H, W). Returns the cells' flat indices (R, P) int64 (``row * W + col``), least certain first,
    and their centres (R, P, 2) float32 in [0, 1]^2 of the map.
    """
    height, width = int(logits.shape[-2]), int(logits.shape[-1])  # the grid's size is fixed by the mask head
    index = uncertainty(logits).flatten(1).topk(min(num_points, height * width), dim=1).indices
    col = (index % width).to(torch.float32)
    row = torch.div(index, width, rounding_mode="floor").to(torch.float32)
    return index, torch.stack([(col + 0.5) / width, (row + 0.5) / height], dim=-1)


@torch.no_grad()
def point_labels(gt_masks: List, boxes: List[Tensor], matched_idxs: List[Tensor], points: Tensor) -> Tensor:
    """Each positive RoI's ground-truth mask at its points.

    gt_masks: per image a BitMasks / PolygonMasks; boxes: per image (Ri, 4) xyxy pixels of that image;
    matched_idxs: per image (Ri,) int64 instance of each RoI; points: (R, P, 2) in [0, 1]^2 of each box, R =
    sum of Ri in the order of the concatenated boxes.
    Returns (R, P) float 0/1: the bilinear value of the instance's 0/1 bitmap at the point (pixel ``i``
    covering ``[i, i + 1)``, the geometry of the S x S targets of
    :func:`~maskrcnn.modeling.mask_head.mask_targets`), 1 where it exceeds 0.5 as there (a point on the edge
    between an object pixel and a background pixel is background). Polygons are rasterised at the image's
    size, the instances that some RoI matched only.
    """
    out = []
    for masks, image_boxes, idx, image_pts in zip(gt_masks, boxes, matched_idxs, points.split([len(b) for b in boxes])):
        if not len(image_boxes):
            continue
        used, row = torch.unique(idx, return_inverse=True)  # the matched instances; each RoI's row among them
        instances = masks[used.cpu()]
        bits = (instances.to_bitmasks() if isinstance(instances, PolygonMasks) else instances).tensor
        height, width = masks.image_size
        scale = torch.tensor([width, height], dtype=torch.float32, device=points.device)
        at = image_points(image_boxes.float(), image_pts) / scale  # (Ri, P, 2) in [0, 1]^2 of the image
        soft = point_sample_indexed(bits.to(device=points.device, dtype=torch.float32)[:, None], row, at)[..., 0]
        out.append(covered(soft))
    if not out:
        return points.new_zeros(points.shape[:2])
    return torch.cat(out)


def linear_with_coarse(layer: nn.Linear, x: Tensor, coarse: Tensor) -> Tensor:
    """``layer(cat([x, coarse], 1))`` in the dtype of ``x``, without building the concatenation: the weight's last
    column, which reads the coarse logit, is a rank-one term that starts the output (with the bias), and the
    product with the other columns is added onto it in place. x: (M, Din); coarse: (M, 1) -> (M, Dout).
    (On this repository's CPU the concatenated copy of every layer's input cost a third of the head's time, and
    adding the rank-one term after the product another pass over the output.)"""
    weight = layer.weight.to(x.dtype)  # (Dout, Din + 1)
    # A contiguous column: a strided one (every Din + 1-th entry) keeps the broadcast from vectorising, 5x slower.
    column = weight[:, -1].contiguous()
    out = torch.addcmul(layer.bias.to(x.dtype), coarse.to(x.dtype), column)  # (M, 1) x (Dout,) -> (M, Dout)
    return out.addmm_(x, weight[:, :-1].t())


class PointHead(nn.Module):
    """PointRend's point head: an MLP applied to each point alone (PointRend's 1x1 Conv1d layers, here
    ``nn.Linear`` over points-last rows) over [fine features, coarse logit].

    Args:
        in_channels: C, channels of the fine level.
        num_classes: K.
        fc_dim: width of the hidden layers.
        num_fcs: hidden layers; each takes the previous output with the coarse logit appended (PointRend).
        stride: stride of the fine level (the finest the mask pooler pools, 4 for P2), in input pixels.
        num_points_train: P per positive RoI in training.
        oversample_ratio, importance_ratio: training point sampling (:func:`training_points`).
        subdivision_steps: 2x upsamplings at inference (S -> S * 2**steps).
        subdivision_points: cells recomputed per RoI at each step.

    forward(fine: (R, P, C), coarse: (R, P)) -> (R, P, K) point logits.
    class_logits(fine, coarse, classes: (R,) int64 in 1..K) -> (R, P) logits of each RoI's class.
    """

    def __init__(self, *, in_channels: int, num_classes: int, fc_dim: int = RoIHeadsConfig.point_head_dim,
                 num_fcs: int = RoIHeadsConfig.point_head_fcs, stride: int,
                 num_points_train: int = RoIHeadsConfig.point_train_points,
                 oversample_ratio: float = RoIHeadsConfig.point_oversample_ratio,
                 importance_ratio: float = RoIHeadsConfig.point_importance_ratio,
                 subdivision_steps: int = RoIHeadsConfig.point_subdivision_steps,
                 subdivision_points: int = RoIHeadsConfig.point_subdivision_points):
        super().__init__()
        if oversample_ratio < 1 or not 0 <= importance_ratio <= 1:
            raise ValueError(f"roi_heads.point_oversample_ratio must be >= 1 and roi_heads.point_importance_ratio "
                             f"in [0, 1], got {oversample_ratio} and {importance_ratio}")
        if min(num_points_train, subdivision_points) < 1 or min(subdivision_steps, num_fcs) < 0:
            raise ValueError(f"roi_heads.point_train_points and point_subdivision_points must be >= 1, "
                             f"point_subdivision_steps and point_head_fcs >= 0, got {num_points_train}, "
                             f"{subdivision_points}, {subdivision_steps} and {num_fcs}")
        self.fcs = nn.ModuleList(nn.Linear((in_channels if i == 0 else fc_dim) + 1, fc_dim) for i in range(num_fcs))
        self.predictor = nn.Linear((fc_dim if num_fcs else in_channels) + 1, num_classes)
        for fc in self.fcs:
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        # Small predictor weights start every point logit near 0, as the mask predictor's.
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)
        self.stride = stride
        self.num_points_train = num_points_train
        self.oversample_ratio = oversample_ratio
        self.importance_ratio = importance_ratio
        self.subdivision_steps = subdivision_steps
        self.subdivision_points = subdivision_points

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        x = self.hidden(fine, coarse)  # (R*P, D)
        return linear_with_coarse(self.predictor, x, coarse.reshape(-1, 1)).reshape(*coarse.shape, -1)

    def class_logits(self, fine: Tensor, coarse: Tensor, classes: Tensor) -> Tensor:
        """The predictor evaluated for one class per RoI: a weighted channel sum, as
        :meth:`~maskrcnn.modeling.mask_head.MaskHead.class_logits`."""
        x = self.hidden(fine, coarse)  # (R*P, D)
        x = x.reshape(-1, coarse.shape[1], x.shape[1])  # (R*P, D) -> (R, P, D)
        weight = self.predictor.weight[classes - 1].to(x.dtype)  # (R, D + 1), the last entry for the coarse logit
        bias = self.predictor.bias[classes - 1].to(x.dtype)  # (R,)
        return torch.einsum("rpd,rd->rp", x, weight[:, :-1]) + coarse.to(x.dtype) * weight[:, -1:] + bias[:, None]

    def hidden(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """(R, P, C), (R, P) -> (R*P, D): the hidden layers' output (D = C without hidden layers), in the dtype of
        ``fine`` (the fine level's: bfloat16 under a bfloat16 autocast)."""
        x = fine.reshape(-1, fine.shape[-1])  # (R, P, C) -> (R*P, C)
        coarse = coarse.reshape(-1, 1)  # (R, P) -> (R*P, 1)
        for fc in self.fcs:
            x = linear_with_coarse(fc, x, coarse).relu_()
        return x

    def refined_side(self, coarse_side: int) -> int:
        """M, the side of the masks :meth:`refine` returns for coarse masks of side ``coarse_side``."""
        return coarse_side * 2**self.subdivision_steps

    def point_logits(self, features: List[Tensor], rois: Tensor, coarse_logits: Tensor, points: Tensor,
                     classes: Tensor, chunk_points: int = 8192) -> Tensor:
        """Point logits of each RoI's class at its points.

        features: pyramid levels, the first (N, C, Hf, Wf) of stride ``self.stride`` over the padded batch;
        rois: (R, 5) image index then x1, y1, x2, y2 pixels of the (resized) input; coarse_logits: (R, S, S);
        points: (R, P, 2) in [0, 1]^2 of each box; classes: (R,) int64 in 1..K. Returns (R, P).

        Eagerly, RoIs are taken ``max(1, chunk_points // P)`` at a time: every point is computed alone, and a
        chunk's features and activations (8192 x 256 float32 = 8 MiB each) stay in the cache and in memory the
        allocator reuses, where those of 100 detections x 784 points would be fresh memory, 64 MiB a layer, whose
        first writes cost as much as the layer's arithmetic on this repository's CPU. A traced graph takes all
        RoIs at once (its number of chunks would be the one it was traced with).
        """
        per_chunk = max(1, chunk_points // max(points.shape[1], 1))
        if torch.jit.is_tracing() or rois.shape[0] <= per_chunk:
            fine = features[0]
            at = image_points(rois[:, 1:], points) / self.stride  # (R, P, 2) in pixels of the fine level
            at = torch.stack([at[..., 0] / fine.shape[-1], at[..., 1] / fine.shape[-2]], dim=-1)  # in [0, 1]^2 of it
            fine_at = point_sample_indexed(fine, rois[:, 0].to(torch.int64), at)  # (R, P, C)
            coarse_at = point_sample(coarse_logits[:, None].float(), points)[..., 0]  # (R, P, 1) -> (R, P)
            return self.class_logits(fine_at, coarse_at, classes)
        chunks = zip(*(t.split(per_chunk) for t in (rois, coarse_logits, points, classes)))
        return torch.cat([self.point_logits(features, *chunk, chunk_points=chunk_points) for chunk in chunks])

    def loss(self, features: List[Tensor], boxes: List[Tensor], coarse_logits: Tensor, classes: Tensor,
             gt_masks: List, matched_idxs: List[Tensor]) -> Tensor:
        """``loss_mask_point``: binary cross-entropy of the point logits at :func:`training_points` against
        :func:`point_labels`, the mean over R * P points.

        features: as :meth:`point_logits`; boxes: per image (Ri, 4) positive RoIs, xyxy pixels of the input;
        coarse_logits: (R, S, S) of their ground-truth classes; classes: (R,) int64 in 1..K; gt_masks, matched_idxs:
        per image, as :func:`point_labels`.
        """
        points = training_points(coarse_logits, self.num_points_train, self.oversample_ratio, self.importance_ratio)
        logits = self.point_logits(features, to_rois(boxes), coarse_logits, points, classes)
        return mask_loss(logits, point_labels(gt_masks, boxes, matched_idxs, points))

    def refine(self, features: List[Tensor], rois: Tensor, coarse_logits: Tensor, classes: Tensor) -> Tensor:
        """Adaptive subdivision of the coarse masks: (R, S, S) logits -> (R, M, M) float32 logits, M = S * 2**steps
        (the last of :meth:`subdivide`'s steps; the coarse logits, in float32, without steps)."""
        logits = coarse_logits.float()
        for logits, _, _ in self.subdivide(features, rois, coarse_logits, classes):
            pass
        return logits

    def subdivide(self, features: List[Tensor], rois: Tensor, coarse_logits: Tensor,
                  classes: Tensor) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        """The steps of :meth:`refine`, one at a time: yields per step the (R, H, W) float32 logits after it
        (H = W = S * 2**step), the (A,) int64 detections it refined and the (A, P, 2) centres of the cells it
        recomputed, in [0, 1]^2 of each box.

        Each step upsamples the logits 2x bilinearly (``align_corners=False``); for each detection whose box is
        longer (in input pixels, its longer side) than the grid before the step, it recomputes the
        ``subdivision_points`` least certain cells with the point head (:meth:`point_logits`, coarse logits read
        from the S x S input) and writes them back; every other cell, and every cell of a smaller detection, keeps
        its upsampled value. A finer grid of a smaller box would split cells already under one input pixel, finer
        than anything the features saw; skipping it is most of what refinement saves on many small detections.
        features, rois, coarse_logits, classes: as :meth:`point_logits`.
        """
        logits = coarse_logits.float()[:, None]  # (R, S, S) -> (R, 1, S, S)
        box_side = (rois[:, 3:5] - rois[:, 1:3]).amax(dim=1)  # (R,) in input pixels
        for _ in range(self.subdivision_steps):
            refined = torch.nonzero(box_side > logits.shape[-1])[:, 0]  # (A,) detections this step refines
            logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
            cells = logits.shape[-2] * logits.shape[-1]
            index, points = uncertain_cells(logits[refined, 0], self.subdivision_points)  # (A, P), (A, P, 2)
            values = self.point_logits(features, rois[refined], coarse_logits[refined], points, classes[refined])
            flat = (refined[:, None] * cells + index).reshape(-1)  # (A, P) -> (A*P,) cells of the (R*H*W,) logits
            logits = logits.reshape(-1).scatter(0, flat, values.float().reshape(-1)).reshape(logits.shape)
            yield logits[:, 0], refined, points
