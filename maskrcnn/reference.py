"""torchvision's Mask R-CNN built at a configuration's architecture: the oracle that parity tests and the
benchmark compare this package's model with.

Nothing is downloaded: torchvision's model is built from torchvision's own classes with seeded random
weights, and ours is loaded from it through :func:`maskrcnn.convert.convert_torchvision_state_dict`.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import ModelConfig
from .convert import convert_torchvision_state_dict
from .data.shapes import render_image
from .modeling.backbone import resnet_trunk
from .modeling.layers import make_norm
from .modeling.maskrcnn import MaskRCNN, build_model


CLASS_LOGIT_STD = 2.0  # spread of the well-conditioned model's class logits over the RoIs of its proposals


def torchvision_model(cfg: ModelConfig, *, norm_layer: Callable[..., nn.Module]) -> tv_mask_rcnn.MaskRCNN:
    """torchvision's Mask R-CNN at the architecture of ``cfg``, built from torchvision's classes.

    The default configuration is ``maskrcnn_resnet50_fpn``; its modules are created in the order
    ``maskrcnn_resnet50_fpn`` creates them, so that under the same seed the weights are those of
    ``maskrcnn_resnet50_fpn(weights=None)``. The head settings of ``configs/maskrcnn_R50_FPN_v2.yaml``
    (FPN and head normalisations, two-convolution RPN head, convolutional box head) give the architecture of
    ``maskrcnn_resnet50_fpn_v2``, built with the classes and arguments that builder uses
    (``RPNHead(conv_depth=...)``, ``FastRCNNConvFCHead``, ``MaskRCNNHeads(norm_layer=...)``, an FPN with
    ``norm_layer``). norm_layer: the trunk's normalisation (``nn.BatchNorm2d`` or ``FrozenBatchNorm2d``).
    Returned in training mode, like any freshly built module.
    """
    b, a, r, h = cfg.backbone, cfg.anchors, cfg.rpn, cfg.roi_heads
    if b.width == 64:
        trunk = getattr(torchvision.models, f"resnet{b.depth}")(weights=None, norm_layer=norm_layer)
    else:  # torchvision's ResNet blocks at another width (its builder only makes width 64)
        trunk = resnet_trunk(b.depth, b.width, norm_layer)
    # What torchvision's _resnet_fpn_extractor does, with the pyramid width as a parameter: its
    # trainable_layers is 5 - freeze_at, and at 5 the stem's norm trains too.
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: 5 - b.freeze_at + (b.freeze_at == 0)]
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)
    width = trunk.layer1[0].conv1.in_channels * trunk.layer1[-1].expansion
    backbone = BackboneWithFPN(trunk, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                               [width * 2 ** k for k in range(4)], b.fpn_channels, extra_blocks=LastLevelMaxPool(),
                               norm_layer=_torchvision_norm(b.fpn_norm))
    num_classes = h.num_classes + 1  # torchvision counts the background
    pooled = ["0", "1", "2", "3"]
    mask_head = tv_mask_rcnn.MaskRCNNHeads(b.fpn_channels, [h.mask_head_dim] * h.mask_head_convs, 1,
                                           norm_layer=_torchvision_norm(h.mask_head_norm))
    mask_predictor = tv_mask_rcnn.MaskRCNNPredictor(h.mask_head_dim, h.mask_head_dim, num_classes)
    anchor_generator = TVAnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes))
    rpn_head = TVRPNHead(b.fpn_channels, len(a.aspect_ratios), conv_depth=r.head_convs)
    if h.box_head_convs == 0 and h.box_head_fcs == 2:
        box_head = TwoMLPHead(b.fpn_channels * h.box_pooler_resolution ** 2, h.box_head_dim)
    else:
        box_head = FastRCNNConvFCHead((b.fpn_channels, h.box_pooler_resolution, h.box_pooler_resolution),
                                      [h.box_head_conv_dim] * h.box_head_convs, [h.box_head_dim] * h.box_head_fcs,
                                      norm_layer=_torchvision_norm(h.box_head_norm))
    box_predictor = FastRCNNPredictor(h.box_head_dim, num_classes)
    return tv_mask_rcnn.MaskRCNN(
        backbone, min_size=tuple(cfg.input.min_size), max_size=cfg.input.max_size,
        image_mean=list(cfg.input.pixel_mean), image_std=list(cfg.input.pixel_std),
        rpn_anchor_generator=anchor_generator, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train, rpn_pre_nms_top_n_test=r.pre_nms_topk_test,
        rpn_post_nms_top_n_train=r.post_nms_topk_train, rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        rpn_score_thresh=r.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(pooled, h.box_pooler_resolution, h.sampling_ratio,
                                        canonical_scale=h.canonical_scale, canonical_level=h.canonical_level),
        box_head=box_head, box_predictor=box_predictor, box_score_thresh=h.score_thresh,
        box_nms_thresh=h.nms_thresh, box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh, box_bg_iou_thresh=h.bg_iou_thresh,
        box_batch_size_per_image=h.batch_size_per_image, box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.bbox_reg_weights),
        mask_roi_pool=MultiScaleRoIAlign(pooled, h.mask_pooler_resolution, h.sampling_ratio,
                                         canonical_scale=h.canonical_scale, canonical_level=h.canonical_level),
        mask_head=mask_head, mask_predictor=mask_predictor,
    )


def _torchvision_norm(kind: str) -> Optional[Callable[[int], nn.Module]]:
    """torchvision's ``norm_layer`` argument for our norm name: None for "", else a builder of
    :func:`~maskrcnn.modeling.layers.make_norm`'s layer (``nn.BatchNorm2d`` for "bn")."""
    if not kind:
        return None
    return nn.BatchNorm2d if kind == "bn" else (lambda channels: make_norm(kind, channels))


