"""labelme / CVAT / YOLO readers and the COCO writer, on fixtures written from each format's description."""

import base64
import io
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from maskrcnn.cli import run
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.formats import read_cvat, read_labelme, read_yolo, split_coco, to_coco, write_coco
from maskrcnn.data.formats.coco_writer import ELLIPSE_VERTICES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_dataset  # noqa: E402

H, W = 30, 40


def _image(path, height=H, width=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)


def _decode(segmentation, height=H, width=W):
    """A COCO segmentation (polygons or RLE) as an ``(H, W)`` bool mask, through pycocotools."""
    rles = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation, list) \
        else [segmentation]
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _unpack(conversion):
    return conversion.records, conversion.class_names


def _coco(conversion):
    return to_coco(conversion.records, conversion.class_names)


# ------------------------------------------------------------------------------------------- labelme

MASK_CROP = np.array([[0, 1, 1], [1, 1, 0]], dtype=bool)  # 3 wide, 2 high, at x 20..22, y 5..6


def _b64_png(array):
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _labelme_shape(label, shape_type, points, group_id=None, **extra):
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {},
            "description": "", **extra}


def _labelme_folder(root, shapes, image="pics/one.png"):
    """A labelme folder: ``root/one.json`` whose image lies at ``root/<image>`` (a path relative to it)."""
    _image(root / image)
    data = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image, "imageData": None,
            "imageHeight": H, "imageWidth": W}
    (root / "one.json").write_text(json.dumps(data))
    return root


def _labelme_all_types(root):
    return _labelme_folder(root, [
        _labelme_shape("cat", "polygon", [[2, 3], [12, 3], [12.5, 15], [2, 14]]),
        _labelme_shape("dog", "rectangle", [[30, 20], [25, 10]]),
        _labelme_shape("cat", "circle", [[10, 20], [14, 23]]),
        _labelme_shape("dog", "mask", [[20, 5], [22, 6]], mask=_b64_png(MASK_CROP)),
        _labelme_shape("cat", "polygon", [[30, 1], [35, 1], [35, 5]], group_id=7),
        _labelme_shape("cat", "polygon", [[36, 6], [39, 6], [39, 9]], group_id=7),
    ])


def test_labelme_shapes_become_coco_instances_matching_the_original_geometry(tmp_path):
    records, names = _unpack(read_labelme(_labelme_all_types(tmp_path / "lm")))
    coco = to_coco(records, names)
    assert names == ["cat", "dog"]
    assert coco["images"] == [{"id": 1, "file_name": "pics/one.png", "height": H, "width": W}]
    polygon, rectangle, circle, mask, group = coco["annotations"]
    assert polygon["segmentation"] == [[2, 3, 12, 3, 12.5, 15, 2, 14]]
    assert polygon["category_id"] == 1 and rectangle["category_id"] == 2
    assert rectangle["segmentation"] == [[25, 10, 30, 10, 30, 20, 25, 20]]
    assert rectangle["bbox"] == [25, 10, 5, 10] and rectangle["area"] == 50
    vertices = np.array(circle["segmentation"][0]).reshape(-1, 2)
    assert len(vertices) == ELLIPSE_VERTICES
    np.testing.assert_allclose(np.hypot(*(vertices - [10, 20]).T), 5.0)
    expected = np.zeros((H, W), dtype=bool)
    expected[5:7, 20:23] = MASK_CROP
    np.testing.assert_array_equal(_decode(mask["segmentation"]), expected)
    assert mask["bbox"] == [20, 5, 3, 2] and mask["area"] == 4
    assert group["segmentation"] == [[30, 1, 35, 1, 35, 5], [36, 6, 39, 6, 39, 9]]


def test_labelme_polygon_and_mask_parts_of_one_group_merge_into_one_rle(tmp_path):
    root = _labelme_folder(tmp_path / "lm", [
        _labelme_shape("dog", "polygon", [[0, 0], [10, 0], [10, 10], [0, 10]], group_id=1),
        _labelme_shape("dog", "mask", [[20, 5], [22, 6]], group_id=1, mask=_b64_png(MASK_CROP)),
        _labelme_shape("cat", "polygon", [[0, 0], [10, 0], [10, 10]], group_id=1),
    ])
    coco = _coco(read_labelme(root))
    assert len(coco["annotations"]) == 2  # same group id, other label: another instance
    expected = _decode([[0, 0, 10, 0, 10, 10, 0, 10]])
    expected[5:7, 20:23] |= MASK_CROP
    np.testing.assert_array_equal(_decode(coco["annotations"][0]["segmentation"]), expected)


