"""Batch rows read back: as the COCO results of a dataset, or as the ``Instances`` of each image.

    results = coco_results("output/rows", load_coco("instances_val.json"), image_dir="data/val")
    instances = instances_of(row, predictor.class_names, predictor.label_to_cat_id)

:func:`coco_results` gives each row's detections the dataset's id of its image, which it finds by file name:
with ``image_dir``, the row's path relative to that folder is the image's ``file_name`` in the COCO json
(as :class:`~maskrcnn.data.coco.CocoDetection` joins them); without it, the row's file name is, and file
names must then be unique in the dataset. Rows and dataset must cover the same images: a row of an image the
dataset lacks, an image the batch could not read, or a dataset image without a row (a job not finished) is
an :class:`InputError` naming the path, since scoring them as "no detections" would lower the AP silently.
:func:`load_results` reads either a ``results.json`` or a batch output folder, for the tools.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Union

import torch

from maskrcnn.batch.shards import read_rows
from maskrcnn.errors import InputError
from maskrcnn.evaluation.report import read_results
from maskrcnn.structures import Instances


def coco_results(folder: Union[str, Path], coco_gt, image_dir: Union[str, Path, None] = None) -> List[dict]:
    """The COCO result dicts of a batch output folder's rows, ``image_id`` the dataset's id of each image.

    coco_gt: the dataset, a COCO object of either backend (:func:`maskrcnn.evaluation.coco_evaluator.load_coco`).
    image_dir: the folder the dataset's ``file_name`` values are relative to (None: match by file name).
    Raises :class:`InputError` naming the path of a row the dataset lacks, of an unreadable image, of a
    dataset image without a row (the first few, and how many) and of two rows matched to one image.
    """
    folder = Path(folder)
    rows = read_rows(folder)
    ids_by_key = defaultdict(list)
    for image in coco_gt.imgs.values():
        file_name = PurePosixPath(image["file_name"])
        ids_by_key[str(file_name) if image_dir is not None else file_name.name].append(image["id"])
    root = Path(image_dir).resolve() if image_dir is not None else None
    results, path_of = [], {}
    for row in rows:
        path = Path(row["path"])
        resolved = path.resolve()
        key = path.name if root is None else \
            resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else None
        ids = ids_by_key.get(key, [])
        if not ids:
            where = f"no file_name {key!r}" if key is not None else f"not in {root}"
            raise InputError(f"{folder}: {path} is not an image of the dataset ({where})")
        if len(ids) > 1:
            raise InputError(f"{folder}: {path} is image id {', '.join(map(str, ids))} by its file name: give the "
                             "image folder to match by the path below it")
        if row["error"] is not None:
            raise InputError(f"{folder}: image id {ids[0]}, {path}, could not be read by the batch: {row['error']}")
        if ids[0] in path_of:
            raise InputError(f"{folder}: {path_of[ids[0]]} and {path} are both image id {ids[0]} of the dataset")
        path_of[ids[0]] = path
        results.extend({"image_id": ids[0], **detection} for detection in row["detections"])
    missing = [image for image_id, image in coco_gt.imgs.items() if image_id not in path_of]
    if missing:
        shown = ", ".join(f"{image['file_name']} (image id {image['id']})" for image in missing[:3])
        raise InputError(f"{folder}: {len(missing)} images of the dataset have no row, e.g. {shown}: run the job "
                         "to its end (it resumes) or on these images")
    return results


def load_results(path: Union[str, Path], coco_gt, image_dir: Union[str, Path, None] = None) -> List[dict]:
    """COCO results from a ``results.json`` file (:func:`~maskrcnn.evaluation.report.read_results`) or a
    batch output folder (:func:`coco_results`, with ``coco_gt`` and ``image_dir``)."""
    return coco_results(path, coco_gt, image_dir) if Path(path).is_dir() else read_results(path)


def instances_of(row: dict, class_names: Sequence[str], label_to_cat_id: Optional[Dict[int, int]] = None) -> Instances:
    """One row's detections as :class:`Instances`, masks as COCO RLE (``mask_format="rle"``).

    class_names: the model's class names, label 1..K in order; label_to_cat_id: its label -> dataset category
        id map (a checkpoint's; None: the category id is the label), inverted to label each detection and
        kept on the result, so that :meth:`Instances.to_coco` gives the row's detections back (boxes to
        float32 rounding: the row holds x, y, w, h and Instances x1, y1, x2, y2).
    Raises :class:`InputError` naming the path for a row whose image could not be read and for a category id
    that no label maps to.
    """
    if row["error"] is not None:
        raise InputError(f"{row['path']} has no detections: the batch could not read it ({row['error']})")
    label_of = {int(cat_id): int(label) for label, cat_id in label_to_cat_id.items()} \
        if label_to_cat_id is not None else {label: label for label in range(1, len(class_names) + 1)}
    detections = row["detections"]
    unknown = sorted({d["category_id"] for d in detections} - set(label_of))
    if unknown:
        raise InputError(f"{row['path']}: category ids {unknown} are none of the model's ({sorted(label_of)})")
    labels = [label_of[d["category_id"]] for d in detections]
    boxes = torch.tensor([d["bbox"] for d in detections], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x1, y1, x2, y2)
    return Instances(boxes=boxes.float(), scores=torch.tensor([d["score"] for d in detections], dtype=torch.float32),
                     labels=torch.tensor(labels, dtype=torch.int64), class_names=[class_names[l - 1] for l in labels],
                     masks=[{"size": list(d["segmentation"]["size"]), "counts": d["segmentation"]["counts"]}
                            for d in detections],
                     image_size=(row["height"], row["width"]), label_to_cat_id=label_to_cat_id)
