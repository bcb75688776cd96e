"""What the pre-annotation round trips share: prediction-like detections with holes and thin parts, the
checks of what a tool reads back, and the annotation tools' own environment, .venv/annotation-tools, built by
``bash tests/annotation_tools/setup.sh`` (labelme, datumaro, Label Studio; see its requirements.txt)."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from maskrcnn.data.formats.coco_writer import segmentation_of
from maskrcnn.data.formats.predictions import POLYGON_MIN_IOU
from maskrcnn.data.formats.preannotate import write_preannotations
from maskrcnn.structures import Instances

TOOLS_ENV = Path(__file__).parents[1] / ".venv" / "annotation-tools"
TOOLS_BIN = TOOLS_ENV / "bin"
READ_BACK = Path(__file__).parent / "annotation_tools" / "read_back.py"

requires_tools = pytest.mark.skipif(
    not (TOOLS_ENV / ".installed").is_file(),
    reason=f"the annotation tools' environment {TOOLS_ENV} is absent: build it with "
           "`bash tests/annotation_tools/setup.sh` (about 4 minutes; CI builds it before the tests)")


def read_back(command: str, path) -> object:
    """What ``tests/annotation_tools/read_back.py COMMAND PATH`` prints, run in the tools' environment."""
    done = subprocess.run([str(TOOLS_BIN / "python"), str(READ_BACK), command, str(path)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise AssertionError(f"read_back.py {command} {path} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


CLASSES = ["ring", "blob", "bar", "other"]  # the model's classes
H, W = 200, 300  # every test image's size


def draw(kind: str) -> np.ndarray:
    """A prediction-like (H, W) bool mask."""
    canvas = np.zeros((H, W), dtype=np.uint8)
    if kind == "ring":  # a hole: polygons cannot hold it
        cv2.circle(canvas, (50, 50), 35, 1, -1)
        cv2.circle(canvas, (50, 50), 14, 0, -1)
    elif kind == "disk with a pinhole":  # a hole of 5 pixels
        cv2.circle(canvas, (220, 60), 45, 1, -1)
        cv2.circle(canvas, (220, 60), 1, 0, -1)
    elif kind == "disk with a leg":  # a part one pixel thin, under 1% of the area: simplification flattens it
        cv2.circle(canvas, (220, 60), 45, 1, -1)
        cv2.line(canvas, (252, 92), (290, 140), 1, 1)
    elif kind == "thin bar":  # one pixel wide
        canvas[10:90, 120] = 1
    elif kind == "ellipse":
        cv2.ellipse(canvas, (70, 150), (40, 22), 25, 0, 360, 1, -1)
    elif kind == "two parts":  # one detection of two parts: grouped polygons (one mask in Label Studio)
        cv2.ellipse(canvas, (150, 160), (14, 10), 0, 0, 360, 1, -1)
        cv2.rectangle(canvas, (175, 150), (197, 178), 1, -1)
    elif kind == "wide bar":
        cv2.rectangle(canvas, (130, 10), (134, 80), 1, -1)
    return canvas.astype(bool)


# (kind, label, score) of each detection per image, highest score first as the model returns them; b.png's
# masks are given as RLE, empty.png has none.
DETECTIONS = {"a.png": [("ring", "ring", 0.97), ("disk with a leg", "blob", 0.93), ("ellipse", "blob", 0.9),
                        ("two parts", "ring", 0.8), ("thin bar", "bar", 0.78), ("wide bar", "other", 0.75),
                        ("ellipse", "blob", 0.3)],
              "b.png": [("ring", "ring", 0.9)],
              "empty.png": []}
SCORE_THRESH, KEEP = 0.5, ["ring", "blob", "bar"]  # a.png's last two detections are dropped
# The kind of each detection kept, per image, in the order written.
KEPT = {"a.png": ["ring", "disk with a leg", "ellipse", "two parts", "thin bar"], "b.png": ["ring"], "empty.png": []}
AS_MASK = {"ring", "disk with a leg", "thin bar"}  # the kinds written as masks (in Label Studio "two parts" too)


def instances(detections, rle: bool = False) -> Instances:
    """The detections as the predictor returns them, masks as a bool tensor or COCO RLE."""
    masks = torch.from_numpy(np.stack([draw(kind) for kind, _, _ in detections])) if detections else \
        torch.zeros(0, H, W, dtype=torch.bool)
    labels = [label for _, label, _ in detections]
    encoded = [dict(r, counts=r["counts"].decode("ascii")) for r in
               mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))]
    return Instances(boxes=torch.zeros(len(labels), 4), scores=torch.tensor([s for _, _, s in detections]),
                     labels=torch.tensor([CLASSES.index(name) + 1 for name in labels], dtype=torch.int64),
                     class_names=labels, masks=encoded if rle else masks, image_size=(H, W))


def make_predictions(folder: Path):
    """Write the images of :data:`DETECTIONS` into ``folder``; return the records to write pre-annotations
    of, ``[(image path, Instances)]``, and what each image should read back as: ``[(label, mask)]`` of the
    detections kept."""
    folder.mkdir(parents=True, exist_ok=True)
    records, expected = [], []
    for name, detections in DETECTIONS.items():
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(folder / name)
        records.append((folder / name, instances(detections, rle=name == "b.png")))
        kinds = [kind for kind, _, _ in detections]
        expected.append([(detections[kinds.index(kind)][1], draw(kind)) for kind in KEPT[name]])
    return records, expected


def write(format, records, folder, **options):
    """The pre-annotations of ``records`` with the test's class list, threshold and classes kept."""
    return write_preannotations(format, records, folder, class_names=CLASSES, score_thresh=SCORE_THRESH,
                                classes=KEEP, **options)


def decode(rle: dict) -> np.ndarray:
    """A COCO RLE with string counts -> (H, W) bool."""
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def check_masks(read, expected, written_as_mask):
    """``read``: (label, mask) per object as a tool or reader gives it back, in the order written. Labels
    equal; masks written as masks equal to the detection's exactly, polygons with IoU >= POLYGON_MIN_IOU."""
    assert [label for label, _ in read] == [label for label, _ in expected]
    for (_, mask), (_, truth), as_mask in zip(read, expected, written_as_mask):
        if as_mask:
            np.testing.assert_array_equal(mask, truth)
        else:
            assert np.logical_and(mask, truth).sum() >= POLYGON_MIN_IOU * np.logical_or(mask, truth).sum()


def check_conversion(conversion, expected, label_studio: bool = False):
    """Our reader's :class:`Conversion` against ``expected`` (images in order, as make_predictions writes
    them), each object rasterised as its COCO conversion is."""
    as_mask = AS_MASK | ({"two parts"} if label_studio else set())
    names = [name for name in DETECTIONS if not label_studio or KEPT[name]]
    assert [record.file_name for record in conversion.records] == names
    for record, name in zip(conversion.records, names):
        read = []
        for instance in record.instances:
            segmentation = segmentation_of(instance, record.height, record.width)
            read.append((instance.label, decode(segmentation) if isinstance(segmentation, dict) else mask_utils.decode(
                mask_utils.merge(mask_utils.frPyObjects(segmentation, record.height, record.width))).astype(bool)))
        check_masks(read, expected[list(DETECTIONS).index(name)], [kind in as_mask for kind in KEPT[name]])
