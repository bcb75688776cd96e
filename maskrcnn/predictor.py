"""The public inference API: images in, per-image detections out.

    predictor = Predictor.from_checkpoint("output/train/model_final.pth", device="cuda")
    result = predictor("street.jpg")             # one Instances
    results = predictor([array, pil_image])      # a list of Instances, run as one batch
    result.filter(0.5).to_coco(image_id=42)      # COCO result dicts
    big = Predictor.from_checkpoint(path, tile_size=1024, tile_overlap=256)("slide.tif")  # tile by tile, RLE masks

Shorthand: N detections of one image, H x W the original image size, K object classes (labels 1..K).

An input image is a file path, a NumPy ``H x W x 3`` uint8 array (RGB, or BGR with ``bgr=True``), a PIL
image, or a ``3 x H x W`` tensor (float in 0-1, or uint8). Grayscale and RGBA inputs are converted to
RGB. The model resizes internally; every output refers to the pixels of the image as given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from maskrcnn.config import Config, config_from_dict
from maskrcnn.errors import InputError
from maskrcnn.fileio import read_checkpoint, read_image
from maskrcnn.inference import (MASK_FORMATS, PRECISIONS, ImageInput, check_options, detect, drop_unmatched,
                                inference_device, match_categories, to_image_tensor, to_image_tensors)
from maskrcnn.modeling.maskrcnn import build_model, prepare_for_inference
from maskrcnn.precision import resolve_precision
from maskrcnn.structures import Instances
from maskrcnn.tiling import detect_tiled

__all__ = ["Predictor", "Instances", "read_image", "to_image_tensor", "detect", "PRECISIONS", "MASK_FORMATS"]

class Predictor:
    """A Mask R-CNN ready for inference on user images.

    config: the full :class:`~maskrcnn.config.Config` (its ``model`` part builds the network).
    weights: a state dict, the path of a checkpoint (its ``"model"`` entry is used) or of a bare state dict,
        or None for random initialisation.
    class_names: the name of each label 1..K (default: the label numbers as strings).
    device: where the model runs ("cpu", "cuda", "cuda:1", ...).
    precision: "auto" (bf16 where ``device`` computes it natively, else fp32), "fp32", or "bf16" (bfloat16
        autocast around the forward; warns where it is emulated), replacing ``model.precision``; None, the
        default, keeps the configured value (``"auto"`` unless the configuration says otherwise).
        ``self.precision`` is the resolved one, ``self.resolved_precision.message`` says why.
    score_thresh: detections scoring below this are dropped (replaces ``roi_heads.score_thresh``); None, the
        default, keeps the configured value.
    mask_format: "bitmap", "rle" or "none" (see :func:`detect`); default "bitmap", or "rle" when tiling.
    bgr: NumPy inputs are BGR (OpenCV order) unless a call says otherwise.
    label_to_cat_id: the model's label -> category id map (a checkpoint's ``label_to_cat_id``), used by
        ``Instances.to_coco``; None: labels are the category ids.
    categories: a dataset's COCO categories (dicts with ``id`` and ``name``) to report in: each label is
        matched to one of them (by ``label_to_cat_id``, else by name, see
        :func:`~maskrcnn.inference.match_categories`) and detections of labels the dataset lacks are dropped.
    tile_size, tile_overlap: run each image tile by tile (:mod:`maskrcnn.tiling`), ``tile_size`` pixels square
        tiles overlapping by ``tile_overlap``, for images far larger than the model's input; detections that
        tile borders cut or repeat are merged; masks come back as RLE ("rle") or not at all ("none").
    tiles_per_batch: tiles per forward pass when tiling (memory grows with it).
    """

    def __init__(self, config: Config, weights: Union[dict, str, Path, None], *,
                 class_names: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "cpu",
                 precision: Optional[str] = None, score_thresh: Optional[float] = None,
                 mask_format: Optional[str] = None, bgr: bool = False,
                 label_to_cat_id: Optional[Dict[int, int]] = None, categories: Optional[Sequence[dict]] = None,
                 tile_size: Optional[int] = None, tile_overlap: int = 128, tiles_per_batch: int = 4):
        if mask_format is None:
            mask_format = "bitmap" if tile_size is None else "rle"
        model_cfg = copy.deepcopy(config.model)
        if precision is not None:
            model_cfg.precision = precision
        check_options(model_cfg.precision, mask_format)
        if tile_size is not None and mask_format == "bitmap":
            raise InputError("tiled inference returns masks as RLE (mask_format='rle') or none: a full-size bitmap "
                             "per detection is what tiling avoids")
        self.tile_size, self.tile_overlap, self.tiles_per_batch = tile_size, tile_overlap, tiles_per_batch
        if score_thresh is not None:
            model_cfg.roi_heads.score_thresh = float(score_thresh)
        if class_names is None:
            class_names = [str(label) for label in range(1, model_cfg.roi_heads.num_classes + 1)]
        self.config = config
        self.class_names = list(class_names)
        self.device = inference_device(device)
        self.resolved_precision = resolve_precision(model_cfg.precision, self.device)
        self.precision = self.resolved_precision.precision
        self.mask_format = mask_format
        self.bgr = bgr
        self.label_to_cat_id = None if label_to_cat_id is None else {int(k): int(v) for k, v in label_to_cat_id.items()}
        self.drops_unmatched = categories is not None
        if categories is not None:
            self.label_to_cat_id = match_categories(self.class_names, self.label_to_cat_id, categories)
        self.model = build_model(model_cfg)
        if weights is not None:
            if isinstance(weights, (str, Path)):
                weights = read_checkpoint(weights)
                weights = weights.get("model", weights)
            self.model.load_state_dict(weights)
        self.model.eval().to(self.device)
        # The copy that runs: normalisations folded into the convolutions, channels-last weights (same
        # outputs, faster). ``self.model`` keeps the checkpoint's parameter names.
        self.inference_model = prepare_for_inference(self.model)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], overrides: Sequence[str] = (), **kwargs) -> "Predictor":
        """A predictor from a training checkpoint, with the configuration and class names stored in it.

        overrides: ``key.sub=value`` changes to the stored configuration (e.g. ``model.input.min_size_test=144``).
        kwargs: any keyword argument of the constructor (``device``, ``precision``, ``score_thresh``, ...).
        """
        checkpoint = read_checkpoint(path)
        for key in ("model", "config"):
            if key not in checkpoint:
                raise InputError(f"checkpoint {path} has no {key!r} entry")
        kwargs.setdefault("class_names", checkpoint.get("class_names"))
        kwargs.setdefault("label_to_cat_id", checkpoint.get("label_to_cat_id"))
        return cls(config_from_dict(checkpoint["config"], overrides), checkpoint["model"], **kwargs)

    def __call__(self, inputs: Union[ImageInput, Sequence[ImageInput]], *,
                 bgr: Optional[bool] = None) -> Union[Instances, List[Instances]]:
        """Detect instances in one image (returns one :class:`Instances`) or a list (returns a list, run as
        one batch; tiled, image after image). ``bgr`` overrides the predictor's setting for NumPy inputs of
        this call."""
        bgr = self.bgr if bgr is None else bgr
        single, images = to_image_tensors(inputs, bgr=bgr)
        images = [image.to(self.device) for image in images]
        if self.tile_size is None:
            results = detect(self.inference_model, images, class_names=self.class_names, mask_format=self.mask_format,
                             precision=self.precision, label_to_cat_id=self.label_to_cat_id)
        else:
            results = [detect_tiled(self.inference_model, image, class_names=self.class_names,
                                    tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                                    tiles_per_batch=self.tiles_per_batch, mask_format=self.mask_format,
                                    precision=self.precision, label_to_cat_id=self.label_to_cat_id)
                       for image in images]
        if self.drops_unmatched:
            results = drop_unmatched(results, self.label_to_cat_id)
        return results[0] if single else results

