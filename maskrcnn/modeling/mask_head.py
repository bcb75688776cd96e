"""Mask head: a small FCN on 14x14 RoI features predicting one 28x28 mask logit map per class.

Shorthand: R RoIs, C feature channels, K object classes, S = 28 mask side.
Naming: ``pred_mask_logits`` (R, K, S, S); ``gt_masks`` the ground-truth instance masks of one image;
``mask_targets`` (R, S, S) in [0, 1], each positive RoI's ground-truth mask cropped to the RoI box and
resampled to S x S.

Training signal: for every positive RoI, binary cross-entropy between the S x S logits of its
ground-truth class channel and its S x S target, averaged over R * S * S cells. The other K - 1
channels get no gradient, so classes do not compete for a pixel (the classifier decides the class).
Training therefore evaluates only that channel (:meth:`MaskHead.class_logits`): the same numbers as the
full predictor followed by the selection, without the K - 1 channels nothing reads.
"""

from __future__ import annotations

from typing import Iterator, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RoIHeadsConfig
from .layers import ConvNormPair, conv_norm_relu, conv_relu, make_norm, paired_lists


class MaskHead(nn.Module):
    """Args:
        in_channels: C.
        conv_dim: channels of the 3x3 convolutions.
        num_convs: number of 3x3 convolutions (4 in the standard head).
        num_classes: K (background excluded).
        norm: normalisation after each 3x3 convolution: "" (none, the standard head), "bn" (batch norm
            over the RoIs) or "gn" (group norm, 32 groups); with a norm the convolutions have no bias.
        resolution: side of the pooled RoI features it takes (14); its masks are ``mask_side`` = twice that.

    forward(x: (R, C, 14, 14)) -> (R, K, 28, 28) logits.
    class_logits(x: (R, C, 14, 14), classes: (R,) int64 in 1..K) -> (R, 28, 28) logits of each RoI's own
        class, the only channel that inference and the training loss read.
    """

    def __init__(self, *, in_channels: int, conv_dim: int = RoIHeadsConfig.mask_head_dim,
                 num_convs: int = RoIHeadsConfig.mask_head_convs, num_classes: int,
                 norm: str = RoIHeadsConfig.mask_head_norm, resolution: int = RoIHeadsConfig.mask_pooler_resolution):
        super().__init__()
        self.resolution = resolution
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1, bias=not norm)
            for i in range(num_convs)
        )
        self.norms = nn.ModuleList(make_norm(norm, conv_dim) for _ in range(num_convs))
        last = conv_dim if num_convs else in_channels
        self.deconv = nn.ConvTranspose2d(last, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for layer in [*self.convs, self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        # Small predictor weights start every mask logit near 0 (probability 0.5, BCE near log 2).
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.upsampled_features(x))

    @property
    def mask_side(self) -> int:
        """S, the side of the predicted masks: the 2x deconvolution doubles the pooled side."""
        return 2 * self.resolution

    def conv_norm_pairs(self) -> Iterator[ConvNormPair]:
        """Each 3x3 convolution with the normalisation after it (see :mod:`~maskrcnn.modeling.layers`)."""
        return paired_lists(self.convs, self.norms)

    def class_logits(self, x: Tensor, classes: Tensor) -> Tensor:
        """The predictor's 1x1 convolution evaluated for one class per RoI: a weighted channel sum."""
        features = self.upsampled_features(x)  # (R, D, 28, 28)
        weight = self.predictor.weight[classes - 1, :, 0, 0].to(features.dtype)  # (R, D)
        bias = self.predictor.bias[classes - 1].to(features.dtype)  # (R,)
        return torch.einsum("rdhw,rd->rhw", features, weight) + bias[:, None, None]

    def upsampled_features(self, x: Tensor) -> Tensor:
        """(R, C, 14, 14) -> (R, D, 28, 28), D = conv_dim: the convolutions and the 2x deconvolution."""
        for conv, norm in zip(self.convs, self.norms):
            x = conv_norm_relu(conv, norm, x)
        return conv_relu(self.deconv, x)


@torch.no_grad()
def mask_targets(gt_masks: List, proposals: List[Tensor], matched_idxs: List[Tensor], size: int) -> Tensor:
    """Crop each positive RoI's matched ground-truth mask to the RoI and resample to ``size x size``.

    gt_masks: per image a BitMasks / PolygonMasks; proposals: per image (Pi, 4) xyxy pixels of the
    positive RoIs; matched_idxs: per image (Pi,) int64 index of the matched instance.
    Returns (P, size, size) float in [0, 1], P = sum of Pi.
    """
    out = [masks.crop_and_resize(boxes, size, indices=idx)
           for masks, boxes, idx in zip(gt_masks, proposals, matched_idxs) if len(boxes)]
    if not out:
        return proposals[0].new_zeros((0, size, size), dtype=torch.float32)
    return torch.cat(out).to(proposals[0].device)


def mask_loss(class_logits: Tensor, targets: Tensor,
              outline_weight: float = RoIHeadsConfig.mask_outline_weight) -> Tensor:
    """Per-pixel binary cross-entropy of each positive RoI's ground-truth class channel.

    class_logits: (P, S, S) logits of the ground-truth class (:meth:`MaskHead.class_logits`, or
    :func:`logits_of_class` of the full logits); targets: (P, S, S) in [0, 1].
    outline_weight: cells on the target's outline (:func:`outline_cells`) weigh ``1 + outline_weight``, the
        others 1 (targets must then be (P, S, S) grids); 0 (the default) is the plain mean.
    Returns the weighted mean over P * S * S cells; 0 (graph kept) when P == 0.
    """
    if targets.numel() == 0:
        return class_logits.sum() * 0
    if outline_weight == 0:
        return F.binary_cross_entropy_with_logits(class_logits.float(), targets)
    weights = 1 + outline_weight * outline_cells(targets).float()
    per_cell = F.binary_cross_entropy_with_logits(class_logits.float(), targets, reduction="none")
    return (per_cell * weights).sum() / weights.sum()


def outline_cells(targets: Tensor) -> Tensor:
    """(P, S, S) targets in [0, 1] -> (P, S, S) bool: the cells whose 3 x 3 neighbourhood (inside the grid)
    holds both foreground (> 0.5) and background, the two-cell-wide band along each target's outline."""
    inside = (targets > 0.5).float()[:, None]
    grown = F.max_pool2d(inside, 3, stride=1, padding=1)  # some neighbour is foreground
    shrunk = -F.max_pool2d(-inside, 3, stride=1, padding=1)  # every neighbour is foreground
    return (grown != shrunk)[:, 0]


def logits_of_class(pred_mask_logits: Tensor, classes: Tensor) -> Tensor:
    """Each RoI's channel of its class: (D, K, S, S), (D,) labels 1..K -> (D, S, S)."""
    return pred_mask_logits[torch.arange(len(classes), device=classes.device), classes - 1]


def mask_probs_of_class(pred_mask_logits: Tensor, classes: Tensor) -> Tensor:
    """Sigmoid of each detection's own class channel: (D, K, S, S), (D,) labels 1..K -> (D, S, S) float."""
    return logits_of_class(pred_mask_logits, classes).float().sigmoid()
