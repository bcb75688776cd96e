"""torchvision Mask R-CNN state dicts -> maskrcnn state dicts and checkpoints.

torchvision's classifier and mask predictor carry a background slot (K+1 box-delta groups and K+1
mask channels); ours predict deltas and masks for the K object classes only, so slot 0 is dropped.
Both the current layout (``rpn.head.conv.0.0``, ``inner_blocks.0.0``) and the pre-0.13 one
(``rpn.head.conv``, ``inner_blocks.0``) are read. The v2 model (``maskrcnn_resnet50_fpn_v2``, with
normalisation layers in the FPN and heads) has a different architecture and is rejected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .config import Config, config_to_dict
from .fileio import atomic_write

_RULES = [
    (r"^backbone\.body\.(.*)$", r"backbone.\1"),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"fpn.lateral_convs.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"fpn.output_convs.\1.\2"),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?(weight|bias)$", r"rpn.head.conv.\1"),
    (r"^rpn\.head\.cls_logits\.(weight|bias)$", r"rpn.head.objectness_logits.\1"),
    (r"^rpn\.head\.bbox_pred\.(weight|bias)$", r"rpn.head.anchor_deltas.\1"),
    (r"^roi_heads\.box_head\.fc6\.(weight|bias)$", r"roi_heads.box_head.fc1.\1"),
    (r"^roi_heads\.box_head\.fc7\.(weight|bias)$", r"roi_heads.box_head.fc2.\1"),
    (r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", r"roi_heads.mask_head.convs.\1.\2"),
    # pre-0.13 layout: mask_fcn1..4 are convs 0..3
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$",
     lambda m: f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.{m.group(2)}"),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$", r"roi_heads.mask_head.deconv.\1"),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$", r"roi_heads.mask_head.predictor.\1"),
]


def convert_torchvision_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Map a torchvision ``maskrcnn_resnet50_fpn``-style state dict onto :class:`MaskRCNN` parameter names.

    Raises ValueError naming the first key that has no counterpart.
    """
    if any(".fpn.inner_blocks.0.1." in k or "box_head.0.0" in k for k in state):
        raise ValueError("this is a maskrcnn_resnet50_fpn_v2 state dict (normalised FPN and 4-conv box head); "
                         "only the v1 architecture is supported")
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _RULES:
            if re.match(pattern, key):
                new_key = re.sub(pattern, repl, key)
                break
        else:
            raise ValueError(f"unexpected key in torchvision state dict: {key!r}")
        if new_key.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]  # drop the background class's 4 deltas
        elif new_key.startswith("roi_heads.mask_head.predictor."):
            value = value[1:]  # drop the background mask channel
        out[new_key] = value
    return out


def config_for_torchvision_state(state: Dict[str, Tensor]) -> Config:
    """A Config matching a torchvision Mask R-CNN state dict: ResNet depth and class count read from it."""
    cfg = Config()
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"backbone\.body\.layer3\.(\d+)\.", k)] if m}
    bottleneck = any(k.startswith("backbone.body.layer1.0.conv3.") for k in state)
    depth = {(6, True): 50, (23, True): 101, (2, False): 18, (6, False): 34}.get((len(blocks), bottleneck))
    if depth is None:
        raise ValueError(f"cannot tell the ResNet depth from layer3 with {len(blocks)} blocks")
    cfg.model.backbone.depth = depth
    cfg.model.roi_heads.num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
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
    state = torch.load(src, map_location="cpu", weights_only=True)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    cfg = config_for_torchvision_state(state)
    k = cfg.model.roi_heads.num_classes
    if class_names is None:
        class_names = coco_category_names() if k == 90 else [f"class_{i}" for i in range(1, k + 1)]
    if len(class_names) != k:
        raise ValueError(f"{src}: the model has {k} classes but {len(class_names)} class names were given")
    payload = {"model": convert_torchvision_state_dict(state), "config": config_to_dict(cfg),
               "class_names": class_names, "iteration": 0,
               # torchvision's COCO labels are the category ids themselves
               "label_to_cat_id": {i: i for i in range(1, k + 1)}}
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda f: torch.save(payload, f))
    return cfg
