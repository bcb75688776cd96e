"""Region proposal network: head, proposal selection and losses.

Shorthand:
    N   images in the batch
    L   pyramid levels (P2..P6)
    A   anchors per location
    Hi, Wi  size of level i;  Ai = Hi * Wi * A anchors of level i;  sum over levels: T
    M   ground-truth boxes of one image
Naming: ``pred_objectness_logits`` (N, T), ``pred_anchor_deltas`` (N, T, 4); ``gt_labels`` per anchor
1 (object), 0 (background), -1 (ignored).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RPNConfig
from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .layers import conv_relu
from .matcher import Matcher, ignore_crowd, match_boxes, sample_balanced
from .selection import SKIP, at_most, best_per_group, clip_to_images, grouped_nms, split_by_image


class RPNHead(nn.Module):
    """3x3 convolutions (each followed by a ReLU) shared by all levels, then 1x1 convs for objectness and
    box deltas.

    Args:
        in_channels: C, channels of every pyramid level (kept by the 3x3 convolutions).
        num_anchors: A.
        num_convs: number of 3x3 convolutions: 1 (torchvision's v1 head) or more (2 in its v2 model). The
            first is ``conv`` and the others ``extra_convs``, so that one-convolution checkpoints load.

    forward(features: list of L (N, C, Hi, Wi)) -> (list of (N, A, Hi, Wi) logits, list of (N, 4A, Hi, Wi) deltas).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_convs: int = RPNConfig.head_convs):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"rpn.head_convs must be at least 1, got {num_convs}")
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.extra_convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 3, padding=1)
                                         for _ in range(num_convs - 1))
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, *self.extra_convs, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        weight, bias = self._output_weights()
        a = self.objectness_logits.out_channels
        logits, deltas = [], []
        for x in features:
            t = conv_relu(self.conv, x)
            for conv in self.extra_convs:
                t = conv_relu(conv, t)
            out = F.conv2d(t, weight, bias)
            logits.append(out[:, :a])
            deltas.append(out[:, a:])
        return logits, deltas

    def _output_weights(self) -> Tuple[Tensor, Tensor]:
        """The two 1x1 convolutions as one of A + 4A output channels: one pass over the features, and in
        training one gradient for them instead of two to be summed. (5A, C, 1, 1) weight, (5A,) bias."""
        return (torch.cat([self.objectness_logits.weight, self.anchor_deltas.weight]),
                torch.cat([self.objectness_logits.bias, self.anchor_deltas.bias]))

    def at_locations(self, features: List[Tensor], locations: List[Tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """The head's outputs at given cells of the levels, from their neighbourhoods alone.

        features: L levels (N, C, Hi, Wi); locations: per level (image, y, x), each (Si,) int64: the cells.
        Returns (S, 5A), S = sum of Si in level order: the A objectness logits, then the 4A deltas, as
        :meth:`forward` gives them at those cells (equal to float rounding).

        With k 3x3 convolutions a cell's outputs depend on the (2k+1) x (2k+1) cells around it, so those
        are gathered (zeros outside the level, as the convolutions pad) and the convolutions run on them
        without padding, the last one as a matrix product over all levels' cells at once (one shape from
        step to step, which oneDNN compiles once). Between convolutions, cells outside the level are set
        to zero, as padding sets them in :meth:`forward`. Training evaluates the losses this way at the
        sampled anchors only, so that the backward pass skips a convolution over every level.
        """
        convs = (self.conv, *self.extra_convs)
        radius = len(convs)
        patches, insides = [], []
        for feature, (image, y, x) in zip(features, locations):
            patch, inside = _neighbourhoods(feature, image, y, x, radius)
            patches.append(patch)
            insides.append(inside)
        inside = torch.cat(insides)  # (S, 2r+1, 2r+1, 1)
        t = torch.cat(patches)  # (S, 2r+1, 2r+1, C)
        for step, conv in enumerate(convs):
            # t covers the patch's cells step..2r-step; those outside the level are the padding's zeros
            t = t * inside[:, step:2 * radius + 1 - step, step:2 * radius + 1 - step].to(t.dtype)
            if step < radius - 1:  # (S, w, w, C) -> (S, w-2, w-2, C)
                t = F.relu(F.conv2d(t.permute(0, 3, 1, 2), conv.weight, conv.bias)).permute(0, 2, 3, 1)
            else:  # one 3x3 window per cell: (S, 9C) -> (S, C)
                weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
                t = F.relu(F.linear(t.reshape(len(t), weight.shape[1]), weight, conv.bias))
        weight, bias = self._output_weights()
        return F.linear(t, weight.flatten(1), bias)


def _neighbourhoods(feature: Tensor, image: Tensor, y: Tensor, x: Tensor, radius: int) -> Tuple[Tensor, Tensor]:
    """The (2r+1) x (2r+1) cells around S cells of one level: feature (N, C, H, W); image, y, x (S,) int64
    -> patches (S, 2r+1, 2r+1, C) (cells outside the level clamped to its border) and a (S, 2r+1, 2r+1, 1)
    bool mask of the cells inside it."""
    height, width = feature.shape[-2:]
    offsets = torch.arange(-radius, radius + 1, device=feature.device)
    rows, cols = y[:, None] + offsets, x[:, None] + offsets  # (S, 2r+1) each
    inside = (((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :])[..., None]
    rows, cols = rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]
    if feature.is_contiguous(memory_format=torch.channels_last):
        # Rows of a (N * H * W, C) view: the gather's backward adds whole rows, 3-8x faster than the
        # scattered writes of the general index.
        channels = feature.shape[1]
        cells = (image[:, None, None] * height + rows) * width + cols  # (S, 2r+1, 2r+1)
        patch = feature.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, cells.view(-1))
        return patch.view(*cells.shape, channels), inside
    # Advanced indices around the channel slice put their dimensions first.
    return feature[image[:, None, None], :, rows, cols], inside


def sample_anchors(gt_labels: Tensor, *, batch_size_per_image: int, positive_fraction: float) -> Tensor:
    """The balanced sample of anchors that the losses see: per image at most ``batch_size_per_image *
    positive_fraction`` positives (label 1), then negatives (label 0) up to ``batch_size_per_image``;
    ignored anchors (-1) never.

    gt_labels: (N, T). Returns (S,) int64 indices into the flattened (N * T) anchors.
    """
    sampled = []
    num_anchors = gt_labels.shape[1]
    for i, labels in enumerate(gt_labels):
        pos, neg = sample_balanced(labels, batch_size_per_image, positive_fraction)
        sampled += [pos + i * num_anchors, neg + i * num_anchors]
    return torch.cat(sampled)


def rpn_losses(logits: Tensor, deltas: Tensor, gt_labels: Tensor, gt_deltas: Tensor) -> Dict[str, Tensor]:
    """Objectness BCE and smooth-L1 box loss over S sampled anchors (:func:`sample_anchors`).

    logits: (S,) objectness logits; deltas: (S, 4); gt_labels: (S,) 1 (object) or 0 (background);
    gt_deltas: (S, 4) regression targets of each anchor's matched box (used where the label is 1). Both
    losses are normalised by S (torchvision's convention).
    """
    positive = gt_labels == 1
    box_loss = F.smooth_l1_loss(deltas[positive].float(), gt_deltas[positive], beta=1 / 9,
                                reduction="sum") / max(gt_labels.numel(), 1)
    if gt_labels.numel() == 0:
        objectness_loss = logits.sum() * 0
    else:
        objectness_loss = F.binary_cross_entropy_with_logits(logits.float(), gt_labels.float())
    return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}


