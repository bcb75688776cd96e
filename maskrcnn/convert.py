"""torchvision Mask R-CNN state dicts -> maskrcnn state dicts and checkpoints.

torchvision's classifier and mask predictor carry a background slot (K+1 box-delta groups and K+1
mask channels); ours predict deltas and masks for the K object classes only, so slot 0 is dropped.
Both architectures are read: ``maskrcnn_resnet50_fpn`` (v1: one-convolution RPN head, two fully
connected box head layers ``fc6``/``fc7``, no normalisation outside the trunk), in its current key layout
(``rpn.head.conv.0.0``, ``inner_blocks.0.0``) and the pre-0.13 one (``rpn.head.conv``, ``inner_blocks.0``),
and ``maskrcnn_resnet50_fpn_v2`` (batch norm after the FPN convolutions ``inner_blocks.i.1``, a
two-convolution RPN head ``rpn.head.conv.1.0``, a box head of 3x3 convolutions with batch norm and one
fully connected layer ``box_head.0.0`` .. ``box_head.5``, batch norm in the mask head ``mask_head.i.1``).
:func:`config_for_torchvision_state` reads which one a state dict holds from its keys and shapes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .errors import InputError
from .config import Config, config_to_dict
from .fileio import atomic_write, read_checkpoint

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]

_BOX_CONV = r"^roi_heads\.box_head\.(\d+)\.0\.weight$"  # v2 box head: block i is conv (0), norm (1), ReLU
_BOX_LINEAR = r"^roi_heads\.box_head\.(\d+)\.weight$"  # v2 box head: a Linear at its index in the Sequential


def _rules(state: Dict[str, Tensor]) -> List[Rule]:
    """(pattern, replacement) pairs from torchvision's keys to ours; the first matching pattern wins.

    The v2 box head is one ``nn.Sequential`` (convolution blocks, Flatten, then Linear and ReLU in turn),
    so its fully connected layers are numbered fc1, fc2, ... in the order of their indices in ``state``.
    """
    linear = sorted(int(m.group(1)) for k, v in state.items() for m in [re.match(_BOX_LINEAR, k)] if m and v.dim() == 2)
    fc_number = {index: k for k, index in enumerate(linear, start=1)}
    return [
        (r"^backbone\.body\.(.*)$", r"backbone.\1"),
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"fpn.lateral_convs.\1.\2"),
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.1\.(.*)$", r"fpn.lateral_norms.\1.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"fpn.output_convs.\1.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.1\.(.*)$", r"fpn.output_norms.\1.\2"),
        (r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", r"rpn.head.conv.\1"),
        # v2: convolutions 1.. of the RPN head
        (r"^rpn\.head\.conv\.(\d+)\.0\.(weight|bias)$",
         lambda m: f"rpn.head.extra_convs.{int(m.group(1)) - 1}.{m.group(2)}"),
        (r"^rpn\.head\.cls_logits\.(weight|bias)$", r"rpn.head.objectness_logits.\1"),
        (r"^rpn\.head\.bbox_pred\.(weight|bias)$", r"rpn.head.anchor_deltas.\1"),
        (r"^roi_heads\.box_head\.fc6\.(weight|bias)$", r"roi_heads.box_head.fc1.\1"),
        (r"^roi_heads\.box_head\.fc7\.(weight|bias)$", r"roi_heads.box_head.fc2.\1"),
        (r"^roi_heads\.box_head\.(\d+)\.0\.(weight|bias)$", r"roi_heads.box_head.convs.\1.\2"),
        (r"^roi_heads\.box_head\.(\d+)\.1\.(.*)$", r"roi_heads.box_head.norms.\1.\2"),
        (r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$",
         lambda m: f"roi_heads.box_head.fc{fc_number[int(m.group(1))]}.{m.group(2)}"),
        (r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
        (r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
        (r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", r"roi_heads.mask_head.convs.\1.\2"),
        (r"^roi_heads\.mask_head\.(\d+)\.1\.(.*)$", r"roi_heads.mask_head.norms.\1.\2"),
        # pre-0.13 layout: mask_fcn1..4 are convs 0..3
        (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$",
         lambda m: f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.{m.group(2)}"),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$", r"roi_heads.mask_head.deconv.\1"),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$", r"roi_heads.mask_head.predictor.\1"),
    ]


def convert_torchvision_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Map a torchvision ``maskrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn_v2``-style state dict onto
    :class:`MaskRCNN` parameter names (batch norms' ``num_batches_tracked`` counters are dropped).

    Raises ValueError naming the first key that has no counterpart.
    """
    rules = _rules(state)
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in rules:
            if re.match(pattern, key):
                new_key = re.sub(pattern, repl, key)
                break
        else:
            raise InputError(f"unexpected key in torchvision state dict: {key!r}")
        if new_key.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]  # drop the background class's 4 deltas
        elif new_key.startswith("roi_heads.mask_head.predictor."):
            value = value[1:]  # drop the background mask channel
        out[new_key] = value
    return out


