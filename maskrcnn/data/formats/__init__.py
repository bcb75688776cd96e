"""Readers of other annotation formats (labelme, CVAT for images 1.1 XML, YOLO segmentation) into COCO json.

``READERS[name](src, image_dir=..., class_names=...)`` returns ``(records, class_names)``;
:func:`to_coco` and :func:`write_coco` turn them into a COCO instances file.
"""

from maskrcnn.data.formats.coco_writer import ImageRecord, Instance, split_coco, to_coco, write_coco
from maskrcnn.data.formats.cvat import read_cvat
from maskrcnn.data.formats.labelme import read_labelme
from maskrcnn.data.formats.yolo import read_yolo

READERS = {"labelme": read_labelme, "cvat": read_cvat, "yolo": read_yolo}

__all__ = ["READERS", "ImageRecord", "Instance", "read_cvat", "read_labelme", "read_yolo", "split_coco", "to_coco",
           "write_coco"]