def _calibrate_batchnorm(module: nn.Module, *inputs) -> None:
    """Set the running statistics of every batch norm in ``module`` to those of one training-mode forward
    on ``inputs``; ``module`` is left in eval mode."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    module.train()
    module(*inputs)
    module.eval()


def well_conditioned_torchvision_model(cfg: ModelConfig, *, seed: int = 0) -> tv_mask_rcnn.MaskRCNN:
    """torchvision's Mask R-CNN at ``cfg`` with seeded random weights scaled to a well-conditioned network.

    Batch-norm statistics are calibrated on random images (the trunk's, and the FPN's and heads' where they
    have batch norms, the heads on the RoIs of the model's own proposals), an FPN without normalisation has
    its outputs scaled to unit spread, and the prediction layers get a spread of scores, so that ranking
    and NMS are decided by margins far above float round-off rather than by ties. A model with batch norms
    outside the trunk (v2) is calibrated on shapes images (:func:`sample_images`) as well as noise, and its
    class logits are scaled to spread :data:`CLASS_LOGIT_STD` over the calibration RoIs. The trunk is returned with
    ``FrozenBatchNorm2d`` (the layout of torchvision's v1 pretrained models) when ``cfg.backbone.norm`` is
    "frozen_bn", else with ``BatchNorm2d``. Returned in eval mode.
    """
    torch.manual_seed(seed)
    tv = torchvision_model(cfg, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        calib_images = [torch.rand(3, 160, 200), torch.rand(3, 200, 160)]
        normalised = any(isinstance(m, nn.BatchNorm2d) for part in (tv.backbone.fpn, tv.roi_heads)
                         for m in part.modules())
        if normalised:
            calib_images += sample_images(160, torch.device("cpu"), count=2, seed=seed)
        calib = tv.transform(calib_images)[0]
        body = tv.backbone.body
        _calibrate_batchnorm(body, calib.tensors)
        _calibrate_batchnorm(tv.backbone.fpn, body(calib.tensors))
        features = tv.backbone(calib.tensors)
        if not cfg.backbone.fpn_norm:
            for conv, level in zip(tv.backbone.fpn.layer_blocks, ["0", "1", "2", "3"]):
                std = features[level].std()
                conv[0].weight /= std
                conv[0].bias /= std
            features = tv.backbone(calib.tensors)
        g = torch.Generator().manual_seed(seed + 1)
        for layer, std in [(tv.rpn.head.cls_logits, 0.3), (tv.rpn.head.bbox_pred, 0.05),
                           (tv.roi_heads.box_predictor.cls_score, 0.3),
                           (tv.roi_heads.box_predictor.bbox_pred, 0.05),
                           (tv.roi_heads.mask_predictor.mask_fcn_logits, 0.1)]:
            layer.weight.normal_(0, std, generator=g)
            layer.bias.normal_(0, std, generator=g)
        tv.eval()
        proposals, _ = tv.rpn(calib, features)
        heads = tv.roi_heads
        box_rois = heads.box_roi_pool(features, proposals, calib.image_sizes)
        _calibrate_batchnorm(heads.box_head, box_rois)
        if normalised:
            # The box head's output scale is set by its calibrated statistics: class logits of a fixed
            # spread over the RoIs keep the softmax scores far from saturation.
            cls_score = heads.box_predictor.cls_score
            scale = CLASS_LOGIT_STD / cls_score(heads.box_head(box_rois)).std()
            cls_score.weight *= scale
            cls_score.bias *= scale
        top = [p[:100] for p in proposals]
        _calibrate_batchnorm(heads.mask_head, heads.mask_roi_pool(features, top, calib.image_sizes))
    if cfg.backbone.norm == "frozen_bn":
        frozen = torchvision_model(cfg, norm_layer=FrozenBatchNorm2d)
        frozen.load_state_dict(tv.state_dict())
        tv = frozen
    return tv.eval()


def our_model_from(tv: tv_mask_rcnn.MaskRCNN, cfg: ModelConfig) -> MaskRCNN:
    """``build_model(cfg)`` carrying the weights of the torchvision model ``tv`` (built at the same ``cfg``),
    on ``tv``'s device and in its training mode."""
    ours = build_model(cfg).to(next(tv.parameters()).device)
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict()))
    return ours.train(tv.training)


def sample_images(size: int, device: torch.device, count: int = 1, seed: int = 0) -> List[Tensor]:
    """``count`` COCO-like landscape images of ``size`` x ``1.5 size`` pixels, (3, H, W) float 0-1 RGB:
    shapes on a noisy gradient background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels, _ = render_image(rng, min_size=size, max_size=size)
        pixels = np.ascontiguousarray(np.concatenate([pixels, pixels[:, : size // 2]], axis=1))
        out.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(device))
    return out
