"""ONNX export of the network: a normalised, padded image batch -> detections with S x S mask probabilities.

Shorthand:
    N   images;  Hp x Wp the padded batch;  L = 5 pyramid levels;  A anchors per location
    P   proposals over the whole batch;  K object classes;  D detections over the whole batch
    S   mask side (28)

The exported graph has no loop over images and no Python branch on data: every per-image step of
inference (proposal top-k and NMS, detection NMS and top-k) runs over the whole batch at once, each
image's candidates kept apart in one NMS (proposals by image and level; detections by class in the NMS
operator's batch axis, by image within a class), with a per-image rank (a cumulative count over the
image's candidates, highest score first) replacing the per-image ``[:k]``. It therefore holds for any batch size, any image size and any number of detections,
zero included. Resizing to the original image and the mask paste are not in the graph: they run in
Python (:func:`~maskrcnn.modeling.postprocess.to_original_image`), the same code as the eager path.

Graph inputs: ``images`` (N, 3, Hp, Wp) float32, normalised (``(x - mean) / std`` of 0-1 RGB), resized
and zero-padded as :func:`~maskrcnn.modeling.maskrcnn.preprocess_images` does, Hp and Wp multiples of the
size divisibility; ``image_sizes`` (N, 2) int64, each image's (h, w) inside the padding.
Graph outputs: ``boxes`` (D, 4) float32 xyxy in pixels of the resized image, ``scores`` (D,) float32,
``labels`` (D,) int64 in 1..K, ``mask_probs`` (D, S, S) float32 and ``image_index`` (D,) int64,
grouped by image (ascending) and highest score first within an image.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from maskrcnn.modeling.maskrcnn import MaskRCNN, prepare_for_inference

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels", "mask_probs", "image_index")
METADATA_KEY = "maskrcnn"
OPSET = 17


class ExportableMaskRCNN(nn.Module):
    """The inference network of a :class:`MaskRCNN` over a padded batch, without loops over images.

    model: an eval-mode :class:`MaskRCNN`; its submodules are shared, not copied. Its RoI poolers should use
        torchvision's RoIAlign (``fast=False``), which ONNX has as an operator.

    forward(images, image_sizes) -> (boxes, scores, labels, mask_probs, image_index), see the module
    docstring. Its detections equal those of ``model`` (its ``propose``, ``detect_boxes`` and
    ``predict_masks``) up to float rounding and the order of equal scores.
    """

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        features = self.model.fpn(self.model.backbone(images))
        rois = self.propose(images, features, image_sizes)
        boxes, scores, labels, image_index = self.detect(features, rois, image_sizes)
        roi_heads = self.model.roi_heads
        mask_rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
        logits = roi_heads.mask_head.class_logits(roi_heads.mask_pooler.pool(features, mask_rois), labels)
        return boxes, scores, labels, logits.float().sigmoid(), image_index

    def propose(self, images: Tensor, features: List[Tensor], image_sizes: Tensor) -> Tensor:
        """RPN over the batch -> (P, 5) proposals: image index, then x1, y1, x2, y2 in resized pixels.

        As :meth:`maskrcnn.modeling.rpn.RPN.select_proposals`: per image and level the ``pre_nms_topk``
        best anchors, decoded, clipped, small and low-scoring ones dropped, NMS per (image, level), the
        ``post_nms_topk`` best per image.
        """
        rpn = self.model.rpn
        n = images.shape[0]
        logits, deltas = rpn.head(features)
        feature_shapes = [f.shape[-2:] for f in features]
        anchors = rpn.anchor_generator(feature_shapes, images.shape[-2:], images.device)
        index, levels, offset = [], [], 0
        for level, (x, level_anchors) in enumerate(zip(logits, anchors)):
            flat = x.permute(0, 2, 3, 1).reshape(n, -1)  # (N, A, Hi, Wi) -> (N, Hi*Wi*A)
            top = flat.topk(_at_most(flat, rpn.pre_nms_topk[1]), dim=1).indices
            index.append(top + offset)
            levels.append(torch.full_like(top[0], level))
            offset = offset + level_anchors.shape[0]
        index, levels = torch.cat(index, dim=1), torch.cat(levels)  # (N, k) over the levels
        # (N, A, Hi, Wi) -> (N, Hi*Wi*A) and (N, 4A, Hi, Wi) -> (N, Hi*Wi*A, 4), concatenated over levels
        pred_logits = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits], dim=1)
        pred_deltas = torch.cat([x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
                                 for x in deltas], dim=1)
        batch = torch.arange(n, device=images.device)[:, None]
        scores = torch.sigmoid(pred_logits[batch, index].float())  # (N, k)
        boxes = rpn.box_coder.decode(pred_deltas[batch, index].reshape(-1, 4).float(),
                                     torch.cat(anchors)[index].reshape(-1, 4)).view(n, -1, 4)
        boxes = _clip(boxes, image_sizes[:, None, :])
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= rpn.min_size) & (heights >= rpn.min_size) & (scores >= rpn.score_thresh)
        image, slot = torch.nonzero(valid).unbind(1)
        boxes, scores = boxes[image, slot], scores[image, slot]
        keep, _ = _grouped_nms(boxes[:, None], scores[:, None], image * len(anchors) + levels[slot],
                               rpn.nms_thresh)
        keep = keep[_rank_within_image(image[keep], n) < rpn.post_nms_topk[1]]
        return torch.cat([image[keep, None].to(boxes.dtype), boxes[keep]], dim=1)

    def detect(self, features: List[Tensor], rois: Tensor,
               image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Box head over all proposals -> detections (boxes, scores, labels, image index), grouped by image.

        As :func:`maskrcnn.modeling.postprocess.select_detections`: every (proposal, class) above
        ``score_thresh``, clipped, boxes under 0.01 px dropped, NMS per (image, class), the
        ``detections_per_img`` best per image.
        """
        roi_heads = self.model.roi_heads
        x = roi_heads.box_head(roi_heads.box_pooler.pool(features, rois))
        pred_class_logits, pred_deltas = roi_heads.box_predictor(x)
        probs = F.softmax(pred_class_logits.float(), dim=-1)[:, 1:]  # (P, K), background dropped
        image = rois[:, 0].to(torch.int64)
        boxes = _clip(roi_heads.box_coder.decode(pred_deltas.float(), rois[:, 1:]),
                      image_sizes[image][:, None, :])  # (P, K, 4)
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (probs > roi_heads.score_thresh) & (widths >= 1e-2) & (heights >= 1e-2)
        roi, cls = _grouped_nms(boxes, torch.where(valid, probs, -1.0), image, roi_heads.nms_thresh)
        boxes, scores, image = boxes[roi, cls], probs[roi, cls], image[roi]
        n = image_sizes.shape[0]
        keep = torch.nonzero(_rank_within_image(image, n) < roi_heads.detections_per_img)[:, 0]
        # NMS returns the survivors highest score first; a stable grouping by image keeps that order.
        position = torch.arange(keep.shape[0], device=keep.device)
        keep = keep[torch.argsort(image[keep] * keep.shape[0] + position)]
        return boxes[keep], scores[keep], cls[keep] + 1, image[keep]