def test_converted_labelme_loads_in_the_training_dataset(tmp_path):
    root = _labelme_all_types(tmp_path / "lm")
    out = tmp_path / "instances.json"
    write_coco(out, _coco(read_labelme(root)))
    dataset = CocoDetection(out, root)
    image, target = dataset[0]
    assert image.shape == (3, H, W)
    assert target["labels"].tolist() == [1, 2, 1, 2, 1]
    assert dataset.class_names == ["cat", "dog"]


@pytest.mark.parametrize("shape, message", [
    (_labelme_shape("cat", "cuboid", [[1, 1], [5, 5]]), "shape 0 (cuboid 'cat'): unsupported shape type 'cuboid'"),
    (_labelme_shape("cat", "polygon", [[1, 1], [5, 5]]), "shape 0 (polygon 'cat'): 2 points, at least 3"),
    (_labelme_shape("cat", "polygon", [[1, 1], [5, 5], [42.5, 5]]), "outside the 40x30 image"),
    (_labelme_shape("cat", "mask", [[20, 5], [23, 6]], mask=_b64_png(MASK_CROP)), "mask image is 3x2"),
    (_labelme_shape("", "polygon", [[1, 1], [5, 5], [5, 1]]), "missing label"),
])
def test_labelme_bad_shape_is_named_with_file_and_index(tmp_path, shape, message):
    root = _labelme_folder(tmp_path / "lm", [shape])
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        read_labelme(root)
    assert str(root / "one.json") in str(info.value)


def test_labelme_point_just_outside_within_a_pixel_is_clipped(tmp_path):
    root = _labelme_folder(tmp_path / "lm", [_labelme_shape("cat", "polygon", [[-0.5, 1], [40.8, 1], [20, 30.9]])])
    coco = _coco(read_labelme(root))
    assert coco["annotations"][0]["segmentation"] == [[0, 1, 40, 1, 20, 30]]


def test_labelme_label_outside_the_class_list_is_an_error(tmp_path):
    root = _labelme_folder(tmp_path / "lm", [_labelme_shape("cow", "polygon", [[1, 1], [5, 5], [5, 1]])])
    with pytest.raises(ValueError, match=r"shape 0 \(polygon 'cow'\): label 'cow' is not in the class list"):
        read_labelme(root, class_names=["cat", "dog"])


def test_labelme_missing_image_is_named(tmp_path):
    root = _labelme_folder(tmp_path / "lm", [_labelme_shape("cat", "polygon", [[1, 1], [5, 5], [5, 1]])])
    (root / "pics" / "one.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"one.json: image .*one.png not found"):
        read_labelme(root)


# ---------------------------------------------------------------------------------------------- CVAT


def _cvat_runs(crop):
    """CVAT's mask rle: row-major run lengths of the crop, starting with a run of 0s."""
    flat = crop.reshape(-1).astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _cvat_file(root, shapes_xml, labels=("cat", "dog"), height=H, width=W):
    _image(root / "images" / "a.png", height, width)
    label_xml = "".join(f"<label><name>{name}</name><color>#ff0000</color><attributes/></label>"
                        for name in labels)
    text = (f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>'
            f'<meta><task><id>1</id><name>t</name><labels>{label_xml}</labels></task></meta>'
            f'<image id="0" name="a.png" width="{width}" height="{height}">{shapes_xml}</image></annotations>')
    path = root / "annotations.xml"
    path.write_text(text)
    return path


def test_cvat_polygon_box_and_mask_match_the_original_geometry(tmp_path):
    crop = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)  # 4 wide, 3 high at (5, 20)
    rle = ", ".join(map(str, _cvat_runs(crop)))
    path = _cvat_file(tmp_path / "cvat", (
        '<polygon label="cat" source="manual" occluded="0" points="2.5,3.0;12.0,3.0;12.0,15.0" z_order="0"/>'
        '<box label="dog" source="manual" occluded="0" xtl="20" ytl="4" xbr="30" ybr="8" z_order="0"/>'
        '<box label="dog" occluded="0" xtl="20" ytl="10" xbr="30" ybr="14" rotation="90" z_order="0"/>'
        f'<mask label="cat" source="manual" occluded="0" rle="{rle}" left="5" top="20" width="4" height="3" '
        'z_order="0"/>'
        '<tag label="dog" source="manual"/>'))
    records, names = _unpack(read_cvat(path))
    coco = to_coco(records, names)
    assert names == ["cat", "dog"] and coco["images"][0]["file_name"] == "a.png"
    polygon, box, turned, mask = coco["annotations"]
    assert polygon["segmentation"] == [[2.5, 3, 12, 3, 12, 15]] and polygon["category_id"] == 1
    assert box["segmentation"] == [[20, 4, 30, 4, 30, 8, 20, 8]] and box["category_id"] == 2
    np.testing.assert_allclose(np.array(turned["segmentation"][0]).reshape(-1, 2),
                               [[27, 7], [27, 17], [23, 17], [23, 7]], atol=1e-9)
    expected = np.zeros((H, W), dtype=bool)
    expected[20:23, 5:9] = crop
    np.testing.assert_array_equal(_decode(mask["segmentation"]), expected)


