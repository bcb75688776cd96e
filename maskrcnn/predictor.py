"""The public inference API: images in, per-image detections out.

    predictor = Predictor.from_checkpoint("output/train/model_final.pth", device="cuda")
    result = predictor("street.jpg")             # one Instances
    results = predictor([array, pil_image])      # a list of Instances, run as one batch
    result.filter(0.5).to_coco(image_id=42)      # COCO result dicts

Shorthand: N detections of one image, H x W the original image size, K object classes (labels 1..K).

An input image is a file path, a NumPy ``H x W x 3`` uint8 array (RGB, or BGR with ``bgr=True``), a PIL
image, or a ``3 x H x W`` tensor (float in 0-1, or uint8). Grayscale and RGBA inputs are converted to
RGB. The model resizes internally; every output refers to the pixels of the image as given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskrcnn.config import Config, config_from_dict
from maskrcnn.evaluation.rle import encode_mask_regions, encode_masks
from maskrcnn.modeling.maskrcnn import MaskRCNN, build_model, prepare_for_inference
from maskrcnn.modeling.paste import paste_mask_regions, paste_masks_in_image

PRECISIONS = ("fp32", "bf16")
MASK_FORMATS = ("bitmap", "rle", "none")

ImageInput = Union[str, Path, np.ndarray, Image.Image, Tensor]


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array.

    Grayscale, 16-bit and RGBA files are converted to 8-bit RGB (alpha dropped). EXIF orientation is
    ignored: the pixels are returned as stored, the grid COCO annotations refer to.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that does not decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"cannot decode image file {path}: not an image format OpenCV reads")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _array_to_tensor(array: np.ndarray, bgr: bool, name: str) -> Tensor:
    """``(H, W)``, ``(H, W, 1|3|4)`` uint8 array -> ``(3, H, W)`` float tensor in 0-1, RGB."""
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 image array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an H x W, H x W x 1, H x W x 3 or H x W x 4 array, "
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
        raise ValueError(f"{name}: expected a 3 x H x W (or 1 x H x W, 4 x H x W, H x W) tensor, "
                         f"got shape {tuple(tensor.shape)}")
    tensor = tensor[:3].expand(3, -1, -1)  # grayscale (1, H, W) repeats, RGBA (4, H, W) drops alpha
    if tensor.dtype == torch.uint8:
        return tensor.float().div(255)
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a uint8 or float image tensor, got dtype {tensor.dtype}")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(f"{name}: float image tensors must hold values in 0-1, got range "
                         f"[{tensor.min().item():.3g}, {tensor.max().item():.3g}]")
    return tensor.float()


def to_image_tensor(image: ImageInput, *, bgr: bool = False, name: str = "input") -> Tensor:
    """Any supported image input -> ``(3, H, W)`` float32 RGB tensor with values in 0-1.

    bgr: NumPy arrays are in OpenCV's BGR(A) channel order (paths, PIL images and tensors ignore it).
    name: how error messages refer to this input (a path names itself).
    """
    if isinstance(image, (str, Path)):
        tensor = _array_to_tensor(read_image(image), False, str(image))
    elif isinstance(image, Image.Image):
        tensor = _array_to_tensor(np.asarray(image.convert("RGB")), False, name)
    elif isinstance(image, np.ndarray):
        tensor = _array_to_tensor(image, bgr, name)
    elif isinstance(image, Tensor):
        tensor = _tensor_to_image(image, name)
    else:
        raise ValueError(f"{name}: unsupported image type {type(image).__name__}; expected a file path, "
                         "a NumPy array, a PIL image or a torch tensor")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        where = str(image) if isinstance(image, (str, Path)) else name
        raise ValueError(f"{where}: image is empty (size {tensor.shape[1]}x{tensor.shape[2]})")
    return tensor


class Instances:
    """Detections in one image, sorted as the model returned them (by score, highest first).

    boxes: ``(N, 4)`` float32 xyxy in pixels of the original image.
    scores: ``(N,)`` float32 class probabilities in [0, 1].
    labels: ``(N,)`` int64 class labels in 1..K.
    class_names: N strings, the name of each detection's label.
    masks: ``(N, H, W)`` bool tensor (bitmap), a list of N COCO RLE dicts (rle), or None.
    image_size: ``(H, W)`` of the original image (pixels).
    """

    def __init__(self, *, boxes: Tensor, scores: Tensor, labels: Tensor, class_names: List[str],
                 masks: Union[Tensor, List[dict], None], image_size: tuple):
        self.boxes = boxes
        self.scores = scores
        self.labels = labels
        self.class_names = class_names
        self.masks = masks
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, index) -> "Instances":
        """An int, a slice, a ``(N,)`` bool mask or an int64 index tensor selects detections."""
        positions = torch.arange(len(self))[index]
        if positions.dim() == 0:
            positions = positions[None]
        kept = positions.tolist()
        masks = self.masks
        if isinstance(masks, Tensor):
            masks = masks[positions]
        elif masks is not None:
            masks = [masks[i] for i in kept]
        return Instances(boxes=self.boxes[positions], scores=self.scores[positions], labels=self.labels[positions],
                         class_names=[self.class_names[i] for i in kept], masks=masks, image_size=self.image_size)

    def filter(self, score_thresh: float) -> "Instances":
        """The detections scoring at least ``score_thresh``."""
        return self[self.scores >= score_thresh]

    def to_coco(self, image_id, label_to_cat_id: Optional[dict] = None) -> List[dict]:
        """COCO result dicts: ``image_id``, ``category_id``, ``bbox`` (x, y, w, h pixels), ``score`` and,
        when masks are present, ``segmentation`` (RLE with string counts).

        label_to_cat_id: maps labels 1..K to dataset category ids; without it the label is the id.
        """
        if label_to_cat_id is None:
            category_ids = self.labels.tolist()
        else:
            missing = sorted(set(self.labels.tolist()) - set(label_to_cat_id))
            if missing:
                raise ValueError(f"image {image_id}: labels {missing} have no entry in label_to_cat_id")
            category_ids = [label_to_cat_id[label] for label in self.labels.tolist()]
        xywh = self.boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        if isinstance(self.masks, Tensor):
            segmentations = encode_masks(self.masks)
        else:
            segmentations = self.masks
        results = []
        for i, (box, score, category_id) in enumerate(zip(xywh.tolist(), self.scores.tolist(), category_ids)):
            result = {"image_id": image_id, "category_id": int(category_id), "bbox": box, "score": score}
            if segmentations is not None:
                result["segmentation"] = segmentations[i]
            results.append(result)
        return results

    def __repr__(self) -> str:
        mask_kind = "none" if self.masks is None else "rle" if isinstance(self.masks, list) else "bitmap"
        return f"Instances(num={len(self)}, image_size={self.image_size}, masks={mask_kind})"


def _check_options(precision: str, mask_format: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")


@torch.inference_mode()
def detect(model: MaskRCNN, images: Sequence[Tensor], *, class_names: Sequence[str], mask_format: str = "bitmap",
           precision: str = "fp32") -> List[Instances]:
    """Run an eval-mode model on a batch and package its output.

    model: a :class:`~maskrcnn.modeling.maskrcnn.MaskRCNN` in eval mode; its ``return_mask_probs`` is set for
        the call and restored after, and its ``mask_threshold`` and ``paste_memory_mb`` drive the paste.
    images: ``(3, H, W)`` float RGB tensors in 0-1 on the model's device; sizes may differ.
    class_names: the name of each label, ``class_names[label - 1]``.
    mask_format: "bitmap" pastes ``(N, H, W)`` bool masks; "rle" pastes each mask only over its box and
        encodes COCO RLE from those regions; "none" skips masks.
    precision: "fp32", or "bf16" for a bfloat16 autocast forward (outputs are float32 either way).
    Returns one :class:`Instances` per image, on the CPU.
    """
    _check_options(precision, mask_format)
    if not images:
        return []
    if len(class_names) != model.num_classes:
        raise ValueError(f"got {len(class_names)} class names for a model of {model.num_classes} classes")
    device_type = images[0].device.type
    previous = model.return_mask_probs
    model.return_mask_probs = True
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(list(images))
    finally:
        model.return_mask_probs = previous
    results = []
    for image, output in zip(images, outputs):
        image_size = (int(image.shape[1]), int(image.shape[2]))
        boxes = output["boxes"].float()
        probs = output["mask_probs"].float()
        if mask_format == "bitmap":
            masks = paste_masks_in_image(probs, boxes, image_size, threshold=model.mask_threshold,
                                         memory_mb=model.paste_memory_mb).cpu()
        elif mask_format == "rle":
            regions = paste_mask_regions(probs, boxes, image_size, threshold=model.mask_threshold,
                                         memory_mb=model.paste_memory_mb)
            masks = encode_mask_regions(regions, image_size)
        else:
            masks = None
        labels = output["labels"].cpu()
        results.append(Instances(boxes=boxes.cpu(), scores=output["scores"].float().cpu(), labels=labels,
                                 class_names=[class_names[label - 1] for label in labels.tolist()],
                                 masks=masks, image_size=image_size))
    return results


class Predictor:
    """A Mask R-CNN ready for inference on user images.

    config: the full :class:`~maskrcnn.config.Config` (its ``model`` part builds the network).
    weights: a state dict, the path of a checkpoint (its ``"model"`` entry is used) or of a bare state dict,
        or None for random initialisation.
    class_names: the name of each label 1..K (default: the label numbers as strings).
    device: where the model runs ("cpu", "cuda", "cuda:1", ...).
    precision: "fp32" or "bf16" (bfloat16 autocast around the forward).
    score_thresh: detections scoring below this are dropped (replaces ``roi_heads.score_thresh``; None keeps
        the configured value).
    mask_format: "bitmap", "rle" or "none" (see :func:`detect`).
    bgr: NumPy inputs are BGR (OpenCV order) unless a call says otherwise.
    """

    def __init__(self, config: Config, weights: Union[dict, str, Path, None], *,
                 class_names: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "cpu",
                 precision: str = "fp32", score_thresh: Optional[float] = 0.05, mask_format: str = "bitmap",
                 bgr: bool = False):
        _check_options(precision, mask_format)
        model_cfg = copy.deepcopy(config.model)
        if score_thresh is not None:
            model_cfg.roi_heads.score_thresh = float(score_thresh)
        if class_names is None:
            class_names = [str(label) for label in range(1, model_cfg.roi_heads.num_classes + 1)]
        self.config = config
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.precision = precision
        self.mask_format = mask_format
        self.bgr = bgr
        self.model = build_model(model_cfg)
        if weights is not None:
            if isinstance(weights, (str, Path)):
                weights = _load_file(weights)
                weights = weights.get("model", weights)
            self.model.load_state_dict(weights)
        self.model.eval().to(self.device)
        # The copy that runs: normalisations folded into the convolutions, channels-last weights (same
        # outputs, faster). ``self.model`` keeps the checkpoint's parameter names.
        self.inference_model = prepare_for_inference(self.model)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], **kwargs) -> "Predictor":
        """A predictor from a training checkpoint, with the configuration and class names stored in it.

        kwargs: any keyword argument of the constructor (``device``, ``precision``, ``score_thresh``, ...).
        """
        checkpoint = _load_file(path)
        for key in ("model", "config"):
            if key not in checkpoint:
                raise ValueError(f"checkpoint {path} has no {key!r} entry")
        kwargs.setdefault("class_names", checkpoint.get("class_names"))
        return cls(config_from_dict(checkpoint["config"]), checkpoint["model"], **kwargs)

    def __call__(self, inputs: Union[ImageInput, Sequence[ImageInput]], *,
                 bgr: Optional[bool] = None) -> Union[Instances, List[Instances]]:
        """Detect instances in one image (returns one :class:`Instances`) or a list (returns a list, run as
        one batch). ``bgr`` overrides the predictor's setting for NumPy inputs of this call."""
        bgr = self.bgr if bgr is None else bgr
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        names = ["input"] if single else [f"input {i} of the list" for i in range(len(items))]
        images = [to_image_tensor(item, bgr=bgr, name=name).to(self.device) for item, name in zip(items, names)]
        results = detect(self.inference_model, images, class_names=self.class_names, mask_format=self.mask_format,
                         precision=self.precision)
        return results[0] if single else results


def _load_file(path: Union[str, Path]) -> dict:
    """``torch.load`` a checkpoint or state dict onto the CPU (tensors and plain Python types only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
