"""RoI heads: proposal sampling, the box head and its losses, and the call into the mask head.

Shorthand:
    N   images;  R  sampled RoIs over the batch (training) or proposals (inference)
    K   object classes (background excluded); class 0 of the classifier is background
    C   feature channels;  D  detections of one image
Naming: ``pred_class_logits`` (R, K+1), ``pred_proposal_deltas`` (R, 4K), ``gt_classes`` (R,) in 0..K.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RoIHeadsConfig
from .box_coder import BoxCoder
from .layers import ConvNormPair, conv_norm_relu, make_norm, paired_lists
from .mask_head import MaskHead, mask_loss, mask_targets
from .matcher import Matcher, match_boxes, sample_balanced
from .point_head import PointHead
from .poolers import MultiLevelRoIAlign
from .postprocess import select_detections
from .selection import split_by_image, to_rois


class BoxHead(nn.Module):
    """3x3 convolutions (each followed by a normalisation and a ReLU), then fully connected layers (each
    followed by a ReLU) on the flattened result.

    Args:
        in_channels: C.
        resolution: side of the pooled RoI features (7).
        num_convs: 3x3 convolutions: 0 in torchvision's v1 head (two fully connected layers on the
            pooled features), 4 in its v2 head.
        conv_dim: channels of the convolutions.
        norm: normalisation after each convolution: "" none, "bn" (batch norm over the RoIs) or "gn"
            (see :func:`~maskrcnn.modeling.layers.make_norm`); with a norm the convolutions have no bias.
        num_fcs: fully connected layers, ``fc1`` .. ``fc{num_fcs}``: 2 in v1, 1 in v2.
        fc_dim: their width.

    forward(x: (R, C, resolution, resolution)) -> (R, fc_dim).
    """

    def __init__(self, *, in_channels: int, resolution: int, num_convs: int = RoIHeadsConfig.box_head_convs,
                 conv_dim: int = RoIHeadsConfig.box_head_conv_dim, norm: str = RoIHeadsConfig.box_head_norm,
                 num_fcs: int = RoIHeadsConfig.box_head_fcs, fc_dim: int = RoIHeadsConfig.box_head_dim):
        super().__init__()
        if num_convs < 0 or num_fcs < 1:
            raise ValueError(f"roi_heads.box_head_convs must be >= 0 and roi_heads.box_head_fcs >= 1, got "
                             f"{num_convs} and {num_fcs}")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1, bias=not norm)
            for i in range(num_convs)
        )
        self.norms = nn.ModuleList(make_norm(norm, conv_dim) for _ in range(num_convs))
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        features = (conv_dim if num_convs else in_channels) * resolution ** 2
        self.num_fcs = num_fcs
        for k in range(1, num_fcs + 1):
            self.add_module(f"fc{k}", nn.Linear(features if k == 1 else fc_dim, fc_dim))

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv_norm_relu(conv, norm, x)
        x = x.flatten(1)
        for k in range(1, self.num_fcs + 1):
            x = F.relu(getattr(self, f"fc{k}")(x), inplace=True)
        return x

    def conv_norm_pairs(self) -> Iterator[ConvNormPair]:
        """Each convolution with the normalisation after it (see :mod:`~maskrcnn.modeling.layers`)."""
        return paired_lists(self.convs, self.norms)


class BoxPredictor(nn.Module):
    """Classification over K+1 classes and class-specific box deltas for the K object classes.

    forward(x: (R, fc_dim)) -> (pred_class_logits (R, K+1), pred_proposal_deltas (R, 4K)).
    """

    def __init__(self, *, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def box_losses(pred_class_logits: Tensor, pred_proposal_deltas: Tensor, gt_classes: Tensor,
               gt_deltas: Tensor) -> Dict[str, Tensor]:
    """Cross-entropy over K+1 classes; smooth-L1 (beta 1/9) on the deltas of the ground-truth class
    of foreground RoIs, summed and divided by the number of sampled RoIs.

    gt_classes: (R,) int64 in 0..K; gt_deltas: (R, 4) regression targets (meaningful for foreground only).
    """
    loss_cls = F.cross_entropy(pred_class_logits.float(), gt_classes)
    fg = torch.nonzero(gt_classes > 0)[:, 0]
    deltas = pred_proposal_deltas.view(len(pred_proposal_deltas), -1, 4)[fg, gt_classes[fg] - 1]
    loss_box = F.smooth_l1_loss(deltas.float(), gt_deltas[fg], beta=1 / 9, reduction="sum") / max(gt_classes.numel(), 1)
    return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}


class RoIHeads(nn.Module):
    """Args:
        box_pooler, box_head, box_predictor, mask_pooler, mask_head: the submodules.
        point_head: refines the mask head's masks (PointRend, :mod:`~maskrcnn.modeling.point_head`); None: off.
        box_coder: proposal-delta coding (weights 10, 10, 5, 5).
        matcher: proposal-to-ground-truth matcher (0.5 / 0.5, no low-quality matches).
        batch_size_per_image, positive_fraction: RoI sampling for the losses.
        mask_rois_per_image: the mask loss uses at most this many of each image's foreground RoIs (a
            random subset); 0 uses them all (the standard). The mask head is the costliest part of a
            training step and its cost grows with the foreground RoIs, several per object.
        mask_outline_weight: extra weight of the mask loss on the cells along each target's outline
            (:func:`~maskrcnn.modeling.mask_head.mask_loss`); 0 is the standard loss.
        score_thresh, nms_thresh, detections_per_img: detection selection at inference.

    forward(features, proposals, image_sizes, targets) ->
        training: dict of losses (loss_classifier, loss_box_reg, loss_mask, and loss_mask_point with a point head);
        inference: per image a dict with ``boxes`` (D, 4) xyxy pixels of the resized input, ``scores`` (D,),
        ``labels`` (D,) in 1..K and ``mask_probs`` (D, S, S) float probabilities of the detected class
        (S = :attr:`mask_side`).
    """

    def __init__(self, *, box_pooler: MultiLevelRoIAlign, box_head: BoxHead, box_predictor: BoxPredictor,
                 mask_pooler: MultiLevelRoIAlign, mask_head: MaskHead, box_coder: BoxCoder, matcher: Matcher,
                 batch_size_per_image: int, positive_fraction: float, score_thresh: float, nms_thresh: float,
                 detections_per_img: int, mask_rois_per_image: int = RoIHeadsConfig.mask_rois_per_image,
                 point_head: Optional[PointHead] = None,
                 mask_outline_weight: float = RoIHeadsConfig.mask_outline_weight):
        super().__init__()
        if mask_outline_weight < 0:
            raise ValueError(f"roi_heads.mask_outline_weight must be >= 0, got {mask_outline_weight}")
        if mask_rois_per_image < 0:
            raise ValueError(f"roi_heads.mask_rois_per_image must be >= 0 (0 uses every foreground RoI), "
                             f"got {mask_rois_per_image}")
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.point_head = point_head
        self.box_coder = box_coder
        self.matcher = matcher
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_rois_per_image = mask_rois_per_image
        self.mask_outline_weight = mask_outline_weight

    def forward(self, features: List[Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
                targets=None):
        features = self.box_pooler.in_read_layout(features)  # one copy for both poolers, where they need one
        if self.training:
            return self.losses(features, proposals, targets)
        return self.predict_masks(features, self.detect_boxes(features, proposals, image_sizes))

    @torch.no_grad()
    def sample_proposals(self, proposals: List[Tensor], targets: List[dict]):
        """Append the ground-truth boxes to the proposals, match, and sample a balanced subset.

        Returns per image: sampled boxes (Si, 4), gt_classes (Si,) in 0..K, matched instance index (Si,)
        (meaningful where gt_classes > 0) and regression targets (Si, 4).
        """
        boxes_out, classes_out, idx_out, deltas_out = [], [], [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(boxes.dtype)
            boxes = torch.cat([boxes, gt_boxes])
            matches = match_boxes(self.matcher, gt_boxes, boxes)
            matched = matches.clamp(min=0)
            classes = target["labels"][matched] if len(gt_boxes) else torch.zeros_like(matches)
            classes = torch.where(matches >= 0, classes, torch.zeros_like(classes))
            classes[matches == Matcher.BETWEEN] = -1
            pos, neg = sample_balanced(classes, self.batch_size_per_image, self.positive_fraction)
            keep = torch.cat([pos, neg])
            boxes_out.append(boxes[keep])
            classes_out.append(classes[keep])
            idx_out.append(matched[keep])
            deltas_out.append(self.box_coder.encode(gt_boxes[matched[keep]], boxes[keep]) if len(gt_boxes)
                              else torch.zeros_like(boxes[keep]))
        return boxes_out, classes_out, idx_out, deltas_out

    def losses(self, features: List[Tensor], proposals: List[Tensor], targets: List[dict]) -> Dict[str, Tensor]:
        boxes, gt_classes, matched, gt_deltas = self.sample_proposals(proposals, targets)
        x = self.box_head(self.box_pooler(features, boxes))
        pred_class_logits, pred_deltas = self.box_predictor(x)
        losses = box_losses(pred_class_logits, pred_deltas, torch.cat(gt_classes), torch.cat(gt_deltas))

        # The sampled positives come first and in random order, so a prefix is a random subset.
        cap = self.mask_rois_per_image or None
        fg = [torch.nonzero(c > 0)[:cap, 0] for c in gt_classes]
        fg_boxes = [b[i] for b, i in zip(boxes, fg)]
        fg_classes = torch.cat([c[i] for c, i in zip(gt_classes, fg)])
        fg_matched = [m[i] for m, i in zip(matched, fg)]
        gt_masks = [t["masks"] for t in targets]
        targets_28 = mask_targets(gt_masks, fg_boxes, fg_matched, self.mask_head.mask_side)
        if len(fg_classes) == 0:
            # No foreground RoI anywhere in the batch: keep the mask heads in the graph with a zero loss.
            losses["loss_mask"] = sum(p.sum() for p in self.mask_head.parameters()) * 0
            if self.point_head is not None:
                losses["loss_mask_point"] = sum(p.sum() for p in self.point_head.parameters()) * 0
        else:
            class_logits = self.mask_head.class_logits(self.mask_pooler(features, fg_boxes), fg_classes)
            losses["loss_mask"] = mask_loss(class_logits, targets_28, self.mask_outline_weight)
            if self.point_head is not None:
                losses["loss_mask_point"] = self.point_head.loss(features, fg_boxes, class_logits, fg_classes,
                                                                 gt_masks, fg_matched)
        return losses

    def detect_boxes(self, features: List[Tensor], proposals: List[Tensor],
                     image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Box head and detection selection: per image ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,).
        :meth:`detect` on the proposals as RoIs, split by image."""
        sizes = torch.as_tensor(image_sizes, dtype=torch.int64, device=features[0].device).view(-1, 2)
        out = self.detect(features, to_rois(proposals), sizes)
        names = ("boxes", "scores", "labels")
        split = split_by_image(out["image_index"], len(proposals), *(out[name] for name in names))
        return [dict(zip(names, values)) for values in zip(*split)]

    def detect(self, features: List[Tensor], rois: Tensor, image_sizes: Tensor) -> Dict[str, Tensor]:
        """Box head and detection selection over a batch, without loops over images.

        rois: (R, 5) proposals, image index then x1, y1, x2, y2 in pixels of the resized input; image_sizes:
        (N, 2) int64 (h, w). Returns ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,) int64 in 1..K and
        ``image_index`` (D,) int64, grouped by ascending image, highest score first within an image
        (:func:`~maskrcnn.modeling.postprocess.select_detections`).
        """
        x = self.box_head(self.box_pooler.pool(features, rois))
        pred_class_logits, pred_deltas = self.box_predictor(x)
        scores = F.softmax(pred_class_logits.float(), dim=-1)
        boxes = self.box_coder.decode(pred_deltas.float(), rois[:, 1:])  # (R, K, 4)
        return select_detections(boxes, scores, rois[:, 0].to(torch.int64), image_sizes,
                                 score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                                 topk=self.detections_per_img)

    def predict_masks(self, features: List[Tensor], detections: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        """Mask head on the detected boxes: each image's detections with ``mask_probs`` (D, S, S) added
        (:meth:`mask_probs`)."""
        probs = self.mask_probs(features, to_rois([r["boxes"] for r in detections]),
                                torch.cat([r["labels"] for r in detections]))
        return [{**r, "mask_probs": p} for r, p in zip(detections, probs.split([len(r["boxes"]) for r in detections]))]

    def mask_probs(self, features: List[Tensor], rois: Tensor, labels: Tensor) -> Tensor:
        """rois: (D, 5) detections, image index then x1, y1, x2, y2 in pixels of the resized input; labels:
        (D,) int64 in 1..K -> (D, S, S) float mask probabilities of each detection's class (S = :attr:`mask_side`):
        the mask head's, refined by the point head if there is one."""
        logits = self.mask_head.class_logits(self.mask_pooler.pool(features, rois), labels)
        if self.point_head is not None:
            logits = self.point_head.refine(features, rois, logits, labels)
        return logits.float().sigmoid()

    @property
    def mask_side(self) -> int:
        """S, the side of the masks that inference returns: the mask head's (28), times 2**steps with a point head."""
        side = self.mask_head.mask_side
        return side if self.point_head is None else self.point_head.refined_side(side)
