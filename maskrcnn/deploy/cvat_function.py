"""The model as a CVAT auto-annotation detection function (``cvat_sdk.auto_annotation``): what
``cvat-cli task auto-annotate`` runs on every image of a task, uploading the shapes as annotations.

    function = CvatFunction(predictor, predictor.class_names)
    function.spec      # DetectionFunctionSpec: one label per class, by name (ids 1..K, the model's labels)
    function.detect(context, pil_image)   # -> [LabeledShapeRequest]: polygons and masks

``tools/cvat_function.py`` builds one from a checkpoint for ``cvat-cli --function-file``. Each detection
becomes the shapes of the pre-annotation files (:func:`~maskrcnn.data.formats.predictions.predicted_image`):
polygons where they hold the mask (several parts: one polygon each, sharing a ``group``), else a mask
(CVAT's run-length encoding of the box, :func:`cvat_sdk.masks.encode_mask`); each with the detection's
``score``. The labels' type is ``any``, so a task's labels of type ``any`` take both.

The context's ``conf_threshold`` drops detections scoring below it (the model's own threshold applies
first). With ``conv_mask_to_poly`` (``cvat-cli --conv-mask-to-poly``, needed for labels of type ``polygon``)
a mask is written as the polygons of its outer outline instead: holes are filled, and a part that
simplification would lose keeps its exact pixel outline.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import cv2
import numpy as np

from maskrcnn.data.formats.predictions import SIMPLIFY_TOLERANCE, Dropped, Shape, outline_polygons, predicted_image
from maskrcnn.errors import MissingPackageError
from maskrcnn.structures import Instances

try:
    import cvat_sdk.auto_annotation as cvataa
    from cvat_sdk.masks import encode_mask
except ImportError:
    raise MissingPackageError("the CVAT auto-annotation function needs cvat-sdk: pip install cvat-cli "
                              "(or pip install -e '.[cvat]')") from None


class CvatFunction:
    """A CVAT detection function over ``predict``.

    predict: images (``(H, W, 3)`` uint8 RGB arrays) -> :class:`Instances`, e.g. a
        :class:`~maskrcnn.predictor.Predictor` called on a list.
    class_names: the model's classes, in order (label ``i + 1`` is ``class_names[i]``): the spec's labels.
    tolerance: polygon simplification in pixels (None: the pre-annotations' default; 0: exact outlines).
    """

    def __init__(self, predict: Callable[[List[np.ndarray]], List[Instances]], class_names: Sequence[str], *,
                 tolerance: Optional[float] = None):
        self.predict = predict
        self.label_ids = {name: i for i, name in enumerate(class_names, start=1)}
        self.tolerance = tolerance
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, label_id, type="any") for name, label_id in self.label_ids.items()])

    def detect(self, context: cvataa.DetectionFunctionContext, image) -> list:
        """The shapes of the detections in ``image`` (a PIL image, as CVAT hands each frame over)."""
        (instances,) = self.predict([np.asarray(image.convert("RGB"))])
        shapes = predicted_image(context.frame_name, instances, dropped=Dropped(),
                                 score_thresh=context.conf_threshold, tolerance=self.tolerance).shapes
        requests, group = [], 0
        for shape in shapes:
            label_id = self.label_ids[shape.label]
            polygons = shape.polygons
            if shape.is_mask and context.conv_mask_to_poly:
                polygons = outer_polygons(shape, self.tolerance)
            elif shape.is_mask:
                height, width = shape.crop.shape
                canvas = np.zeros((shape.top + height, shape.left + width), dtype=bool)
                canvas[shape.top:, shape.left:] = shape.crop
                box = [shape.left, shape.top, shape.left + width, shape.top + height]
                requests.append(cvataa.mask(label_id, encode_mask(canvas, box), score=shape.score))
                continue
            group += len(polygons) > 1
            for polygon in polygons:
                extra = {"group": group} if len(polygons) > 1 else {}
                requests.append(cvataa.polygon(label_id, polygon.reshape(-1).tolist(), score=shape.score, **extra))
        return requests


def outer_polygons(shape: Shape, tolerance: Optional[float]) -> List[np.ndarray]:
    """Polygons of a mask shape's outline with its holes filled, ``(P, 2)`` float64 xy pixels of the image:
    simplified by ``tolerance`` where that keeps the mask (see
    :func:`~maskrcnn.data.formats.predictions.outline_polygons`), else the exact pixel outline."""
    crop = shape.crop.astype(np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = cv2.drawContours(np.zeros_like(crop), contours, -1, 1, cv2.FILLED).astype(bool) | shape.crop
    polygons = outline_polygons(filled, SIMPLIFY_TOLERANCE if tolerance is None else tolerance)
    if polygons is None:  # a part thinner than the tolerance: the exact outline, which holds any hole-free mask
        polygons = outline_polygons(filled, 0.0) or []
    return [polygon + (shape.left, shape.top) for polygon in polygons]
