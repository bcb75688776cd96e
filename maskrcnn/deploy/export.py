"""ONNX export of the network: a normalised, padded image batch -> detections with S x S mask probabilities.

Shorthand: N images;  Hp x Wp the padded batch;  K object classes;  D detections over the whole batch;
S the mask side (28, or the point head's refined side, see ``RoIHeads.mask_side``).

The graph is :meth:`MaskRCNN.infer <maskrcnn.modeling.maskrcnn.MaskRCNN.infer>` traced: the eager model's
own inference over a padded batch, which has no loop over images and no Python branch on data, so that the
graph holds for any batch size, any image size and any number of detections, zero included. Its NMS
(:func:`~maskrcnn.modeling.selection.grouped_nms`) exports as one ONNX NonMaxSuppression operator that keeps
images, levels and classes apart on the operator's batch and class axes, and its stable ranking as TopK.
Resizing to the original image and the mask paste are not in the graph: they run in Python
(:func:`~maskrcnn.modeling.postprocess.to_original_image`), the same code as the eager path.

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
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.onnx import register_custom_op_symbolic, symbolic_helper

from maskrcnn.errors import InputError
from maskrcnn.modeling.maskrcnn import INFERENCE_OUTPUTS, MaskRCNN, prepare_for_inference
from maskrcnn.modeling.selection import SKIP

INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = (*INFERENCE_OUTPUTS, "image_index")
METADATA_KEY = "maskrcnn"
OPSET = 17


@symbolic_helper.parse_args("v", "v", "f")
def _grouped_nms(g, boxes, scores, iou_threshold: float):
    """``maskrcnn::grouped_nms`` as ONNX NonMaxSuppression: the same (entry, class, box) rows. A runtime
    that needs another operator gets another symbolic here; the selection itself stays in the model."""
    max_per_class = g.op("Constant", value_t=torch.tensor([2**62], dtype=torch.int64))
    # The operator compares float32 IoUs with a float32 threshold, torchvision's nms with the float64 one:
    # the largest float32 not above it drops the same boxes (0.6 rounds up to 0.60000002, an IoU of 3/5).
    threshold = torch.tensor([iou_threshold], dtype=torch.float32)
    if threshold.item() > iou_threshold:
        threshold = torch.nextafter(threshold, torch.tensor(-math.inf))
    iou = g.op("Constant", value_t=threshold)
    skip = g.op("Constant", value_t=torch.tensor([SKIP], dtype=torch.float32))
    return g.op("NonMaxSuppression", boxes, scores, max_per_class, iou, skip)


def _descending_order(g, scores, group):
    """``maskrcnn::descending_order`` as ONNX TopK over all elements: each group's elements come by descending
    score in it too (equal values: lower index first)."""
    _, indices = g.op("TopK", scores, g.op("Shape", scores), axis_i=0, largest_i=1, sorted_i=1, outputs=2)
    return indices


register_custom_op_symbolic("maskrcnn::grouped_nms", _grouped_nms, OPSET)
register_custom_op_symbolic("maskrcnn::descending_order", _descending_order, OPSET)


class _Inference(nn.Module):
    """What the exporter traces: ``forward(images, image_sizes)`` is ``model.infer``. The model's submodules
    are called directly, so that the graph's node names start at them (``/backbone/...``, ``/fpn/...``)."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.model.infer(images, image_sizes)


def deploy_metadata(model: MaskRCNN, *, class_names: Sequence[str],
                    label_to_cat_id: Optional[Dict[int, int]] = None) -> dict:
    """What a runtime needs besides the graph: class names, input normalisation and resize, size
    divisibility, the thresholds baked into the graph, the mask threshold and the label -> category map."""
    if len(class_names) != model.num_classes:
        raise InputError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
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
        "mask_side": roi_heads.mask_side,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
    }


def exportable(model: MaskRCNN) -> MaskRCNN:
    """An eval-mode, BN-folded copy of ``model`` whose RoI poolers use torchvision's RoIAlign (an ONNX
    operator), in the contiguous layout the exporter expects."""
    model = copy.deepcopy(model).eval()
    for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
        pooler.fast = False
    return prepare_for_inference(model).to(memory_format=torch.contiguous_format)


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
    network = _Inference(exportable(model))
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
            raise InputError(f"{path}: no {METADATA_KEY!r} metadata; was it written by maskrcnn's quantize_int8?")
        return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    proto = onnx.load(str(path), load_external_data=False)
    entries = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in entries:
        raise InputError(f"{path}: no {METADATA_KEY!r} metadata; was it written by maskrcnn's export_onnx?")
    return json.loads(entries[METADATA_KEY])