class RPN(nn.Module):
    """Proposes object boxes from anchors.

    Args:
        anchor_generator, head: the submodules.
        box_coder: anchor-delta coding (weights 1, 1, 1, 1).
        matcher: anchor-to-ground-truth matcher (0.7 / 0.3 with low-quality matches).
        pre_nms_topk, post_nms_topk: (training, inference) pairs; pre-NMS per level, post-NMS per image.
        nms_thresh, min_size, score_thresh: proposal filtering.
        batch_size_per_image, positive_fraction: anchor sampling for the losses.

    forward(features, image_sizes, padded_size, targets=None) -> (proposals, losses):
        features: L pyramid levels, each (N, C, Hi, Wi); image_sizes: N (h, w) of the resized images
        inside the padded batch of size ``padded_size`` (Hp, Wp); targets: training dicts with ``boxes``
        (M, 4) and optionally ``crowd_boxes``.
        proposals is a list of N tensors (Ri, 4) xyxy in pixels of the resized input, highest objectness
        first; losses (``loss_objectness``, ``loss_rpn_box_reg``) is empty in eval mode.
    """

    def __init__(self, *, anchor_generator: AnchorGenerator, head: RPNHead, box_coder: BoxCoder, matcher: Matcher,
                 pre_nms_topk: Tuple[int, int], post_nms_topk: Tuple[int, int], nms_thresh: float,
                 min_size: float, score_thresh: float, batch_size_per_image: int, positive_fraction: float):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder
        self.matcher = matcher
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.score_thresh = score_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def forward(self, features: List[Tensor], image_sizes: List[Tuple[int, int]], padded_size: Tuple[int, int],
                targets=None) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        # Proposals take no gradient, so the head runs over every level without one; the losses evaluate
        # it again at the sampled anchors only (RPNHead.at_locations).
        with torch.no_grad():
            logits, deltas, anchors = self.predict(features, padded_size)
        n = features[0].shape[0]
        sizes = torch.as_tensor(image_sizes, dtype=torch.int64, device=features[0].device).view(n, 2)
        rois = self.select_proposals(logits, deltas, anchors, sizes)
        proposals = split_by_image(rois[:, 0].to(torch.int64), n, rois[:, 1:])[0]
        losses = {}
        if self.training:
            gt_labels, gt_deltas = self.label_anchors(torch.cat(anchors), targets)
            sampled = sample_anchors(gt_labels, batch_size_per_image=self.batch_size_per_image,
                                     positive_fraction=self.positive_fraction)
            sampled, logits, deltas = self.head_at_anchors(features, [len(a) for a in anchors], sampled)
            losses = rpn_losses(logits, deltas, gt_labels.view(-1)[sampled], gt_deltas.view(-1, 4)[sampled])
        return proposals, losses

    def head_at_anchors(self, features: List[Tensor], anchors_per_level: List[int], sampled: Tensor
                        ) -> Tuple[Tensor, Tensor, Tensor]:
        """The head's objectness logit and deltas of each sampled anchor, with gradients.

        features: L levels (N, C, Hi, Wi); anchors_per_level: the L counts Ai; sampled: (S,) indices into the
        flattened (N * T) anchors of :meth:`predict`'s order. Returns the same indices grouped by level
        (the order of the other two), logits (S,) and deltas (S, 4).
        """
        num_anchors = sum(anchors_per_level)
        per_location = self.anchor_generator.num_anchors_per_location
        starts = [sum(anchors_per_level[:i]) for i in range(len(anchors_per_level))]
        level = torch.bucketize(sampled % num_anchors, torch.tensor(starts[1:], device=sampled.device), right=True)
        level, order = torch.sort(level, stable=True)
        sampled = sampled[order]
        groups = sampled.split(level.bincount(minlength=len(features)).tolist())
        locations, anchor = [], []
        for feature, group, start in zip(features, groups, starts):
            image, index = group // num_anchors, group % num_anchors - start
            cell = index // per_location  # index = (y * Wi + x) * A + a
            width = feature.shape[-1]
            locations.append((image, cell // width, cell % width))
            anchor.append(index % per_location)
        out = self.head.at_locations(features, locations)  # (S, 5A)
        rows, anchor = torch.arange(len(out), device=out.device), torch.cat(anchor)
        return sampled, out[rows, anchor], out[:, per_location:].reshape(-1, per_location, 4)[rows, anchor]

    def propose(self, features: List[Tensor], image_sizes: Tensor, padded_size) -> Tensor:
        """Inference over a batch without loops over images: features as :meth:`forward`, image_sizes (N, 2)
        int64 (h, w), padded_size (Hp, Wp) -> (P, 5) RoIs, as :meth:`select_proposals` returns them."""
        logits, deltas, anchors = self.predict(features, padded_size)
        return self.select_proposals(logits, deltas, anchors, image_sizes)

    def predict(self, features: List[Tensor], padded_size) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """The head on every level, flattened to anchor order: per level ``pred_objectness_logits`` (N, Ai),
        ``pred_anchor_deltas`` (N, Ai, 4) and the anchors (Ai, 4), xyxy pixels of the padded input."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator([f.shape[-2:] for f in features], padded_size, features[0].device)
        n = features[0].shape[0]
        # (N, A, Hi, Wi) -> (N, Hi, Wi, A) -> (N, Ai)
        logits = [x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits]
        # (N, 4A, Hi, Wi) -> (N, A, 4, Hi, Wi) -> (N, Hi, Wi, A, 4) -> (N, Ai, 4)
        deltas = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for x in deltas]
        return logits, deltas, anchors

    @torch.no_grad()
    def select_proposals(self, logits: List[Tensor], deltas: List[Tensor], anchors: List[Tensor],
                         image_sizes: Tensor) -> Tensor:
        """Top-k per image and level, decode, clip, drop small and low-scoring, NMS per (image, level), top-k
        per image, over the whole batch at once.

        logits: per level (N, Ai) objectness logits; deltas: per level (N, Ai, 4) anchor deltas; anchors: per
        level (Ai, 4) xyxy pixels of the padded input; image_sizes: (N, 2) int64 (h, w) of each resized image.
        Only the anchors that survive the per-level top-k are decoded.
        Returns (P, 5) float RoIs: image index, then x1, y1, x2, y2 in pixels of the resized input; grouped by
        ascending image, highest objectness first within an image.
        """
        pre_topk = self.pre_nms_topk[0 if self.training else 1]
        post_topk = self.post_nms_topk[0 if self.training else 1]
        n = logits[0].shape[0]
        batch = torch.arange(n, device=logits[0].device)[:, None]
        scores, boxes, levels = [], [], []
        for level, (x, d, a) in enumerate(zip(logits, deltas, anchors)):
            top = x.topk(at_most(x, pre_topk, 1), dim=1).indices  # (N, k)
            scores.append(x[batch, top])
            # (N, k, 4) deltas of the selected anchors -> (N*k, 1, 4) boxes -> (N, k, 4)
            boxes.append(self.box_coder.decode(d[batch, top].reshape(-1, 4).float(),
                                               a[top].reshape(-1, 4)).view(n, -1, 4))
            levels.append(torch.full_like(top[0], level))
        scores = torch.sigmoid(torch.cat(scores, dim=1).float())  # (N, k) over the levels
        boxes = clip_to_images(torch.cat(boxes, dim=1), image_sizes[:, None, :])
        levels = torch.cat(levels)
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
        # (N, k) -> (N, L, k): the levels on the NMS class axis, each anchor scored in its own level only
        own_level = levels[None, :] == torch.arange(len(anchors), device=levels.device)[:, None]
        nms_scores = torch.where(valid[:, None, :] & own_level[None], scores[:, None, :], SKIP)
        image, _, slot = grouped_nms(boxes, nms_scores, self.nms_thresh).unbind(1)
        # Survivors in anchor order, so that equal scores rank as torchvision ranks them.
        order = torch.argsort(image * boxes.shape[1] + slot)
        image, slot = image[order], slot[order]
        keep = best_per_group(scores[image, slot], image, n, post_topk)
        image, slot = image[keep], slot[keep]
        return torch.cat([image[:, None].to(boxes.dtype), boxes[image, slot]], dim=1)

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, targets: List[dict]) -> Tuple[Tensor, Tensor]:
        """Per image: anchor labels (T,) in {1, 0, -1} and regression targets (T, 4), stacked over N."""
        labels, deltas = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            matches = match_boxes(self.matcher, gt_boxes, anchors)
            crowd = target.get("crowd_boxes")
            if crowd is not None:
                matches = ignore_crowd(matches, anchors, crowd)
            label = (matches >= 0).to(torch.int64)
            label[matches == Matcher.BETWEEN] = -1
            if len(gt_boxes):
                matched = gt_boxes[matches.clamp(min=0)]
                delta = self.box_coder.encode(matched.float(), anchors)
            else:
                delta = torch.zeros_like(anchors)
            labels.append(label)
            deltas.append(delta)
        return torch.stack(labels), torch.stack(deltas)
