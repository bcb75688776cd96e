"""Image inputs of any kind as tensors; one batch through an eval-mode model, packaged as
:class:`~maskrcnn.structures.Instances`; and how a model's labels correspond to a dataset's categories.

Shorthand: N detections of one image, K object classes of the model (labels 1..K).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskrcnn.errors import InputError
from maskrcnn.fileio import decode_image, read_image, upright
from maskrcnn.modeling.maskrcnn import MaskRCNN
from maskrcnn.modeling.postprocess import MASK_FORMATS
from maskrcnn.precision import PRECISIONS, autocast
from maskrcnn.structures import Instances


def check_options(precision: str, mask_format: str) -> None:
    """ValueError unless ``precision`` and ``mask_format`` are among the supported values."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_mask_format(mask_format)


def inference_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:N" or a ``torch.device``) as a device this machine has; InputError for
    a name PyTorch does not know, for CUDA where no GPU is available, and for a GPU index beyond the count."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a device name ('cpu', 'cuda' or 'cuda:N'): {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r}: no CUDA GPU is available on this machine; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def check_mask_format(mask_format: str) -> None:
    """ValueError unless ``mask_format`` is one a predictor returns: any of ``MASK_FORMATS`` but "probs"."""
    if mask_format not in MASK_FORMATS:
        raise InputError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    if mask_format == "probs":
        raise InputError("mask_format 'probs' leaves each mask as its unpasted S x S probabilities, which "
                         "Instances do not hold: use 'bitmap', 'rle' or 'none'")


ImageInput = Union[str, Path, bytes, np.ndarray, Image.Image, Tensor]