def test_cvat_rotated_box_turns_clockwise_on_screen_as_an_opencv_rotated_rect(tmp_path):
    """CVAT's ``rotation``: degrees, clockwise on screen (y down), about the box centre. Oracle: the corners
    of OpenCV's RotatedRect of the same centre, size and angle, which turns the same way. The 20 x 6 box
    turned by 30 degrees has its right end below its centre; turned the other way, above."""
    path = _cvat_file(tmp_path / "cvat", '<box label="dog" xtl="10" ytl="12" xbr="30" ybr="18" rotation="30"/>')
    corners = np.array(_coco(read_cvat(path))["annotations"][0]["segmentation"][0]).reshape(4, 2)
    expected = cv2.boxPoints(((20, 15), (20, 6), 30))
    np.testing.assert_allclose(sorted(corners.tolist()), sorted(expected.tolist()), atol=1e-5)
    assert corners[np.argmax(corners[:, 0]), 1] > 15


def test_cvat_rotated_ellipse_covers_what_cvat_draws(tmp_path):
    """CVAT turns an ellipse as a box (degrees, clockwise on screen, about the centre) and makes its mask
    with OpenCV's ``cv2.ellipse`` at the same angle (its own export to masks). Radii 40 x 12 turned by 30
    degrees: our polygon and that mask differ at boundary pixels only (IoU 0.94); the ellipse turned by -30
    degrees overlaps it by IoU 0.26."""
    height, width = 100, 120
    path = _cvat_file(tmp_path / "cvat", '<ellipse label="cat" cx="60" cy="50" rx="40" ry="12" rotation="30"/>',
                      height=height, width=width)
    mask = _decode(_coco(read_cvat(path))["annotations"][0]["segmentation"], height, width)
    drawn = cv2.ellipse(np.zeros((height, width), np.uint8), (60, 50), (40, 12), 30, 0, 360, 1, thickness=-1) > 0
    assert (mask & drawn).sum() / (mask | drawn).sum() > 0.9


def test_cvat_group_id_joins_shapes_into_one_instance(tmp_path):
    path = _cvat_file(tmp_path / "cvat", (
        '<polygon label="cat" points="1,1;5,1;5,5" group_id="3" z_order="0"/>'
        '<polygon label="cat" points="10,10;15,10;15,15" group_id="3" z_order="0"/>'
        '<polygon label="cat" points="20,20;25,20;25,25" z_order="0"/>'))
    coco = _coco(read_cvat(path))
    assert [len(a["segmentation"]) for a in coco["annotations"]] == [2, 1]


@pytest.mark.parametrize("shape_xml, message", [
    ('<cube label="cat" points="1,1;5,5;9,1"/>', r"shape 0 \(cube 'cat'\): unsupported element <cube>"),
    ('<polygon label="cat" points="1,1;5,5"/>', r"shape 0 \(polygon 'cat'\): 2 points, at least 3"),
    ('<polygon label="cat" points="1,1;5,5;5,33"/>', "outside the 40x30 image"),
    ('<polygon label="cow" points="1,1;5,5;5,1"/>', r"label 'cow' is not in the class list \['cat', 'dog'\]"),
    ('<mask label="cat" rle="1, 2" left="0" top="0" width="2" height="2"/>', "rle runs sum to 3, expected"),
])
def test_cvat_bad_shape_is_named_with_file_image_and_index(tmp_path, shape_xml, message):
    path = _cvat_file(tmp_path / "cvat", shape_xml)
    with pytest.raises(ValueError, match=message) as info:
        read_cvat(path)
    assert f"{path}: image 'a.png'" in str(info.value)


