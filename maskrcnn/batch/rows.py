"""The one place where a batch of images becomes rows: read, detect, encode, one row per image.

Shorthand: B images of a batch, D detections of one image, H x W an image's upright size in pixels.

A row is a plain dict, the same for every engine and output format::

    {"path": str, "height": int, "width": int,
     "detections": [{"category_id": int, "bbox": [x, y, w, h], "score": float,
                     "segmentation": {"size": [H, W], "counts": str}}, ...],
     "error": None}

``detections`` are the COCO result dicts of :meth:`~maskrcnn.structures.Instances.to_coco` without their
``image_id`` (the row's path names the image): category ids of the dataset the model was trained on, boxes
in pixels of the upright image, masks as COCO RLE. The predictor runs with ``mask_format="rle"``: each mask
is pasted over its box alone and encoded region by region, so no full-size bitmap is ever made. An image
that cannot be read gives a row with ``height``, ``width`` None, no detections and ``error`` saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa

from maskrcnn.deploy.runtime import ExportedPredictor
from maskrcnn.errors import InputError
from maskrcnn.fileio import read_image
from maskrcnn.predictor import Predictor

DETECTION_FIELDS = ("category_id", "bbox", "score", "segmentation")

# The rows as Parquet holds them: float32 boxes and scores are the values the model gave, exactly.
DETECTION_TYPE = pa.struct([("category_id", pa.int32()), ("bbox", pa.list_(pa.float32())), ("score", pa.float32()),
                            ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())]))])
ROW_SCHEMA = pa.schema([("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
                        ("detections", pa.list_(DETECTION_TYPE)), ("error", pa.string())])


@dataclass(frozen=True)
class ModelSpec:
    """Which model makes the rows, as each worker builds it (picklable: a Ray actor loads its own copy).

    checkpoint: a training checkpoint (:meth:`Predictor.from_checkpoint`), or
    onnx: an exported model (:class:`~maskrcnn.deploy.runtime.ExportedPredictor`) run by ``runtime``.
    device, precision, score_thresh: as the predictors take them (precision, score_thresh None: the model's own).
    threads: intra-op threads of an exported model's runtime (None: the runtime's default).
    """

    checkpoint: Optional[str] = None
    onnx: Optional[str] = None
    runtime: str = "onnxruntime"
    device: str = "cpu"
    precision: Optional[str] = None
    score_thresh: Optional[float] = None
    threads: Optional[int] = None

    def check(self) -> None:
        """InputError unless exactly one model file is named; FileNotFoundError if it is missing."""
        if (self.checkpoint is None) == (self.onnx is None):
            raise InputError("give either a checkpoint or an exported model (onnx), not both or neither")
        path = Path(self.checkpoint or self.onnx)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")

    def build(self) -> Callable:
        """The predictor: called with a list of RGB arrays, returns one Instances per image, masks as RLE."""
        self.check()
        precision = {} if self.precision is None else {"precision": self.precision}  # None: the predictor's own
        if self.onnx is not None:
            return ExportedPredictor(self.onnx, runtime=self.runtime, mask_format="rle", threads=self.threads,
                                     score_thresh=self.score_thresh, **precision)
        return Predictor.from_checkpoint(self.checkpoint, device=self.device, score_thresh=self.score_thresh,
                                         mask_format="rle", **precision)

    def identity(self) -> dict:
        """What the rows depend on (not where the model runs): the model file, its runtime, precision and
        threshold."""
        return {"model": str(Path(self.checkpoint or self.onnx).resolve()),
                "runtime": "torch" if self.onnx is None else self.runtime,
                "precision": self.precision, "score_thresh": self.score_thresh}


class LoadedImage(NamedTuple):
    """One input: its path and either its ``(H, W, 3)`` uint8 RGB pixels or why they could not be read."""

    path: str
    pixels: Optional[np.ndarray]
    error: Optional[str]


def load_image(path: str) -> LoadedImage:
    """Decode one image file, upright (:func:`~maskrcnn.fileio.read_image`). Any failure, a missing file, one
    that does not decode, a header a decoder refuses, becomes the ``error`` of the result, never an exception:
    one bad file among millions must not stop a job."""
    try:
        return LoadedImage(path, read_image(path), None)
    except Exception as error:  # noqa: BLE001 - whatever a decoder raises on a hostile file is that file's error
        return LoadedImage(path, None, f"{type(error).__name__}: {error}")


def image_rows(predictor: Callable, images: Sequence[LoadedImage]) -> List[dict]:
    """One row per image, in order: the readable ones go through ``predictor`` as one batch (a model's
    results depend on its batch by padding, so both engines batch the same images together)."""
    readable = [image for image in images if image.error is None]
    results = iter(predictor([image.pixels for image in readable], bgr=False) if readable else [])
    rows = []
    for image in images:
        if image.error is not None:
            rows.append({"path": image.path, "height": None, "width": None, "detections": [], "error": image.error})
            continue
        instances = next(results)
        detections = [{key: result[key] for key in DETECTION_FIELDS} for result in instances.to_coco(image_id=None)]
        rows.append({"path": image.path, "height": instances.image_size[0], "width": instances.image_size[1],
                     "detections": detections, "error": None})
    return rows


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    """Rows -> an Arrow table of :data:`ROW_SCHEMA` (what Parquet shards and Ray batches hold)."""
    return pa.Table.from_pylist(list(rows), schema=ROW_SCHEMA)
