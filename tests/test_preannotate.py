"""Pre-annotations: detections written for labelme, CVAT and Label Studio, and read back by each tool's own
code (labelme's LabelFile, datumaro's CVAT importer, label-studio-sdk's brush decoder) and by our readers."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from preannotation_support import (AS_MASK, CLASSES, DETECTIONS, H, KEEP, KEPT, W, check_conversion, check_masks,
                                   decode, draw, make_predictions, read_back, requires_tools, write)
from maskrcnn.data.formats.cvat import read_cvat
from maskrcnn.data.formats.label_studio import decode_brush, encode_brush, read_label_studio
from maskrcnn.data.formats.labelme import read_labelme
from maskrcnn.data.formats.predictions import outline_polygons
from maskrcnn.data.formats.preannotate import write_preannotations
from maskrcnn.errors import InputError


@pytest.fixture
def predictions(tmp_path):
    """The test images in tmp_path/images: (records, expected), see make_predictions."""
    return make_predictions(tmp_path / "images")


# --- the outline: polygons or a mask ---------------------------------------------------------------------

def test_outline_at_zero_tolerance_rasterises_back_to_the_mask_exactly():
    rng = np.random.default_rng(0)
    for _ in range(50):
        canvas = np.zeros((40, 50), np.uint8)
        cv2.ellipse(canvas, (int(rng.integers(0, 50)), int(rng.integers(0, 40))),
                    (int(rng.integers(1, 15)), int(rng.integers(1, 15))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        canvas[rng.integers(0, 40):, rng.integers(45, 50):] = 1  # a second part, at the image's edge
        mask = canvas.astype(bool)
        polygons = outline_polygons(mask, 0.0)
        assert polygons is not None
        drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            [p.reshape(-1).tolist() for p in polygons], 40, 50))).astype(bool)
        np.testing.assert_array_equal(drawn, mask)


@pytest.mark.parametrize("kind, as_mask", [("ring", True), ("disk with a pinhole", True), ("disk with a leg", True),
                                           ("thin bar", True), ("ellipse", False), ("wide bar", False),
                                           ("two parts", False)])
def test_holes_and_thin_parts_keep_the_mask(kind, as_mask):
    mask = draw(kind)
    polygons = outline_polygons(mask, 1.0)
    assert (polygons is None) == as_mask
    if not as_mask:
        assert len(polygons) == (2 if kind == "two parts" else 1)


def test_simplification_tolerance_trades_vertices_for_fit():
    mask = draw("ellipse")
    exact, simplified = outline_polygons(mask, 0.0), outline_polygons(mask, 1.0)
    assert len(simplified[0]) < len(exact[0]) / 3
    # No vertex strays farther than the tolerance from the exact outline (vertices lie on it, in fact).
    outline = {tuple(point) for point in exact[0]}
    edges = np.concatenate([np.linspace(a, b, 50) for a, b in zip(exact[0], np.roll(exact[0], -1, 0))])
    for vertex in simplified[0]:
        assert np.hypot(*(edges - vertex).T).min() <= 1.0 or tuple(vertex) in outline


# --- what is dropped -------------------------------------------------------------------------------------

def test_dropped_detections_are_counted_by_reason(predictions, tmp_path):
    records, _ = predictions
    summary = write("cvat", records, tmp_path / "cvat")
    assert summary.dropped.counts == {"below score 0.5": 1, "class 'other' not kept": 1}
    assert (summary.images, summary.polygons, summary.masks) == (3, 2, 4)
    assert "dropped 1 detection: below score 0.5" in summary.lines()


def test_a_class_to_keep_must_be_a_class_of_the_model(predictions, tmp_path):
    records, _ = predictions
    with pytest.raises(InputError, match=r"\['dog'\] are not classes of the model"):
        write_preannotations("labelme", records, tmp_path, class_names=CLASSES, classes=["ring", "dog"])


def test_two_images_of_one_name_are_an_error(predictions, tmp_path):
    records, _ = predictions
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InputError, match="would share the cvat name 'a.png'"):
        write_preannotations("cvat", records + [(other / "a.png", records[0][1])], tmp_path / "out")


# --- labelme ---------------------------------------------------------------------------------------------

def test_labelme_files_are_read_back_by_our_reader(predictions, tmp_path):
    records, expected = predictions
    write("labelme", records, tmp_path / "labelme")
    check_conversion(read_labelme(tmp_path / "labelme", image_dir=tmp_path / "images"), expected)


@requires_tools
def test_labelme_loads_every_file_and_draws_its_masks(predictions, tmp_path):
    records, expected = predictions
    summary = write("labelme", records, tmp_path / "labelme")
    files = read_back("labelme", tmp_path / "labelme")
    assert sorted(files) == sorted(path.name for path in summary.files) == ["a.json", "b.json", "empty.json"]
    for name, truth in zip(DETECTIONS, expected):
        read = files[name.replace(".png", ".json")]
        assert read["image_path"] == f"../images/{name}" and (read["height"], read["width"]) == (H, W)
        shapes = read["shapes"]
        # A shape per detection, but for the one of two parts: two polygons of one group.
        objects = list(dict.fromkeys((s["label"], s["group_id"] if s["group_id"] is not None else f"alone {i}")
                                     for i, s in enumerate(shapes)))
        assert [label for label, _ in objects] == [label for label, _ in truth]
        assert len(shapes) == len(truth) + ("two parts" in KEPT[name])
        assert all(s["description"].startswith("score=") for s in shapes)
        masks = [s for s in shapes if s["shape_type"] == "mask"]
        assert [s["shape_type"] == "mask" for s in shapes if s["group_id"] is None] == \
            [kind in AS_MASK for kind in KEPT[name] if kind != "two parts"]
        for shape, mask in zip(masks, [mask for (_, mask), kind in zip(truth, KEPT[name]) if kind in AS_MASK]):
            np.testing.assert_array_equal(decode(shape["rle"]), mask)  # labelme's own drawing of its masks
    assert json.loads((tmp_path / "labelme" / "a.json").read_text())["imageData"] is None


# --- CVAT ------------------------------------------------------------------------------------------------

def test_cvat_xml_is_read_back_by_our_reader(predictions, tmp_path):
    records, expected = predictions
    write("cvat", records, tmp_path)
    conversion = read_cvat(tmp_path / "annotations.xml")
    assert conversion.class_names == KEEP
    check_conversion(conversion, expected)


@requires_tools
def test_datumaro_imports_the_cvat_xml(predictions, tmp_path):
    records, expected = predictions
    write("cvat", records, tmp_path)  # the images are in tmp_path/images, where datumaro looks for them
    read = read_back("cvat", tmp_path)
    assert read["labels"] == KEEP
    assert sorted(read["items"]) == ["a", "b", "empty"]
    for name, truth in zip(DETECTIONS, expected):
        item = read["items"][name[:-4]]
        assert (item["height"], item["width"]) == (H, W)
        objects = {}  # shapes of one group are one object, as CVAT groups them
        for i, annotation in enumerate(item["annotations"]):
            key = (annotation["label"], annotation["group"] or f"alone {i}")
            objects[key] = objects.get(key, False) | decode(annotation["rle"])
        assert sum(a["type"] == "Mask" for a in item["annotations"]) == sum(k in AS_MASK for k in KEPT[name])
        check_masks([(label, mask) for (label, _), mask in objects.items()], truth,
                    [kind in AS_MASK for kind in KEPT[name]])


# --- Label Studio ----------------------------------------------------------------------------------------

def test_label_studio_tasks_are_read_back_by_our_reader(predictions, tmp_path):
    records, expected = predictions
    summary = write("label-studio", records, tmp_path / "ls", model_version="shapes-v1")
    assert summary.image_root == (tmp_path / "images").resolve()
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d={name}" for name in DETECTIONS]
    assert tasks[0]["predictions"][0]["model_version"] == "shapes-v1"
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(np.mean([0.97, 0.93, 0.9, 0.8, 0.78]))
    assert tasks[2]["predictions"] == []
    conversion = read_label_studio(tmp_path / "ls" / "tasks.json", image_dir=tmp_path / "images", predictions=True)
    assert conversion.skipped.lines() == ["skipped 1 Label Studio task shape in 1 file (no prediction)"]
    check_conversion(conversion, expected, label_studio=True)


@requires_tools
def test_label_studio_decodes_our_brush_masks(predictions, tmp_path):
    records, expected = predictions
    write("label-studio", records, tmp_path / "ls")
    decoded = read_back("brush", tmp_path / "ls" / "tasks.json")
    as_mask = AS_MASK | {"two parts"}  # Label Studio has no groups: a detection of two parts is a mask there
    truth = [(label, mask) for name, image in zip(DETECTIONS, expected)
             for (label, mask), kind in zip(image, KEPT[name]) if kind in as_mask]
    regions = [region for task in decoded for region in task]
    assert [region["label"] for region in regions] == [label for label, _ in truth] == ["ring", "blob", "ring", "bar", "ring"]
    for region, (_, mask) in zip(regions, truth):
        np.testing.assert_array_equal(decode(region["rle"]), mask)


def test_brush_rle_round_trip_splits_long_runs():
    mask = np.zeros((300, 400), dtype=bool)  # 480000 bytes of 0s: runs longer than the 16-bit field
    mask[100:101, 7:9] = True
    encoded = encode_brush(mask)
    np.testing.assert_array_equal(decode_brush(encoded, "test").reshape(300, 400, 4)[:, :, 3] > 0, mask)