def test_cvat_missing_image_is_named(tmp_path):
    path = _cvat_file(tmp_path / "cvat", "")
    (path.parent / "images" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image 'a.png': image .*a.png not found"):
        read_cvat(path)


# ---------------------------------------------------------------------------------------------- YOLO


def _yolo_folder(root, lines, names="names:\n  0: cat\n  1: dog\n"):
    _image(root / "images" / "train" / "a.png")
    _image(root / "images" / "val" / "b.png")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\n{names}")
    return root


def test_yolo_polygons_and_boxes_are_denormalised(tmp_path):
    root = _yolo_folder(tmp_path / "yolo", ["1 0.1 0.1 0.5 0.1 0.5 0.5", "0 0.5 0.5 0.25 0.2"])
    records, names = _unpack(read_yolo(root))
    coco = to_coco(records, names)
    assert names == ["cat", "dog"]
    assert [im["file_name"] for im in coco["images"]] == ["images/train/a.png", "images/val/b.png"]
    polygon, box = coco["annotations"]
    np.testing.assert_allclose(polygon["segmentation"][0], [4, 3, 20, 3, 20, 15])
    assert polygon["category_id"] == 2 and box["category_id"] == 1
    np.testing.assert_allclose(box["segmentation"][0], [15, 12, 25, 12, 25, 18, 15, 18])
    assert all(a["image_id"] == 1 for a in coco["annotations"])  # b.png has no label file: no instances


def test_yolo_names_as_a_list(tmp_path):
    root = _yolo_folder(tmp_path / "yolo", ["1 0.1 0.1 0.5 0.1 0.5 0.5"], names="names: [cat, dog]\n")
    assert read_yolo(root).class_names == ["cat", "dog"]


@pytest.mark.parametrize("line, message", [
    ("2 0.1 0.1 0.5 0.1 0.5 0.5", "a.txt: line 1: class index 2 is not one of the 2 names"),
    ("0 0.1 0.1 0.5 0.1 0.5", "a.txt: line 1: odd number of coordinates"),
    ("0 0.1 0.1", r"a.txt: line 1 \(polygon 'cat'\): 1 points, at least 3"),
    ("0 0.1 0.1 0.5 0.1 0.5 1.1", "outside the 40x30 image"),
])
def test_yolo_bad_line_is_named_with_file_and_line(tmp_path, line, message):
    root = _yolo_folder(tmp_path / "yolo", [line])
    with pytest.raises(ValueError, match=message):
        read_yolo(root)


def test_yolo_label_file_without_image_is_an_error(tmp_path):
    root = _yolo_folder(tmp_path / "yolo", ["0 0.1 0.1 0.5 0.1 0.5 0.5"])
    (root / "labels" / "train" / "zz.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    with pytest.raises(FileNotFoundError, match="zz.txt: no image of this name"):
        read_yolo(root)


# ------------------------------------------------------------------------------------ split and tool


def test_split_is_a_seeded_partition_of_the_images(tmp_path):
    records, names = _unpack(read_yolo(_yolo_folder(tmp_path / "yolo", ["1 0.1 0.1 0.5 0.1 0.5 0.5"])))
    coco = to_coco(records * 5, names)  # 10 images, 5 with an instance
    train, val = split_coco(coco, 0.3, seed=1)
    train_ids, val_ids = {im["id"] for im in train["images"]}, {im["id"] for im in val["images"]}
    assert len(val_ids) == 3 and not train_ids & val_ids and train_ids | val_ids == set(range(1, 11))
    assert {a["image_id"] for a in val["annotations"]} <= val_ids
    assert len(train["annotations"]) + len(val["annotations"]) == 5
    assert split_coco(coco, 0.3, seed=1)[1] == val and split_coco(coco, 0.3, seed=2)[1] != val


def test_tool_writes_train_and_val_files(tmp_path, capsys):
    root = _labelme_all_types(tmp_path / "lm")
    _labelme_folder(root / "more", [_labelme_shape("dog", "rectangle", [[1, 1], [9, 9]])], image="two.png")
    convert_dataset.main(["--from", "labelme", str(root), "--out", str(tmp_path / "inst.json"),
                          "--val-fraction", "0.5"])
    out = capsys.readouterr().out
    assert f"train: {tmp_path / 'inst_train.json'}" in out and f"val: {tmp_path / 'inst_val.json'}" in out
    train, val = (json.loads((tmp_path / f"inst_{s}.json").read_text()) for s in ("train", "val"))
    assert sorted(im["file_name"] for im in train["images"] + val["images"]) == ["more/two.png", "pics/one.png"]


def test_tool_reports_bad_input_in_one_line_and_exits_2(tmp_path, capsys):
    root = _labelme_folder(tmp_path / "lm", [_labelme_shape("cat", "cuboid", [[1, 1]])])
    with pytest.raises(SystemExit) as info:
        run(convert_dataset.main, ["--from", "labelme", str(root), "--out", str(tmp_path / "x.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "unsupported shape type 'cuboid'" in err
    assert not (tmp_path / "x.json").exists()


def test_tool_classes_file_fixes_the_category_order(tmp_path):
    root = _labelme_all_types(tmp_path / "lm")
    (tmp_path / "names.txt").write_text("dog\n\ncat\nbird\n")
    convert_dataset.main(["--from", "labelme", str(root), "--out", str(tmp_path / "inst.json"),
                          "--classes", str(tmp_path / "names.txt")])
    coco = json.loads((tmp_path / "inst.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "dog"), (2, "cat"), (3, "bird")]
    assert [a["category_id"] for a in coco["annotations"]] == [2, 1, 2, 1, 2]
