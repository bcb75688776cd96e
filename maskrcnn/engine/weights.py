"""Start a training run from existing weights whose classes may differ from the dataset's.

Sources: a checkpoint of this package (training output, or ``tools/convert_torchvision.py`` output), or
a torchvision Mask R-CNN state dict (bare, or under ``model``), converted on the fly with
:func:`maskrcnn.convert.convert_torchvision_state_dict`.

The class-specific layers are rebuilt for the dataset's K classes; their rows, in our layout:

- ``roi_heads.box_predictor.cls_score``: ``(K + 1, D)`` logits, row 0 background, row k class k;
- ``roi_heads.box_predictor.bbox_pred``: ``(4K, D)`` deltas, rows ``4(k-1) .. 4k-1`` for class k;
- ``roi_heads.mask_head.predictor``: ``(K, C, 1, 1)`` mask logits, channel ``k-1`` for class k.

(torchvision's layers carry a background slot in all three; the conversion drops it from the last two.)
The background row and the rows of every dataset class whose name matches a source class name
(case-insensitive, surrounding spaces ignored) are copied; the rows of other classes keep the fresh
model's initialisation. Every other tensor must exist in the source with the model's shape and is
copied exactly; BatchNorm's ``num_batches_tracked`` counters are the only exception (kept as built).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ..convert import coco_category_names, convert_torchvision_state_dict
from ..errors import InputError
from ..fileio import read_checkpoint

# parameter name -> (rows per class, leading rows of no class): the first dimension holds those leading
# rows (the background logit) and then K blocks of rows, one per class
CLASS_SPECIFIC = {
    "roi_heads.box_predictor.cls_score.weight": (1, 1),
    "roi_heads.box_predictor.cls_score.bias": (1, 1),
    "roi_heads.box_predictor.bbox_pred.weight": (4, 0),
    "roi_heads.box_predictor.bbox_pred.bias": (4, 0),
    "roi_heads.mask_head.predictor.weight": (1, 0),
    "roi_heads.mask_head.predictor.bias": (1, 0),
    "roi_heads.point_head.predictor.weight": (1, 0),
    "roi_heads.point_head.predictor.bias": (1, 0),
}
# Optional heads (model.roi_heads.mask_refine): weights without one leave it as initialised, and a model without
# one leaves the source's aside, so that plain and refined models start from each other's weights.
OPTIONAL_HEADS = ("roi_heads.point_head.",)


def _optional(key: str) -> bool:
    return key.startswith(OPTIONAL_HEADS)


def read_weights(path: str | Path) -> Tuple[Dict[str, Tensor], List[str], str]:
    """``(state dict in our names, class names of labels 1..K, source kind)`` of a weights file.

    Kinds: ``"maskrcnn checkpoint"`` (has ``class_names``) or ``"torchvision state dict"`` (keys
    ``backbone.body.*``; class names COCO's for 90 classes, else ``class_1`` ...). Raises
    FileNotFoundError / InputError naming the file.
    """
    loaded = read_checkpoint(path)
    if not isinstance(loaded, dict):
        raise InputError(f"model.weights: {path} holds a {type(loaded).__name__}, not a state dict")
    state = loaded["model"] if isinstance(loaded.get("model"), dict) else loaded
    if any(key.startswith("backbone.body.") for key in state):
        state = convert_torchvision_state_dict(state)
        k = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
        names = coco_category_names() if k == 90 else [f"class_{i}" for i in range(1, k + 1)]
        return state, names, "torchvision state dict"
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise InputError(f"model.weights: {path} is neither a maskrcnn checkpoint nor a torchvision Mask R-CNN "
                         "state dict (no roi_heads.box_predictor.cls_score.weight)")
    k = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    names = loaded.get("class_names") or [f"class_{i}" for i in range(1, k + 1)]
    if len(names) != k:
        raise InputError(f"model.weights: {path} lists {len(names)} class names for a {k}-class predictor")
    return state, list(names), "maskrcnn checkpoint"


def load_weights(model: nn.Module, path: str | Path, class_names: Sequence[str]) -> Dict:
    """Initialise ``model`` (built for ``class_names``, labels 1..K) from the weights file ``path``.

    Returns a summary: ``source``, ``kind``, ``tensors_loaded`` (copied whole), ``classes_copied``
    (dataset class -> source class, for name matches), ``classes_fresh`` (dataset classes left as
    initialised), ``layers_rebuilt`` (class-specific tensors whose rows were copied by name; empty when
    the class lists agree). Raises InputError naming every missing, unexpected or mis-shaped key outside
    the class-specific layers.
    """
    source, source_names, kind = read_weights(path)
    target = model.state_dict()
    missing = [k for k in target if k not in source and k not in CLASS_SPECIFIC and not _optional(k)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in target and not _optional(k) and not k.endswith("num_batches_tracked")]
    misshaped = [f"{k} {tuple(source[k].shape)} (model {tuple(target[k].shape)})" for k in target
                 if k in source and k not in CLASS_SPECIFIC and source[k].shape != target[k].shape]
    for key in CLASS_SPECIFIC:
        if key not in target or (_optional(key) and key not in source):
            continue
        if key not in source:
            missing.append(key)
        elif source[key].shape[1:] != target[key].shape[1:]:
            misshaped.append(f"{key} {tuple(source[key].shape)} (model {tuple(target[key].shape)})")
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if keys]
    if problems:
        raise InputError(f"model.weights: {path} does not fit the configured model outside the class-specific "
                         f"layers (check model.backbone.depth and width and the head settings: torchvision's v2 "
                         f"weights need those of configs/maskrcnn_R50_FPN_v2.yaml); " + "; ".join(problems))

    by_name = {}
    for index, name in enumerate(source_names, start=1):
        by_name.setdefault(_key(name), index)
    matches = {label: by_name[_key(name)] for label, name in enumerate(class_names, start=1)
               if _key(name) in by_name}
    same_classes = [_key(n) for n in class_names] == [_key(n) for n in source_names]
    state = {}
    for key, value in target.items():
        if key not in source:
            state[key] = value
        elif key not in CLASS_SPECIFIC or same_classes:
            state[key] = source[key]
        else:
            state[key] = _copy_rows(value.clone(), source[key], matches, *CLASS_SPECIFIC[key])
    model.load_state_dict(state)
    return {
        "source": str(path), "kind": kind,
        "tensors_loaded": sum(1 for k in target if k in source and (k not in CLASS_SPECIFIC or same_classes)),
        "classes_copied": {class_names[label - 1]: source_names[index - 1] for label, index in matches.items()},
        "classes_fresh": [name for label, name in enumerate(class_names, start=1) if label not in matches],
        "layers_rebuilt": [] if same_classes else [k for k in CLASS_SPECIFIC if k in target and k in source],
    }


def format_summary(summary: Dict) -> str:
    """A few lines telling what :func:`load_weights` loaded."""
    copied = ", ".join(f"{new} <- {old}" if new != old else new for new, old in summary["classes_copied"].items())
    lines = [f"weights from {summary['source']} ({summary['kind']}): {summary['tensors_loaded']} tensors loaded"]
    if summary["layers_rebuilt"]:
        lines.append(f"class-specific layers rebuilt for the dataset's classes: "
                     f"{', '.join(sorted({k.rsplit('.', 1)[0] for k in summary['layers_rebuilt']}))}")
        lines.append(f"rows copied by class name: {copied or 'none'}")
        lines.append(f"initialised afresh: {', '.join(summary['classes_fresh']) or 'none'}")
    return "\n".join(lines)


def _key(name: str) -> str:
    return name.strip().casefold()


def _copy_rows(fresh: Tensor, source: Tensor, matches: Dict[int, int], rows: int, offset: int) -> Tensor:
    """``fresh`` with its leading ``offset`` rows and the ``rows``-row block of each matched class
    (dataset label -> source label) taken from ``source``."""
    fresh[:offset] = source[:offset]
    for label, index in matches.items():
        start, source_start = offset + (label - 1) * rows, offset + (index - 1) * rows
        fresh[start:start + rows] = source[source_start:source_start + rows]
    return fresh
