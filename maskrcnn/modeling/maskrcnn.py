"""The assembled Mask R-CNN: preprocess -> backbone -> FPN -> RPN -> RoI heads -> postprocess.

Shorthand: N images; image i is (3, Hi, Wi) float 0-1 RGB as given by the caller; M ground-truth
instances of one image; K object classes (labels 1..K, 0 is background); D detections of one image.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.errors import InputError
from ..config import ModelConfig
from ..precision import PRECISIONS
from ..structures import BitMasks, ImageList, PolygonMasks
from .anchors import AnchorGenerator
from .backbone import ResNet
from .box_coder import BoxCoder
from .fpn import FPN
from .layers import HEAD_NORMS, fold_batchnorm_
from .mask_head import MaskHead
from .matcher import Matcher
from .point_head import PointHead
from .poolers import MultiLevelRoIAlign
from .postprocess import to_original_image
from .roi_heads import BoxHead, BoxPredictor, RoIHeads
from .rpn import RPN, RPNHead
from .selection import split_by_image

# The outputs of MaskRCNN.infer before image_index, the names of one image's detections.
INFERENCE_OUTPUTS = ("boxes", "scores", "labels", "mask_probs")


class MaskRCNN(nn.Module):
    """Args:
        backbone, fpn, rpn, roi_heads: the stages.
        num_classes: K.
        min_size, max_size: inference resize: shortest side to ``min_size``, longest at most ``max_size``.
        pixel_mean, pixel_std: per-channel normalisation of 0-1 RGB input.
        size_divisible: batched images are padded to a multiple of this.
        mask_threshold: probability at which a pasted mask pixel is foreground.
        paste_memory_mb: memory budget of the mask paste.
        precision: the precision inference runs in unless a caller says otherwise ("auto", "fp32" or "bf16",
            see :mod:`maskrcnn.precision`): :func:`maskrcnn.inference.detect` reads it, the forward does not.

    forward(images, targets=None):
        images: list of N (3, Hi, Wi) float tensors, 0-1 RGB; sizes may differ.
        training: targets is a list of N dicts with ``boxes`` (M, 4) float xyxy pixels of that image,
            ``labels`` (M,) int64 in 1..K, ``masks`` (BitMasks or PolygonMasks of the image's size) and
            optionally ``crowd_boxes`` (C, 4); images are used at their given size (resizing is data
            augmentation). Returns a dict of scalar losses.
        inference: images are resized as above; ``mask_format`` ("bitmap", "rle", "probs" or "none", see
            :func:`~maskrcnn.modeling.postprocess.to_original_image`) says what the masks come back as.
            Returns per image ``boxes`` (D, 4) xyxy in original pixels, ``scores`` (D,), ``labels`` (D,)
            int64 and ``masks`` ((D, Hi, Wi) bool, or D COCO RLE dicts) or ``mask_probs`` (D, S, S).

    The forward is a sequence of named stages, each a method: :meth:`preprocess`, :meth:`extract_features`,
    :meth:`propose`, then ``roi_heads.losses`` (training); or :meth:`preprocess`, :meth:`infer` (backbone,
    FPN, ``rpn.propose``, ``roi_heads.detect``, ``roi_heads.mask_probs`` over the whole batch) and
    :meth:`postprocess` (inference).
    """

    def __init__(self, *, backbone: ResNet, fpn: FPN, rpn: RPN, roi_heads: RoIHeads, num_classes: int,
                 min_size: int, max_size: int, pixel_mean, pixel_std, size_divisible: int,
                 mask_threshold: float, paste_memory_mb: int, precision: str):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.min_size = min_size
        self.max_size = max_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.size_divisible = size_divisible
        self.mask_threshold = mask_threshold
        self.paste_memory_mb = paste_memory_mb
        self.precision = precision

    def forward(self, images: List[Tensor], targets: Optional[List[dict]] = None, *, mask_format: str = "bitmap"):
        check_images(images)
        if self.training:
            if targets is None or len(targets) != len(images):
                raise InputError("training needs one target dict per image")
            check_targets(images, targets, self.num_classes)
            targets = [{k: (v.to(images[i].device) if k in ("boxes", "labels", "crowd_boxes") else v)
                        for k, v in t.items()} for i, t in enumerate(targets)]
            batch = self.preprocess(images, resize=False)
            features = self.extract_features(batch)
            proposals, rpn_losses = self.propose(batch, features, targets)
            return {**rpn_losses, **self.roi_heads.losses(features, proposals, targets)}
        batch = self.preprocess(images, resize=True)
        sizes = torch.tensor(batch.image_sizes, dtype=torch.int64, device=batch.tensor.device)
        outputs = self.infer(batch.tensor, sizes)
        per_image = split_by_image(outputs[-1], len(images), *outputs[:-1])
        detections = [dict(zip(INFERENCE_OUTPUTS, values)) for values in zip(*per_image)]
        return self.postprocess(detections, batch, images, mask_format=mask_format)

    def infer(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Inference over a padded batch without loops over images or branches on data, the network that
        :mod:`maskrcnn.deploy.export` traces.

        images: (N, 3, Hp, Wp) normalised, resized and padded as :meth:`preprocess` makes them; image_sizes:
        (N, 2) int64 (h, w) of each image inside the padding.
        Returns ``boxes`` (D, 4) xyxy pixels of the resized input, ``scores`` (D,), ``labels`` (D,) int64 in
        1..K, ``mask_probs`` (D, S, S) float and ``image_index`` (D,) int64, grouped by ascending image and
        highest score first within an image.
        """
        features = self.fpn(self.backbone(images))
        rois = self.rpn.propose(features, image_sizes, images.shape[-2:])
        det = self.roi_heads.detect(features, rois, image_sizes)
        det_rois = torch.cat([det["image_index"][:, None].to(det["boxes"].dtype), det["boxes"]], dim=1)
        mask_probs = self.roi_heads.mask_probs(features, det_rois, det["labels"])
        return det["boxes"], det["scores"], det["labels"], mask_probs, det["image_index"]

    def extract_features(self, batch: ImageList) -> List[Tensor]:
        """Backbone and FPN: the padded batch -> pyramid levels P2..P6, each (N, C, Hi, Wi)."""
        return self.fpn(self.backbone(batch.tensor))

    def propose(self, batch: ImageList, features: List[Tensor], targets: Optional[List[dict]] = None):
        """RPN: per image proposals (Ri, 4) xyxy in resized pixels, and the RPN losses (training)."""
        return self.rpn(features, batch.image_sizes, tuple(batch.tensor.shape[-2:]), targets)

    def postprocess(self, detections: List[dict], batch: ImageList, images: List[Tensor], *,
                    mask_format: str = "bitmap") -> List[dict]:
        """Detections in resized pixels -> the original images' pixels, masks as ``mask_format`` asks."""
        return [
            to_original_image(det, resized, tuple(img.shape[-2:]), mask_format=mask_format,
                              mask_threshold=self.mask_threshold, memory_mb=self.paste_memory_mb)
            for det, resized, img in zip(detections, batch.image_sizes, images)
        ]

    def preprocess(self, images: List[Tensor], *, resize: bool) -> ImageList:
        """Normalise, optionally resize, and pad into one (N, 3, Hp, Wp) batch (:func:`preprocess_images`)."""
        return preprocess_images(images, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std,
                                 min_size=self.min_size if resize else None, max_size=self.max_size,
                                 size_divisible=self.size_divisible)


def preprocess_images(images: List[Tensor], *, pixel_mean: Tensor, pixel_std: Tensor, min_size: Optional[int],
                      max_size: int, size_divisible: int) -> ImageList:
    """Normalise, resize and pad N images into one batch.

    images: N (3, Hi, Wi) float 0-1 RGB; pixel_mean, pixel_std: (3, 1, 1) per-channel normalisation;
    min_size, max_size: resize as :func:`resize_image` (``min_size`` None keeps each image's size);
    size_divisible: the padded sides are multiples of this.
    Returns the (N, 3, Hp, Wp) zero-padded batch with each image's (h, w) after resizing.
    """
    out = []
    for image in images:
        image = (image - pixel_mean.to(image)) / pixel_std.to(image)
        if min_size is not None:
            image = resize_image(image, min_size, max_size)
        out.append(image)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in out]
    hp = int(math.ceil(max(s[0] for s in sizes) / size_divisible) * size_divisible)
    wp = int(math.ceil(max(s[1] for s in sizes) / size_divisible) * size_divisible)
    batch = out[0].new_zeros((len(out), 3, hp, wp))
    for i, image in enumerate(out):
        batch[i, :, : image.shape[1], : image.shape[2]].copy_(image)
    return ImageList(batch, sizes)


