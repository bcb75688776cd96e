"""One batch through an eval-mode model, packaged as :class:`~maskrcnn.structures.Instances`; and how a
model's labels correspond to a dataset's categories.

Shorthand: N detections of one image, K object classes of the model (labels 1..K).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from maskrcnn.modeling.maskrcnn import MaskRCNN
from maskrcnn.structures import Instances

PRECISIONS = ("fp32", "bf16")
MASK_FORMATS = ("bitmap", "rle", "none")


def check_options(precision: str, mask_format: str) -> None:
    """ValueError unless ``precision`` and ``mask_format`` are among the supported values."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")


@torch.inference_mode()
def detect(model: MaskRCNN, images: Sequence[Tensor], *, class_names: Sequence[str], mask_format: str = "bitmap",
           precision: str = "fp32", label_to_cat_id: Optional[Dict[int, int]] = None) -> List[Instances]:
    """Run an eval-mode model on a batch and package its output.

    model: a :class:`~maskrcnn.modeling.maskrcnn.MaskRCNN` in eval mode; its ``mask_threshold`` and
        ``paste_memory_mb`` drive the paste.
    images: ``(3, H, W)`` float RGB tensors in 0-1 on the model's device; sizes may differ.
    class_names: the name of each of the model's labels, ``class_names[label - 1]``.
    mask_format: "bitmap" pastes ``(N, H, W)`` bool masks; "rle" pastes each mask only over its box and
        encodes COCO RLE from those regions; "none" skips masks.
    precision: "fp32", or "bf16" for a bfloat16 autocast forward (outputs are float32 either way).
    label_to_cat_id: carried by each result for :meth:`Instances.to_coco`.
    Returns one :class:`Instances` per image, on the CPU.
    """
    check_options(precision, mask_format)
    if not images:
        return []
    if len(class_names) != model.num_classes:
        raise ValueError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
    device_type = images[0].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outputs = model(list(images), mask_format=mask_format)
    results = []
    for image, output in zip(images, outputs):
        masks = output.get("masks")
        if isinstance(masks, Tensor):
            masks = masks.cpu()
        labels = output["labels"].cpu()
        results.append(Instances(boxes=output["boxes"].float().cpu(), scores=output["scores"].float().cpu(),
                                 labels=labels, class_names=[class_names[label - 1] for label in labels.tolist()],
                                 masks=masks, image_size=(int(image.shape[1]), int(image.shape[2])),
                                 label_to_cat_id=label_to_cat_id))
    return results


def match_categories(class_names: Sequence[str], label_to_cat_id: Optional[Dict[int, int]],
                     categories: Sequence[dict]) -> Dict[int, int]:
    """Which dataset category each of a model's labels stands for.

    class_names: the model's class names, label 1..K in order.
    label_to_cat_id: the model's label -> category id map (a checkpoint's ``label_to_cat_id``), or None to
        match by name (case-insensitive).
    categories: the dataset's COCO categories (dicts with ``id`` and ``name``).
    Returns label -> dataset category id for every label whose category the dataset has; labels of other
    categories (COCO's 'N/A' slots, classes the dataset lacks) are absent.
    Raises ValueError naming both lists when the model and the dataset share no category.
    """
    if label_to_cat_id is not None:
        dataset_ids = {int(c["id"]) for c in categories}
        mapping = {int(label): int(cat_id) for label, cat_id in label_to_cat_id.items()
                   if int(cat_id) in dataset_ids and 1 <= int(label) <= len(class_names)}
    else:
        by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
        mapping = {label: by_name[name.lower()] for label, name in enumerate(class_names, start=1)
                   if name.lower() in by_name}
    if not mapping:
        how = "category ids" if label_to_cat_id is not None else "names"
        model_side = (sorted(set(int(v) for v in label_to_cat_id.values())) if label_to_cat_id is not None
                      else list(class_names))
        dataset_side = ([int(c["id"]) for c in categories] if label_to_cat_id is not None
                        else [c["name"] for c in categories])
        raise ValueError(f"the model and the dataset have no category in common (matched by {how}): model "
                         f"{_short(model_side)}, dataset {_short(dataset_side)}")
    return mapping


def _short(items: list, limit: int = 20) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