def _norm_kind(state: Dict[str, Tensor], prefix: str) -> str:
    """The normalisation whose parameters start with ``prefix``: "bn" (running statistics), "gn" (affine
    parameters only) or "" (none)."""
    if prefix + "running_mean" in state:
        return "bn"
    return "gn" if prefix + "weight" in state else ""


def _indices(state: Dict[str, Tensor], pattern: str) -> List[int]:
    """Sorted distinct values of the first group of ``pattern`` over the keys of ``state``."""
    return sorted({int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m})


def config_for_torchvision_state(state: Dict[str, Tensor]) -> Config:
    """A Config matching a torchvision Mask R-CNN state dict, v1 or v2, read from its keys and shapes:
    ResNet depth, width and trunk normalisation (``bn`` when the trunk's batch norms carry torchvision's
    ``num_batches_tracked`` counters, as in a ``BatchNorm2d`` trunk, else ``frozen_bn``), pyramid width
    and normalisation, RPN head depth, box head convolutions, normalisation and fully connected layers,
    mask head depth, width and normalisation, and the class count."""
    cfg = Config()
    b, h = cfg.model.backbone, cfg.model.roi_heads
    blocks = _indices(state, r"backbone\.body\.layer3\.(\d+)\.")
    bottleneck = any(k.startswith("backbone.body.layer1.0.conv3.") for k in state)
    depth = {(6, True): 50, (23, True): 101, (2, False): 18, (6, False): 34}.get((len(blocks), bottleneck))
    if depth is None:
        raise InputError(f"cannot tell the ResNet depth from layer3 with {len(blocks)} blocks")
    b.depth = depth
    b.width = state["backbone.body.conv1.weight"].shape[0]
    b.norm = "bn" if "backbone.body.bn1.num_batches_tracked" in state else "frozen_bn"
    lateral = state.get("backbone.fpn.inner_blocks.0.0.weight", state.get("backbone.fpn.inner_blocks.0.weight"))
    b.fpn_channels = lateral.shape[0]
    b.fpn_norm = _norm_kind(state, "backbone.fpn.inner_blocks.0.1.")
    cfg.model.rpn.head_convs = max(1, len(_indices(state, r"rpn\.head\.conv\.(\d+)\.0\.weight$")))
    box_convs = _indices(state, _BOX_CONV)
    h.box_head_convs = len(box_convs)
    if box_convs:
        h.box_head_conv_dim = state["roi_heads.box_head.0.0.weight"].shape[0]
        h.box_head_norm = _norm_kind(state, "roi_heads.box_head.0.1.")
        fcs = [state[f"roi_heads.box_head.{i}.weight"] for i in _indices(state, _BOX_LINEAR)
               if state[f"roi_heads.box_head.{i}.weight"].dim() == 2]
    else:
        fcs = [state[f"roi_heads.box_head.{name}.weight"] for name in ("fc6", "fc7")
               if f"roi_heads.box_head.{name}.weight" in state]
    if not fcs:
        raise InputError("the state dict has no fully connected box head layer (roi_heads.box_head)")
    h.box_head_fcs, h.box_head_dim = len(fcs), fcs[0].shape[0]
    mask_convs = _indices(state, r"roi_heads\.mask_head\.(\d+)\.0\.weight$")
    if mask_convs:
        h.mask_head_convs = len(mask_convs)
        h.mask_head_dim = state["roi_heads.mask_head.0.0.weight"].shape[0]
        h.mask_head_norm = _norm_kind(state, "roi_heads.mask_head.0.1.")
    h.num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    return cfg


def coco_category_names() -> List[str]:
    """Names of torchvision's 90 COCO label slots (1..90; 'N/A' marks ids unused by COCO)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])


def convert_torchvision_checkpoint(src: str | Path, dst: str | Path, class_names: Optional[List[str]] = None) -> Config:
    """Read a torchvision Mask R-CNN ``.pth`` (a state dict, or a dict holding one under ``model``) and write
    a maskrcnn checkpoint ``{"model", "config", "class_names", "iteration", "label_to_cat_id"}`` atomically.
    Returns the config."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    state = read_checkpoint(src)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    cfg = config_for_torchvision_state(state)
    k = cfg.model.roi_heads.num_classes
    if class_names is None:
        class_names = coco_category_names() if k == 90 else [f"class_{i}" for i in range(1, k + 1)]
    if len(class_names) != k:
        raise InputError(f"{src}: the model has {k} classes but {len(class_names)} class names were given")
    payload = {"model": convert_torchvision_state_dict(state), "config": config_to_dict(cfg),
               "class_names": class_names, "iteration": 0,
               # torchvision's COCO labels are the category ids themselves
               "label_to_cat_id": {i: i for i in range(1, k + 1)}}
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda f: torch.save(payload, f))
    return cfg
