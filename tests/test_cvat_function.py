"""The CVAT auto-annotation function (maskrcnn/deploy/cvat_function.py, tools/cvat_function.py) checked by the
CVAT SDK's own code, without a server: cvat-cli's loader builds it from the function file and its ``-p``
parameters, and the driver's annotation mapper (what ``annotate_task`` runs on every frame before uploading)
validates its spec and shapes against a task's labels and maps them to the task's label ids. The shapes
decode (``cvat_sdk.masks.decode_mask``, polygons rasterised by pycocotools) to the detections' masks."""

import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

cvataa = pytest.importorskip("cvat_sdk.auto_annotation", reason="cvat-sdk is not installed (the test extra)")
from cvat_cli._internal.common import FunctionLoader  # noqa: E402
from cvat_cli._internal.parsers import parse_function_parameter  # noqa: E402
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl  # noqa: E402
from cvat_sdk.masks import decode_mask  # noqa: E402

from preannotation_support import AS_MASK, CLASSES, DETECTIONS, H, W, check_masks, draw, instances  # noqa: E402
from serving import CLASS_NAMES, tiny_predictor, write_checkpoint  # noqa: E402
from maskrcnn.deploy.cvat_function import CvatFunction  # noqa: E402
from maskrcnn.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_FILE = ROOT / "tools" / "cvat_function.py"
TASK_LABELS = {name: 100 + i for i, name in enumerate(CLASSES)}  # a task's labels: its own ids, matched by name
DETECTED = DETECTIONS["a.png"]  # what the stand-in model finds in every image


def task_labels(kind: str = "any"):
    """A task's labels as the driver reads them from the server (name, id, type, no sublabels)."""
    return [SimpleNamespace(name=name, id=label_id, type=kind, sublabels=[], attributes=[])
            for name, label_id in TASK_LABELS.items()]


def stand_in_function(tolerance=None) -> CvatFunction:
    def predict(arrays):
        assert [array.shape for array in arrays] == [(H, W, 3)]
        return [instances(DETECTED)]

    return CvatFunction(predict, CLASSES, tolerance=tolerance)


def run_as_the_driver(function, *, conf_threshold=None, conv_mask_to_poly=False, kind="any", frame=5):
    """The function on one frame as ``annotate_task`` runs it: the shapes validated and remapped by the
    driver's mapper to the task's labels."""
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, task_labels(kind),
                               allow_unmatched_labels=False, conv_mask_to_poly=conv_mask_to_poly)
    context = _DetectionFunctionContextImpl(frame_name="a.png", conf_threshold=conf_threshold,
                                            conv_mask_to_poly=conv_mask_to_poly)
    tags, shapes = mapper.validate_and_remap(function.detect(context, Image.new("RGB", (W, H), "gray")), frame)
    assert tags == [] and all(shape.frame == frame and shape.source == "auto" for shape in shapes)
    return shapes


def objects(shapes):
    """(label name, mask, written as mask, score) per object: polygons of one group are one object."""
    names = {label_id: name for name, label_id in TASK_LABELS.items()}
    read = []
    for shape in shapes:
        if shape.type.value == "mask":
            mask = decode_mask(shape.points, image_width=W, image_height=H)
        else:
            mask = mask_utils.decode(mask_utils.frPyObjects([list(shape.points)], H, W))[:, :, 0].astype(bool)
        group = getattr(shape, "group", None)
        if group and read and read[-1][4] == group:
            read[-1][1] |= mask
            continue
        read.append([names[shape.label_id], mask, shape.type.value == "mask", shape.score, group])
    return [tuple(entry[:4]) for entry in read]


def test_the_spec_offers_the_model_classes_by_name():
    spec = stand_in_function().spec
    assert [(label.name, label.id, label.type) for label in spec.labels] == \
        [(name, i, "any") for i, name in enumerate(CLASSES, start=1)]


def test_shapes_are_the_detections_masks_and_polygons():
    read = objects(run_as_the_driver(stand_in_function()))
    expected = [(label, draw(kind)) for kind, label, _ in DETECTED]
    as_mask = [kind in AS_MASK for kind, _, _ in DETECTED]
    check_masks([(label, mask) for label, mask, _, _ in read], expected, as_mask)
    assert [written for _, _, written, _ in read] == as_mask
    assert [score for *_, score in read] == pytest.approx([score for *_, score in DETECTED])


def test_the_confidence_threshold_drops_lower_scores():
    read = objects(run_as_the_driver(stand_in_function(), conf_threshold=0.85))
    assert [score for *_, score in read] == pytest.approx([s for _, _, s in DETECTED if s >= 0.85])


def test_conv_mask_to_poly_gives_polygons_of_the_outer_outline():
    shapes = run_as_the_driver(stand_in_function(), conv_mask_to_poly=True, kind="polygon")
    assert {shape.type.value for shape in shapes} == {"polygon"}
    disk = np.zeros((H, W), np.uint8)
    cv2.circle(disk, (50, 50), 35, 1, -1)  # the ring of preannotation_support.draw without its hole
    filled = [(label, disk.astype(bool) if kind == "ring" else draw(kind)) for kind, label, _ in DETECTED]
    check_masks([(label, mask) for label, mask, _, _ in objects(shapes)], filled, [False] * len(filled))


def test_masks_need_labels_that_take_them():
    """A task whose labels are polygons: the driver refuses the masks (cvat-cli --conv-mask-to-poly is
    the way), as it would before uploading anything."""
    with pytest.raises(cvataa.BadFunctionError, match="function output shape of type 'mask'"):
        run_as_the_driver(stand_in_function(), kind="polygon")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tiny_predictor(), tmp_path_factory.mktemp("cvat") / "tiny.pth")


def test_cvat_cli_loads_the_function_file_with_its_parameters(checkpoint):
    parameters = dict(parse_function_parameter(p) for p in (f"checkpoint=str:{checkpoint}", "score_thresh=float:0"))
    function = FunctionLoader(None, FUNCTION_FILE, parameters).load()
    assert [label.name for label in function.spec.labels] == CLASS_NAMES
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels,
                               [SimpleNamespace(name=name, id=7 + i, type="any", sublabels=[], attributes=[])
                                for i, name in enumerate(CLASS_NAMES)],
                               allow_unmatched_labels=False, conv_mask_to_poly=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    shapes = function.detect(_DetectionFunctionContextImpl(frame_name="x.png"), image)
    _, mapped = mapper.validate_and_remap(shapes, 0)
    assert mapped and len(mapped) == len(shapes)  # score 0: the random model's detections, all valid


def test_the_checkpoint_comes_from_the_environment_or_the_error_says_how(checkpoint, monkeypatch):
    monkeypatch.delenv("MASKRCNN_CHECKPOINT", raising=False)
    with pytest.raises(InputError, match="pass -p checkpoint=str:PATH or set MASKRCNN_CHECKPOINT"):
        FunctionLoader(None, FUNCTION_FILE, {}).load()
    monkeypatch.setenv("MASKRCNN_CHECKPOINT", str(checkpoint))
    assert [label.name for label in FunctionLoader(None, FUNCTION_FILE, {}).load().spec.labels] == CLASS_NAMES
