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
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .matcher import Matcher, ignore_crowd, match_boxes, sample_balanced


class RPNHead(nn.Module):
    """A 3x3 conv shared by all levels, then 1x1 convs for objectness and box deltas.

    forward(features: list of L (N, C, Hi, Wi)) -> (list of (N, A, Hi, Wi) logits, list of (N, 4A, Hi, Wi) deltas).
    """

    def __init__(self, *, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x), inplace=True)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def rpn_losses(pred_objectness_logits: Tensor, pred_anchor_deltas: Tensor, gt_labels: Tensor,
               gt_deltas: Tensor, *, batch_size_per_image: int, positive_fraction: float) -> Dict[str, Tensor]:
    """Objectness BCE and smooth-L1 box loss over a balanced sample of anchors.

    pred_objectness_logits: (N, T); pred_anchor_deltas: (N, T, 4); gt_labels: (N, T) in {1, 0, -1};
    gt_deltas: (N, T, 4) regression targets of each anchor's matched box. Both losses are normalised
    by the number of sampled anchors (torchvision's convention).
    """
    pos, neg = [], []
    num_anchors = gt_labels.shape[1]
    for i, labels in enumerate(gt_labels):
        p, n = sample_balanced(labels, batch_size_per_image, positive_fraction)
        pos.append(p + i * num_anchors)
        neg.append(n + i * num_anchors)
    pos, neg = torch.cat(pos), torch.cat(neg)
    sampled = torch.cat([pos, neg])
    logits = pred_objectness_logits.reshape(-1)
    deltas = pred_anchor_deltas.reshape(-1, 4)
    box_loss = F.smooth_l1_loss(deltas[pos].float(), gt_deltas.reshape(-1, 4)[pos], beta=1 / 9,
                                reduction="sum") / max(sampled.numel(), 1)
    if sampled.numel() == 0:
        objectness_loss = logits.sum() * 0
    else:
        objectness_loss = F.binary_cross_entropy_with_logits(logits[sampled].float(),
                                                             gt_labels.reshape(-1)[sampled].float())
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
        first; losses (``loss_rpn_cls``, ``loss_rpn_box``) is empty in eval mode.
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
        logits, deltas = self.head(features)
        feature_shapes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(feature_shapes, padded_size, features[0].device)
        num_per_level = [len(a) for a in anchors]
        n = features[0].shape[0]
        # (N, A, Hi, Wi) -> (N, Hi, Wi, A) -> (N, Ai), concatenated over levels to (N, T)
        pred_logits = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits], dim=1)
        # (N, 4A, Hi, Wi) -> (N, A, 4, Hi, Wi) -> (N, Hi, Wi, A, 4) -> (N, Ai, 4), concatenated to (N, T, 4)
        pred_deltas = torch.cat([
            x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for x in deltas
        ], dim=1)
        all_anchors = torch.cat(anchors)
        with torch.no_grad():
            boxes = self.select_proposals(pred_deltas.detach(), pred_logits.detach().float(), all_anchors,
                                          image_sizes, num_per_level)
        losses = {}
        if self.training:
            gt_labels, gt_deltas = self.label_anchors(all_anchors, targets)
            losses = rpn_losses(pred_logits, pred_deltas, gt_labels, gt_deltas,
                                batch_size_per_image=self.batch_size_per_image,
                                positive_fraction=self.positive_fraction)
        return boxes, losses

    def select_proposals(self, pred_deltas: Tensor, logits: Tensor, anchors: Tensor,
                         image_sizes: List[Tuple[int, int]], num_per_level: List[int]) -> List[Tensor]:
        """Top-k per level, decode, clip, drop small and low-scoring, per-level NMS, top-k per image.

        pred_deltas: (N, T, 4) anchor deltas; logits: (N, T) objectness logits; anchors: (T, 4) xyxy
        pixels of the padded input. Only the anchors that survive the per-level top-k are decoded.
        """
        pre_topk = self.pre_nms_topk[0 if self.training else 1]
        post_topk = self.post_nms_topk[0 if self.training else 1]
        index, levels, offset = [], [], 0
        for level, count in enumerate(num_per_level):
            k = min(pre_topk, count)
            top = logits[:, offset:offset + count].topk(k, dim=1).indices
            index.append(top + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
            offset += count
        index = torch.cat(index, dim=1)
        levels = torch.cat(levels)
        n = len(logits)
        batch = torch.arange(n, device=logits.device)[:, None]
        scores = torch.sigmoid(logits[batch, index])
        # (N, k, 4) deltas of the selected anchors -> (N*k, 1, 4) boxes -> (N, k, 4)
        proposals = self.box_coder.decode(pred_deltas[batch, index].reshape(-1, 4).float(),
                                          anchors[index].reshape(-1, 4)).view(n, -1, 4)
        out = []
        for boxes, prob, size in zip(proposals, scores, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, prob, lvl = boxes[keep], prob[keep], levels[keep]
            keep = torch.nonzero(prob >= self.score_thresh)[:, 0]
            boxes, prob, lvl = boxes[keep], prob[keep], lvl[keep]
            keep = batched_nms(boxes, prob, lvl, self.nms_thresh)[:post_topk]
            out.append(boxes[keep])
        return out

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
