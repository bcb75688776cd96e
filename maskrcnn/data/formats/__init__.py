"""Readers of other annotation formats (labelme, CVAT for images 1.1 XML, Label Studio, YOLO segmentation) into
COCO json; the writers of pre-annotations for the first three are in ``preannotate``.

``READERS[name](src, image_dir=..., class_names=..., strict=...)`` returns a :class:`Conversion` (records,
class names, skipped shapes); :func:`to_coco` turns records into a COCO instances dict and
:func:`write_conversion` writes them (one file per subset of the source, or a train/val split).
"""

from maskrcnn.data.formats.coco_writer import (Conversion, ImageRecord, Instance, Skipped, split_coco, to_coco,
                                               write_coco, write_conversion)
from maskrcnn.data.formats.cvat import read_cvat
from maskrcnn.data.formats.label_studio import read_label_studio
from maskrcnn.data.formats.labelme import read_labelme
from maskrcnn.data.formats.yolo import read_yolo

READERS = {"labelme": read_labelme, "cvat": read_cvat, "label-studio": read_label_studio, "yolo": read_yolo}

__all__ = ["READERS", "Conversion", "ImageRecord", "Instance", "Skipped", "read_cvat", "read_label_studio", "read_labelme", "read_yolo",
           "split_coco", "to_coco", "write_coco", "write_conversion"]