def _array_to_tensor(array: np.ndarray, bgr: bool, name: str) -> Tensor:
    """``(H, W)``, ``(H, W, 1|3|4)`` uint8 array -> ``(3, H, W)`` float tensor in 0-1, RGB."""
    if array.dtype != np.uint8:
        raise InputError(f"{name}: expected a uint8 image array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"{name}: expected an H x W, H x W x 1, H x W x 3 or H x W x 4 array, "
                         f"got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]  # RGBA / BGRA: drop alpha
    if bgr:
        array = array[:, :, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return pixels.permute(2, 0, 1).div_(255)  # (H, W, 3) -> (3, H, W)


def _tensor_to_image(tensor: Tensor, name: str) -> Tensor:
    """``(H, W)`` or ``(1|3|4, H, W)`` uint8 or 0-1 float tensor -> ``(3, H, W)`` float tensor in 0-1."""
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3, 4):
        raise InputError(f"{name}: expected a 3 x H x W (or 1 x H x W, 4 x H x W, H x W) tensor, "
                         f"got shape {tuple(tensor.shape)}")
    tensor = tensor[:3].expand(3, -1, -1)  # grayscale (1, H, W) repeats, RGBA (4, H, W) drops alpha
    if tensor.dtype == torch.uint8:
        return tensor.float().div(255)
    if not tensor.is_floating_point():
        raise InputError(f"{name}: expected a uint8 or float image tensor, got dtype {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{name}: the image holds NaN or infinite values")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise InputError(f"{name}: float image tensors must hold values in 0-1, got range "
                         f"[{tensor.min().item():.3g}, {tensor.max().item():.3g}]")
    return tensor.float()


def to_image_tensor(image: ImageInput, *, bgr: bool = False, name: str = "input") -> Tensor:
    """Any supported image input -> ``(3, H, W)`` float32 RGB tensor with values in 0-1.

    Files, encoded bytes (the content of an image file) and PIL images are turned upright by their EXIF
    orientation (:mod:`maskrcnn.fileio`); arrays and tensors are taken as they are.
    bgr: NumPy arrays are in OpenCV's BGR(A) channel order (paths, bytes, PIL images and tensors ignore it).
    name: how error messages refer to this input (a path names itself).
    """
    if isinstance(image, (str, Path)):
        tensor = _array_to_tensor(read_image(image), False, str(image))
    elif isinstance(image, bytes):
        tensor = _array_to_tensor(decode_image(image, name), False, name)
    elif isinstance(image, Image.Image):
        tensor = _array_to_tensor(np.asarray(upright(image).convert("RGB")), False, name)
    elif isinstance(image, np.ndarray):
        tensor = _array_to_tensor(image, bgr, name)
    elif isinstance(image, Tensor):
        tensor = _tensor_to_image(image, name)
    else:
        raise InputError(f"{name}: unsupported image type {type(image).__name__}; expected a file path, "
                         "the bytes of an image file, a NumPy array, a PIL image or a torch tensor")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        where = str(image) if isinstance(image, (str, Path)) else name
        raise InputError(f"{where}: image is empty (size {tensor.shape[1]}x{tensor.shape[2]})")
    return tensor


def to_image_tensors(inputs: Union[ImageInput, Sequence[ImageInput]], *, bgr: bool) -> Tuple[bool, List[Tensor]]:
    """One image input or a list of them -> (whether a single input was given, the images as
    :func:`to_image_tensor` converts them, errors naming the list position)."""
    single = not isinstance(inputs, (list, tuple))
    items = [inputs] if single else list(inputs)
    names = ["input"] if single else [f"input {i} of the list" for i in range(len(items))]
    return single, [to_image_tensor(item, bgr=bgr, name=name) for item, name in zip(items, names)]


@torch.inference_mode()
def detect(model: MaskRCNN, images: Sequence[Tensor], *, class_names: Sequence[str], mask_format: str = "bitmap",
           precision: Optional[str] = None, label_to_cat_id: Optional[Dict[int, int]] = None) -> List[Instances]:
    """Run an eval-mode model on a batch and package its output.

    model: a :class:`~maskrcnn.modeling.maskrcnn.MaskRCNN` in eval mode; its ``mask_threshold`` and
        ``paste_memory_mb`` drive the paste.
    images: ``(3, H, W)`` float RGB tensors in 0-1 on the model's device; sizes may differ.
    class_names: the name of each of the model's labels, ``class_names[label - 1]``.
    mask_format: "bitmap" pastes ``(N, H, W)`` bool masks; "rle" pastes each mask only over its box and
        encodes COCO RLE from those regions; "none" skips masks.
    precision: "fp32", "bf16" for a bfloat16 autocast forward (outputs are float32 either way), or "auto":
        bf16 where the images' device computes it natively, else fp32 (:mod:`maskrcnn.precision`); None,
        the default, is the model's own ``precision`` (``model.precision`` of its configuration).
    label_to_cat_id: carried by each result for :meth:`Instances.to_coco`.
    Returns one :class:`Instances` per image, on the CPU.
    """
    precision = model.precision if precision is None else precision
    check_options(precision, mask_format)
    if not images:
        return []
    if len(class_names) != model.num_classes:
        raise InputError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
    with autocast(precision, images[0].device):
        outputs = model(list(images), mask_format=mask_format)
    return to_instances(outputs, [tuple(image.shape[-2:]) for image in images], class_names=class_names,
                        label_to_cat_id=label_to_cat_id)


def to_instances(outputs: Sequence[dict], image_sizes: Sequence[tuple], *, class_names: Sequence[str],
                 label_to_cat_id: Optional[Dict[int, int]] = None) -> List[Instances]:
    """Per-image model outputs (``boxes``, ``scores``, ``labels`` and optionally ``masks``, in original
    pixels, as :func:`~maskrcnn.modeling.postprocess.to_original_image` returns them) -> CPU
    :class:`Instances`. image_sizes: each image's original (H, W)."""
    results = []
    for size, output in zip(image_sizes, outputs):
        masks = output.get("masks")
        if isinstance(masks, Tensor):
            masks = masks.cpu()
        labels = output["labels"].cpu()
        results.append(Instances(boxes=output["boxes"].float().cpu(), scores=output["scores"].float().cpu(),
                                 labels=labels, class_names=[class_names[label - 1] for label in labels.tolist()],
                                 masks=masks, image_size=(int(size[0]), int(size[1])),
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

    With ``label_to_cat_id``, labels are matched by id where the names of the matched ids agree. Where an id
    is shared but its names differ (COCO weights, ids 1..90, on a dataset numbered 1..K), the ids mean other
    things: every label is matched by name instead, with a warning, if every dataset category's name is
    among the model's class names. Raises :class:`InputError` naming both sides when the names do not all
    match, or when the model and the dataset share no category.
    """
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
    name_mapping = {label: by_name[name.lower()] for label, name in enumerate(class_names, start=1)
                    if name.lower() in by_name}
    if label_to_cat_id is not None:
        names = {int(c["id"]): str(c["name"]) for c in categories}
        mapping = {int(label): int(cat_id) for label, cat_id in label_to_cat_id.items()
                   if int(cat_id) in names and 1 <= int(label) <= len(class_names)}
        clashes = [(label, cat_id) for label, cat_id in sorted(mapping.items())
                   if class_names[label - 1].lower() != names[cat_id].lower()]
        if clashes:
            model_side = [f"{cat_id} {class_names[label - 1]}" for label, cat_id in clashes]
            dataset_side = [f"{cat_id} {names[cat_id]}" for _, cat_id in clashes]
            missing = [c["name"] for c in categories if int(c["id"]) not in name_mapping.values()]
            if missing:
                raise InputError(f"the model's and the dataset's categories agree by id but not by name, and "
                                 f"the dataset's {_short(missing)} are not among the model's class names: model "
                                 f"{_short(model_side)}, dataset {_short(dataset_side)}")
            warnings.warn(f"the model's and the dataset's category ids name different things (model "
                          f"{_short(model_side)}, dataset {_short(dataset_side)}); matched by name")
            mapping = name_mapping
    else:
        mapping = name_mapping
    if not mapping:
        how = "category ids" if label_to_cat_id is not None else "names"
        model_side = (sorted(set(int(v) for v in label_to_cat_id.values())) if label_to_cat_id is not None
                      else list(class_names))
        dataset_side = ([int(c["id"]) for c in categories] if label_to_cat_id is not None
                        else [c["name"] for c in categories])
        raise InputError(f"the model and the dataset have no category in common (matched by {how}): model "
                         f"{_short(model_side)}, dataset {_short(dataset_side)}")
    return mapping



def drop_unmatched(results: Sequence[Instances], label_to_cat_id: Dict[int, int]) -> List[Instances]:
    """Each of ``results`` without the detections whose label has no category in ``label_to_cat_id`` (a
    :func:`match_categories` map): what a predictor given a dataset's categories returns."""
    return [r[torch.tensor([label in label_to_cat_id for label in r.labels.tolist()], dtype=torch.bool)]
            for r in results]


def _short(items: list, limit: int = 20) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