def prepare_for_inference(model: MaskRCNN) -> MaskRCNN:
    """A fast eval-mode copy of ``model`` for inference; ``model`` itself is left as it is.

    Every batch norm with fixed statistics (the trunk's, and the FPN's and heads' when they have one) is
    folded into the convolution before it (:func:`~maskrcnn.modeling.layers.fold_batchnorm`) and the
    weights are stored channels-last, the layout in which oneDNN (CPU) and cuDNN convolutions run without
    reordering their inputs. Outputs equal the model's to float rounding. The copy's state dict differs
    from the model's (no ``bn`` entries): save the original.
    """
    fast = fold_batchnorm_(copy.deepcopy(model).eval())
    return fast.to(memory_format=torch.channels_last)


def resize_image(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """(3, H, W) -> (3, h, w) bilinear (pixel centres aligned, no antialiasing), with scale = min(min_size /
    min(H, W), max_size / max(H, W)) and each side rounded down, as torchvision does (a 77 px side at
    ``min_size`` 320 becomes 319 px). The training resize (:class:`~maskrcnn.data.transforms.ResizeShortestEdge`,
    OpenCV on float32) gives the same pixels to float rounding of the sampling positions."""
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0]


def check_images(images) -> None:
    """ValueError naming the offending image unless every image is a non-empty (3, H, W) float tensor."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise InputError("images must be a non-empty list of (3, H, W) float tensors")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise InputError(f"image {i}: expected a torch.Tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise InputError(f"image {i}: expected shape (3, H, W), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise InputError(f"image {i}: expected a float tensor with values in 0-1, got dtype {image.dtype}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise InputError(f"image {i}: empty image of shape {tuple(image.shape)}")


def check_targets(images: List[Tensor], targets: List[dict], num_classes: int) -> None:
    """ValueError naming the image and field for malformed training targets."""
    for i, (image, target) in enumerate(zip(images, targets)):
        name = f"target of image {i}" + (f" (image id {target['image_id']})" if "image_id" in target else "")
        h, w = image.shape[-2:]
        for key in ("boxes", "labels", "masks"):
            if key not in target:
                raise InputError(f"{name}: missing '{key}'")
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise InputError(f"{name}: boxes must have shape (M, 4), got {tuple(boxes.shape)}")
        if len(labels) != len(boxes) or len(masks) != len(boxes):
            raise InputError(f"{name}: {len(boxes)} boxes, {len(labels)} labels and {len(masks)} masks differ")
        if len(boxes):
            bad = torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[:, 0]
            if len(bad):
                raise InputError(f"{name}: box {int(bad[0])} is degenerate (x2 <= x1 or y2 <= y1): "
                                 f"{boxes[bad[0]].tolist()}")
            tol = 1.0
            outside = torch.nonzero((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > w + tol)
                                    | (boxes[:, 3] > h + tol))[:, 0]
            if len(outside):
                raise InputError(f"{name}: box {int(outside[0])} {boxes[outside[0]].tolist()} lies outside the "
                                 f"{w}x{h} image")
            if int(labels.min()) < 1 or int(labels.max()) > num_classes:
                raise InputError(f"{name}: labels must be in 1..{num_classes}, got {labels.tolist()}")
        if not isinstance(masks, (BitMasks, PolygonMasks)):
            raise InputError(f"{name}: masks must be BitMasks or PolygonMasks, got {type(masks).__name__}")
        if tuple(masks.image_size) != (h, w):
            raise InputError(f"{name}: masks are {masks.image_size[1]}x{masks.image_size[0]} but the image is "
                             f"{w}x{h}")


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """The one place where configuration becomes constructor arguments."""
    b, a, r, h = cfg.backbone, cfg.anchors, cfg.rpn, cfg.roi_heads
    if cfg.precision not in PRECISIONS:
        raise InputError(f"model.precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if len(a.sizes) != 5:
        raise InputError(f"anchors.sizes needs one size per level P2..P6 (5 values), got {list(a.sizes)}")
    for key, norm in (("backbone.fpn_norm", b.fpn_norm), ("roi_heads.box_head_norm", h.box_head_norm),
                      ("roi_heads.mask_head_norm", h.mask_head_norm)):
        if norm not in HEAD_NORMS:
            raise InputError(f'{key}: norm must be "", "bn" or "gn", got {norm!r}')
    backbone = ResNet(depth=b.depth, norm=b.norm, freeze_at=b.freeze_at, width=b.width, pretrained=b.pretrained)
    fpn = FPN(in_channels=backbone.out_channels, out_channels=b.fpn_channels, norm=b.fpn_norm)
    anchor_generator = AnchorGenerator(sizes=a.sizes, aspect_ratios=a.aspect_ratios)
    rpn = RPN(
        anchor_generator=anchor_generator,
        head=RPNHead(in_channels=b.fpn_channels, num_anchors=anchor_generator.num_anchors_per_location,
                     num_convs=r.head_convs),
        box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
        matcher=Matcher(high_threshold=r.fg_iou_thresh, low_threshold=r.bg_iou_thresh, allow_low_quality_matches=True),
        pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
        post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test),
        nms_thresh=r.nms_thresh, min_size=r.min_size, score_thresh=r.score_thresh,
        batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
    )
    pooled_strides = FPN.strides[:4]
    roi_heads = RoIHeads(
        box_pooler=MultiLevelRoIAlign(output_size=h.box_pooler_resolution, strides=pooled_strides,
                                      sampling_ratio=h.sampling_ratio, canonical_scale=h.canonical_scale,
                                      canonical_level=h.canonical_level, fast=cfg.fast_roi_align),
        box_head=BoxHead(in_channels=b.fpn_channels, resolution=h.box_pooler_resolution, num_convs=h.box_head_convs,
                         conv_dim=h.box_head_conv_dim, norm=h.box_head_norm, num_fcs=h.box_head_fcs,
                         fc_dim=h.box_head_dim),
        box_predictor=BoxPredictor(in_features=h.box_head_dim, num_classes=h.num_classes),
        mask_pooler=MultiLevelRoIAlign(output_size=h.mask_pooler_resolution, strides=pooled_strides,
                                       sampling_ratio=h.sampling_ratio, canonical_scale=h.canonical_scale,
                                       canonical_level=h.canonical_level, fast=cfg.fast_roi_align),
        mask_head=MaskHead(in_channels=b.fpn_channels, conv_dim=h.mask_head_dim, num_convs=h.mask_head_convs,
                           num_classes=h.num_classes, norm=h.mask_head_norm, resolution=h.mask_pooler_resolution),
        box_coder=BoxCoder(h.bbox_reg_weights),
        matcher=Matcher(high_threshold=h.fg_iou_thresh, low_threshold=h.bg_iou_thresh,
                        allow_low_quality_matches=False),
        batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction,
        score_thresh=h.score_thresh, nms_thresh=h.nms_thresh, detections_per_img=h.detections_per_img,
        mask_rois_per_image=h.mask_rois_per_image, mask_outline_weight=h.mask_outline_weight,
        point_head=PointHead(in_channels=b.fpn_channels, num_classes=h.num_classes, fc_dim=h.point_head_dim,
                             num_fcs=h.point_head_fcs, stride=pooled_strides[0], num_points_train=h.point_train_points,
                             oversample_ratio=h.point_oversample_ratio, importance_ratio=h.point_importance_ratio,
                             subdivision_steps=h.point_subdivision_steps,
                             subdivision_points=h.point_subdivision_points) if h.mask_refine else None,
    )
    i = cfg.input
    inference_min_size = i.min_size[-1] if i.min_size_test is None else i.min_size_test
    inference_max_size = i.max_size if i.max_size_test is None else i.max_size_test
    return MaskRCNN(backbone=backbone, fpn=fpn, rpn=rpn, roi_heads=roi_heads, num_classes=h.num_classes,
                    min_size=inference_min_size, max_size=inference_max_size, pixel_mean=cfg.input.pixel_mean,
                    pixel_std=cfg.input.pixel_std, size_divisible=cfg.input.size_divisible,
                    mask_threshold=h.mask_threshold, paste_memory_mb=cfg.paste_memory_mb, precision=cfg.precision)