class _ClassNMS(torch.autograd.Function):
    """NMS of each class apart: ONNX NonMaxSuppression with the classes as its batch axis, computed in
    eager mode by torchvision's ``nms`` class by class (the same survivors, in the operator's order).

    boxes: (K, P, 4) each class's boxes of the P proposals; scores: (K, 1, P), those below ``SKIP`` taking
    no part. Returns (M, 3) int64 rows (class, 0, proposal), by class, highest score first within a class.
    """

    SKIP = -0.5

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        rows = []
        for k in range(boxes.shape[0]):
            candidates = torch.nonzero(scores[k, 0] > _ClassNMS.SKIP)[:, 0]
            kept = candidates[nms(boxes[k, candidates], scores[k, 0, candidates], iou_threshold)]
            rows.append(torch.stack([torch.full_like(kept, k), torch.zeros_like(kept), kept], dim=1))
        return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):
        max_per_class = g.op("Constant", value_t=torch.tensor([2**62], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        skip = g.op("Constant", value_t=torch.tensor([_ClassNMS.SKIP], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_per_class, iou, skip)


def _grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tuple[Tensor, Tensor]:
    """NMS within each (group, class) over C candidates of K classes, as one NonMaxSuppression whose batch
    axis is the class.

    boxes: (C, K, 4) xyxy pixels, clipped (non-negative); scores: (C, K), -1 for the candidates that take
    no part, else >= 0; groups: (C,) int64 (image, or image and level).
    Within a class, the boxes of different groups are shifted apart (group index times one more than the
    largest coordinate), out of each other's reach. Written out here rather than through torchvision's
    ``batched_nms``, which exports both of its routes under an ``If`` that graph tools such as NNCF's
    quantiser cannot walk through. A sentinel candidate (outside every clipped box, group 0, score 0, kept by
    every class and dropped again) keeps the operator from ever seeing zero boxes, over which OpenVINO
    (2026.4) answers with a stale index.
    Returns (candidate, class) index tensors (D,) of the survivors, highest score first.
    """
    num_classes = boxes.shape[1]
    sentinel = boxes.new_tensor([-2.0, -2.0, -1.0, -1.0]).expand(1, num_classes, 4)
    boxes = torch.cat([boxes, sentinel])  # (C + 1, K, 4)
    scores = torch.cat([scores, scores.new_zeros((1, num_classes))])
    offsets = torch.cat([groups, groups.new_zeros(1)]).to(boxes.dtype) * (boxes.max() + 1)
    shifted = (boxes + offsets[:, None, None]).transpose(0, 1)  # (K, C + 1, 4)
    selected = _ClassNMS.apply(shifted, scores.t()[:, None, :], iou_threshold)
    cls, index = selected[:, 0], selected[:, 2]
    real = index < boxes.shape[0] - 1
    cls, index = cls[real], index[real]
    order = torch.argsort(scores[index, cls], descending=True)
    return index[order], cls[order]


def _at_most(x: Tensor, k: int) -> Union[int, Tensor]:
    """min(k, x.shape[1]), kept as a graph value while tracing so that it follows the input's size."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(x)[1], max=k)
    return min(k, x.shape[1])


def _clip(boxes: Tensor, sizes: Tensor) -> Tensor:
    """boxes (..., 4) xyxy clipped to [0, w] x [0, h]; sizes (..., 2) int64 (h, w), broadcast against boxes."""
    h = sizes[..., 0:1].to(boxes.dtype)
    w = sizes[..., 1:2].to(boxes.dtype)
    x = torch.min(boxes[..., 0::2].clamp(min=0), w)
    y = torch.min(boxes[..., 1::2].clamp(min=0), h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def _rank_within_image(image: Tensor, num_images: Union[int, Tensor]) -> Tensor:
    """image: (C,) int64 image of each candidate, candidates in descending score -> (C,) each candidate's
    0-based rank among its image's candidates."""
    one_hot = (image[:, None] == torch.arange(num_images, device=image.device)[None]).to(torch.int64)  # (C, N)
    return (one_hot.cumsum(0) * one_hot).sum(1) - 1


def deploy_metadata(model: MaskRCNN, *, class_names: Sequence[str],
                    label_to_cat_id: Optional[Dict[int, int]] = None) -> dict:
    """What a runtime needs besides the graph: class names, input normalisation and resize, size
    divisibility, the thresholds baked into the graph, the mask threshold and the label -> category map."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
    roi_heads, rpn = model.roi_heads, model.rpn
    return {
        "class_names": list(class_names),
        "label_to_cat_id": None if label_to_cat_id is None else {str(k): int(v) for k, v in label_to_cat_id.items()},
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "min_size": model.min_size,
        "max_size": model.max_size,
        "size_divisible": model.size_divisible,
        "mask_threshold": model.mask_threshold,
        "paste_memory_mb": model.paste_memory_mb,
        "score_thresh": roi_heads.score_thresh,
        "nms_thresh": roi_heads.nms_thresh,
        "detections_per_img": roi_heads.detections_per_img,
        "rpn_pre_nms_topk": rpn.pre_nms_topk[1],
        "rpn_post_nms_topk": rpn.post_nms_topk[1],
        "rpn_nms_thresh": rpn.nms_thresh,
        "mask_side": 2 * roi_heads.mask_pooler.output_size,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
    }


def exportable(model: MaskRCNN) -> ExportableMaskRCNN:
    """An eval-mode, BN-folded copy of ``model`` with torchvision RoIAlign, wrapped for export."""
    model = copy.deepcopy(model).eval()
    for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
        pooler.fast = False
    return ExportableMaskRCNN(prepare_for_inference(model).to(memory_format=torch.contiguous_format))


def export_onnx(model: MaskRCNN, path: Union[str, Path], *, class_names: Sequence[str],
                label_to_cat_id: Optional[Dict[int, int]] = None, example_size: Tuple[int, int] = (320, 480)) -> Path:
    """Export ``model``'s inference network to an ONNX file, checked by ``onnx.checker``, with
    :func:`deploy_metadata` stored as JSON under the metadata key ``"maskrcnn"``. Written atomically.

    The TorchScript-based exporter traces the graph on a two-image example batch of ``example_size``
    (h, w) (random images); batch size, height and width are dynamic axes.
    Returns the path written.
    """
    import onnx

    path = Path(path)
    metadata = deploy_metadata(model, class_names=class_names, label_to_cat_id=label_to_cat_id)
    network = exportable(model)
    h, w = example_size
    stride = model.size_divisible
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, hp, wp)
    images[0, :, :h, :w] = torch.randn(3, h, w, generator=g)
    images[1, :, : h // 2, : w - 16] = torch.randn(3, h // 2, w - 16, generator=g)
    sizes = torch.tensor([[h, w], [h // 2, w - 16]])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                network, (images, sizes), tmp, dynamo=False, opset_version=OPSET,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_axes={"images": {0: "N", 2: "Hp", 3: "Wp"}, "image_sizes": {0: "N"},
                              "boxes": {0: "D"}, "scores": {0: "D"}, "labels": {0: "D"},
                              "mask_probs": {0: "D"}, "image_index": {0: "D"}},
            )
        proto = onnx.load(tmp)
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: Union[str, Path]) -> dict:
    """The :func:`deploy_metadata` stored in an exported ONNX file, or in the OpenVINO IR (``.xml``) that
    :func:`~maskrcnn.deploy.quantize.quantize_int8` writes; ValueError if it has none."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".xml":
        import openvino

        model = openvino.Core().read_model(str(path))
        if not model.has_rt_info([METADATA_KEY]):
            raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; was it written by maskrcnn's quantize_int8?")
        return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    proto = onnx.load(str(path), load_external_data=False)
    entries = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in entries:
        raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; was it written by maskrcnn's export_onnx?")
    return json.loads(entries[METADATA_KEY])
