"""Detections written as pre-annotations that an annotation tool imports, for people to correct rather than
draw from nothing:

- ``labelme``: ``<folder>/<image stem>.json`` per image (:func:`~maskrcnn.data.formats.labelme.write_labelme_file`);
- ``cvat``: ``<folder>/annotations.xml``, CVAT for images 1.1 (:func:`~maskrcnn.data.formats.cvat.write_cvat`);
- ``label-studio``: ``<folder>/tasks.json`` with predictions and ``<folder>/labeling_config.xml``
  (:func:`~maskrcnn.data.formats.label_studio.write_label_studio`).

:class:`PreannotationWriter` takes one image's detections at a time (:meth:`~PreannotationWriter.add`) and
turns them into shapes at once, keeping no full-image mask; :meth:`~PreannotationWriter.finish` writes what
is left to write and returns a :class:`Preannotations` summary. :func:`write_preannotations` does both for
a sequence of ``(image path, Instances)`` records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from maskrcnn.errors import InputError
from maskrcnn.structures import Instances
from maskrcnn.data.formats.cvat import write_cvat
from maskrcnn.data.formats.label_studio import write_label_studio
from maskrcnn.data.formats.labelme import write_labelme_file
from maskrcnn.data.formats.predictions import Dropped, PredictedImage, check_classes, predicted_image

PREANNOTATION_FORMATS = ("labelme", "cvat", "label-studio")
MAX_FILES_LISTED = 5  # more files than this are summed up by folder in what a tool prints
MODEL_VERSION = "maskrcnn"  # Label Studio's model_version of the predictions when none is given


@dataclass
class Preannotations:
    """What was written: the files, the images, the shapes by kind and the detections dropped."""

    format: str
    files: List[Path]
    images: int
    polygons: int
    masks: int
    dropped: Dropped = field(default_factory=Dropped)
    image_root: Optional[Path] = None  # Label Studio's document root for the image URLs

    def lines(self) -> List[str]:
        """What a tool prints: the counts, what was dropped and why, where the files are."""
        lines = [f"{self.format}: {self.images} images, {self.polygons + self.masks} detections written "
                 f"({self.polygons} as polygons, {self.masks} as masks)"]
        lines += self.dropped.lines()
        if self.image_root is not None:
            lines.append(f"serve the images to Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
                         f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={self.image_root}")
        if len(self.files) <= MAX_FILES_LISTED:
            lines.append(f"written: {', '.join(str(path) for path in self.files)}")
        else:  # one file per image: name the folder, not a thousand paths
            folders = sorted({str(path.parent) for path in self.files})
            lines.append(f"written: {len(self.files)} files in {', '.join(folders)}")
        return lines


class PreannotationWriter:
    """Writes detections as pre-annotations of ``format`` (one of :data:`PREANNOTATION_FORMATS`) into
    ``folder``.

    class_names: the model's classes, in order: the labels a CVAT task or Label Studio project offers
        (default: the labels of the detections written).
    score_thresh: detections scoring below are dropped (None: keep what the model returned).
    classes: the class names to keep (None: all).
    tolerance: polygon simplification in pixels (None: ``predictions.SIMPLIFY_TOLERANCE``; 0: exact outlines).
    model_version: Label Studio's ``model_version`` of the predictions (None: :data:`MODEL_VERSION`).
    image_root: Label Studio's local-files document root, the image URLs are relative to it (None: the
        folder that holds all the images).
    """

    def __init__(self, format: str, folder, *, class_names: Optional[Sequence[str]] = None,
                 score_thresh: Optional[float] = None, classes: Optional[Sequence[str]] = None,
                 tolerance: Optional[float] = None, model_version: Optional[str] = None, image_root=None):
        if format not in PREANNOTATION_FORMATS:
            raise InputError(f"unknown pre-annotation format {format!r} (expected one of {PREANNOTATION_FORMATS})")
        self.format, self.folder = format, Path(folder)
        self.class_names = list(class_names) if class_names is not None else None
        self.keep = check_classes(classes, self.class_names)
        self.score_thresh, self.tolerance = score_thresh, tolerance
        self.model_version = model_version if model_version is not None else MODEL_VERSION
        self.image_root = image_root
        self.dropped = Dropped()
        self.images: List[PredictedImage] = []  # kept for the one-file formats; labelme writes as it goes
        self.files: List[Path] = []
        self.names = {}  # the name each image is known by in the output -> its path
        self.polygons = self.masks = 0  # detections written as polygons, as masks

    def add(self, image_path, instances: Instances) -> None:
        """One image's detections (masks in pixels of the upright image, as the predictor returns them)."""
        image_path = Path(image_path)
        name = image_path.stem if self.format == "labelme" else image_path.name
        if name in self.names:
            raise InputError(f"{image_path} and {self.names[name]} would share the {self.format} name {name!r}; "
                             "write them in separate runs")
        self.names[name] = image_path
        image = predicted_image(image_path, instances, dropped=self.dropped, score_thresh=self.score_thresh,
                                keep=self.keep, tolerance=self.tolerance, multipart=self.format != "label-studio")
        masks = sum(shape.is_mask for shape in image.shapes)
        self.masks += masks
        self.polygons += len(image.shapes) - masks
        if self.format == "labelme":
            self.files.append(write_labelme_file(image, self.folder))
        else:
            self.images.append(image)

    def finish(self) -> Preannotations:
        """Write the one-file formats; return what was written."""
        if not self.names:
            raise InputError("no images to write pre-annotations of")
        class_names = self.class_names
        if class_names is None:
            class_names = sorted({shape.label for image in self.images for shape in image.shapes})
        elif self.keep is not None:
            class_names = [name for name in class_names if name in self.keep]
        image_root = None
        if self.format == "cvat":
            self.files.append(write_cvat(self.images, class_names, self.folder / "annotations.xml"))
        elif self.format == "label-studio":
            image_root = Path(self.image_root if self.image_root is not None else
                              os.path.commonpath([image.path.resolve().parent for image in self.images])).resolve()
            self.files.extend(write_label_studio(self.images, class_names, self.folder,
                                                 model_version=self.model_version, image_root=image_root))
        return Preannotations(self.format, self.files, len(self.names), self.polygons, self.masks, self.dropped,
                              image_root)


def write_preannotations(format: str, records: Iterable[Tuple[object, Instances]], folder,
                         **options) -> Preannotations:
    """Write ``records``, ``(image path, Instances)`` pairs, as pre-annotations of ``format`` into ``folder``;
    ``options`` as :class:`PreannotationWriter` takes them."""
    writer = PreannotationWriter(format, folder, **options)
    for image_path, instances in records:
        writer.add(image_path, instances)
    return writer.finish()
