"""torchvision's Mask R-CNN built at a configuration's architecture: the oracle that parity tests and the
benchmark compare this package's model with.

Nothing is downloaded: torchvision's model is built from torchvision's own classes with seeded random
weights, and ours is loaded from it through :func:`maskrcnn.convert.convert_torchvision_state_dict`.
"""

from __future__ import annotations

from typing import Callable, List

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import ModelConfig
from .convert import convert_torchvision_state_dict
from .data.shapes import render_image
from .modeling.maskrcnn import MaskRCNN, build_model


def torchvision_model(cfg: ModelConfig, *, norm_layer: Callable[..., nn.Module]) -> tv_mask_rcnn.MaskRCNN:
    """torchvision's Mask R-CNN at the architecture of ``cfg``, built from torchvision's classes.

    The modules are created in the order ``maskrcnn_resnet50_fpn`` creates them, so that for the default
    configuration, under the same seed, the weights are those of ``maskrcnn_resnet50_fpn(weights=None)``.
    norm_layer: the trunk's normalisation (``nn.BatchNorm2d`` or ``FrozenBatchNorm2d``).
    Returned in training mode, like any freshly built module.
    """
    b, a, r, h = cfg.backbone, cfg.anchors, cfg.rpn, cfg.roi_heads
    trunk = getattr(torchvision.models, f"resnet{b.depth}")(weights=None, norm_layer=norm_layer)
    # What torchvision's _resnet_fpn_extractor does, with the pyramid width as a parameter: its
    # trainable_layers is 5 - freeze_at, and at 5 the stem's norm trains too.
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: 5 - b.freeze_at + (b.freeze_at == 0)]
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)
    width = trunk.inplanes // 8
    backbone = BackboneWithFPN(trunk, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                               [width * 2 ** k for k in range(4)], b.fpn_channels, extra_blocks=LastLevelMaxPool())
    num_classes = h.num_classes + 1  # torchvision counts the background
    pooled = ["0", "1", "2", "3"]
    mask_head = tv_mask_rcnn.MaskRCNNHeads(b.fpn_channels, [h.mask_head_dim] * h.mask_head_convs, 1)
    mask_predictor = tv_mask_rcnn.MaskRCNNPredictor(h.mask_head_dim, h.mask_head_dim, num_classes)
    anchor_generator = TVAnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes))
    rpn_head = TVRPNHead(b.fpn_channels, len(a.aspect_ratios))
    box_head = TwoMLPHead(b.fpn_channels * h.box_pooler_resolution ** 2, h.box_head_dim)
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


def well_conditioned_torchvision_model(cfg: ModelConfig, *, seed: int = 0) -> tv_mask_rcnn.MaskRCNN:
    """torchvision's Mask R-CNN at ``cfg`` with seeded random weights scaled to a well-conditioned network.

    Batch-norm statistics are calibrated on random images, pyramid outputs are scaled to unit spread and
    the prediction layers get a spread of scores, so that ranking and NMS are decided by margins far above
    float round-off rather than by ties. The trunk is returned with ``FrozenBatchNorm2d`` (the layout of
    torchvision's pretrained models) when ``cfg.backbone.norm`` is "frozen_bn", else with ``BatchNorm2d``.
    Returned in eval mode.
    """
    torch.manual_seed(seed)
    tv = torchvision_model(cfg, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        calib = tv.transform([torch.rand(3, 160, 200), torch.rand(3, 200, 160)])[0].tensors
        body = tv.backbone.body
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        body.train()
        body(calib)
        body.eval()
        features = tv.backbone(calib)
        for conv, level in zip(tv.backbone.fpn.layer_blocks, ["0", "1", "2", "3"]):
            std = features[level].std()
            conv[0].weight /= std
            conv[0].bias /= std
        g = torch.Generator().manual_seed(seed + 1)
        for layer, std in [(tv.rpn.head.cls_logits, 0.3), (tv.rpn.head.bbox_pred, 0.05),
                           (tv.roi_heads.box_predictor.cls_score, 0.3),
                           (tv.roi_heads.box_predictor.bbox_pred, 0.05),
                           (tv.roi_heads.mask_predictor.mask_fcn_logits, 0.1)]:
            layer.weight.normal_(0, std, generator=g)
            layer.bias.normal_(0, std, generator=g)
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
