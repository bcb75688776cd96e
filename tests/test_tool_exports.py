"""The readers on exports made by the annotation tools themselves or by well-kept converters
(``tests/fixtures/``, sources and licences in its README), and on the layouts those tools write beside them:
labelme's ``__ignore__`` regions, ``labels.txt`` and area-less shapes; CVAT project subsets, ellipses and
skipped elements; Ultralytics ``data.yaml`` subsets."""

import base64
import io
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from maskrcnn.cli import run
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.formats import read_cvat, read_labelme, read_yolo, to_coco
from maskrcnn.evaluation.coco_evaluator import evaluate_results, load_coco

FIXTURES = Path(__file__).resolve().parent / "fixtures"
convert = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "convert_dataset.py"))["main"]


def _copy(name, tmp_path):
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _labelme_images(folder):
    """Grey images of the size each labelme file gives (the fixtures keep only the json)."""
    for path in folder.glob("*.json"):
        data = json.loads(path.read_text())
        Image.new("RGB", (data["imageWidth"], data["imageHeight"]), (128, 128, 128)).save(
            path.parent / data["imagePath"])
    return folder


def _convert(*args):
    convert([str(a) for a in args])


# -------------------------------------------------------------------------- labelme's own examples

def test_labelme_ignore_regions_and_labels_txt_become_crowd_regions_not_classes(tmp_path, capsys):
    folder = _labelme_images(_copy("labelme_instance_segmentation", tmp_path))
    _convert("--from", "labelme", folder, "--out", tmp_path / "inst.json", "--classes", folder / "labels.txt")
    coco = json.loads((tmp_path / "inst.json").read_text())
    voc = (folder / "labels.txt").read_text().splitlines()[2:]
    assert [c["name"] for c in coco["categories"]] == voc and len(voc) == 20
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert len(crowd) == 2 * 20  # one __ignore__ shape in 2011_000003 and one in 2011_000006, every category
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert all(isinstance(a["segmentation"], dict) for a in crowd)  # crowd regions are RLE
    assert {a["category_id"] for a in crowd} == set(range(1, 21))
    objects = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert len(objects) == 3 + 6 + 3  # group 0: 2 shapes are one person (2011_000003), 4 one sofa (2011_000006)
    assert "2 ignore regions, 20 classes" in capsys.readouterr().out
    assert "__ignore__" not in read_labelme(folder).class_names  # without a class list, too


def test_labelme_ignore_region_is_left_out_of_training_targets_and_evaluation(tmp_path):
    folder = _labelme_images(_copy("labelme_instance_segmentation", tmp_path))
    _convert("--from", "labelme", folder, "--out", tmp_path / "inst.json", "--classes", folder / "labels.txt")
    dataset = CocoDetection(tmp_path / "inst.json", folder)
    index = dataset.image_ids.index(1)  # 2011_000003: person, person, bottle and an __ignore__ region
    _, target = dataset[index]
    assert target["labels"].tolist() == [15, 15, 5]
    ignore = [a for a in json.loads((tmp_path / "inst.json").read_text())["annotations"]
              if a["iscrowd"] and a["image_id"] == 1]
    x, y, w, h = ignore[0]["bbox"]
    assert len(target["crowd_boxes"]) == 20
    np.testing.assert_allclose(target["crowd_boxes"][0].tolist(), [x, y, x + w, y + h], atol=1e-3)

    coco_gt = load_coco(tmp_path / "inst.json")
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 375 if a["image_id"] > 1
                                                                        else 338, 500))}
               for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    on_ignore = [{"image_id": 1, "category_id": 15, "bbox": ignore[0]["bbox"], "score": 0.9,
                  "segmentation": ignore[0]["segmentation"]}]
    for result in (perfect, perfect + on_ignore):
        metrics = evaluate_results(coco_gt, result, verbose=False)
        assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_labelme_primitives_skip_line_point_and_linestrip_with_one_line_each(tmp_path, capsys):
    folder = _labelme_images(_copy("labelme_primitives", tmp_path))
    _convert("--from", "labelme", folder, "--out", tmp_path / "inst.json")
    out = capsys.readouterr().out
    assert "skipped 1 labelme line shape in 1 file (no area)" in out
    assert "skipped 1 labelme linestrip shape in 1 file (no area)" in out
    assert "skipped 1 labelme point shape in 1 file (no area)" in out
    coco = json.loads((tmp_path / "inst.json").read_text())
    assert len(coco["annotations"]) == 5  # 2 rectangles, a circle, a polygon and a mask
    assert sorted(c["name"] for c in coco["categories"]) == ["circle", "octagon", "polygon", "rectangle"]


def test_labelme_strict_makes_a_line_an_error_and_writes_nothing(tmp_path, capsys):
    folder = _labelme_images(_copy("labelme_primitives", tmp_path))
    with pytest.raises(SystemExit):
        run(convert, ["--from", "labelme", str(folder), "--out", str(tmp_path / "inst.json"), "--strict"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "primitives.json: shape 4 (line 'line'): no area" in err
    assert not (tmp_path / "inst.json").exists()


def _embedded_labelme(folder, image_data, image_path="cat.png"):
    folder.mkdir()
    shape = {"label": "cat", "points": [[2, 2], [20, 2], [20, 12]], "group_id": None, "shape_type": "polygon"}
    (folder / "cat.json").write_text(json.dumps({"version": "5.5.0", "shapes": [shape], "imagePath": image_path,
                                                 "imageData": image_data, "imageHeight": 16,
                                                 "imageWidth": 24}))


def test_labelme_image_embedded_in_the_json_is_written_beside_it(tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    _embedded_labelme(tmp_path / "lm", base64.b64encode(buffer.getvalue()).decode(), image_path="pics/cat.png")
    _convert("--from", "labelme", tmp_path / "lm", "--out", tmp_path / "inst.json")
    assert (tmp_path / "lm" / "pics" / "cat.png").read_bytes() == buffer.getvalue()
    assert "1 images written beside their labelme files" in capsys.readouterr().out
    image, target = CocoDetection(tmp_path / "inst.json", tmp_path / "lm")[0]
    np.testing.assert_array_equal((image.permute(1, 2, 0) * 255).round().byte().numpy(), pixels)


def test_labelme_embedded_data_that_is_no_image_is_named_and_nothing_is_written(tmp_path, capsys):
    _embedded_labelme(tmp_path / "lm", base64.b64encode(b"not an image").decode())
    with pytest.raises(SystemExit):
        run(convert, ["--from", "labelme", str(tmp_path / "lm"), "--out", str(tmp_path / "inst.json")])
    assert "cat.json: imageData: the embedded image does not decode" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["cat.json"]


# ------------------------------------------------------------------------ CVAT's exports (Datumaro)

def test_cvat_project_export_gives_one_coco_file_per_subset(tmp_path, capsys):
    folder = _copy("cvat_project", tmp_path)
    _convert("--from", "cvat", folder / "annotations.xml", "--out", tmp_path / "inst.json")
    out = capsys.readouterr().out
    assert "skipped 3 CVAT points shapes in 1 file (no outline of an object)" in out
    assert "skipped 3 CVAT polyline shapes in 1 file (no outline of an object)" in out
    for subset in ("Train", "Test", "Validation"):
        coco = json.loads((tmp_path / f"inst_{subset}.json").read_text())
        assert [(im["file_name"], im["width"]) for im in coco["images"]] == [(f"{subset}/img0.jpg", 8),
                                                                              (f"{subset}/img1.jpg", 10)]
        box, polygon = coco["annotations"]
        assert box["bbox"] == [0, 2, 4, 2] and polygon["segmentation"] == [[1, 2, 3, 4, 6, 5]]
        assert [c["name"] for c in coco["categories"]] == ["label1", "label2"]
        assert len(CocoDetection(tmp_path / f"inst_{subset}.json", folder / "images")) == 2
    assert f"Train: {tmp_path / 'inst_Train.json'}" in out


def test_cvat_subsets_refuse_a_random_split(tmp_path, capsys):
    folder = _copy("cvat_project", tmp_path)
    with pytest.raises(SystemExit):
        run(convert, ["--from", "cvat", str(folder / "annotations.xml"), "--out", str(tmp_path / "i.json"),
                      "--val-fraction", "0.5"])
    assert "already splits its images into subsets ['Test', 'Train', 'Validation']" in capsys.readouterr().err
    assert not list(tmp_path.glob("i*.json"))


def test_cvat_task_export_skips_unlabelled_shapes_polylines_and_points(tmp_path, capsys):
    folder = _copy("cvat_task", tmp_path)
    conversion = read_cvat(folder / "train.xml")
    assert conversion.skipped.lines() == [
        "skipped 1 CVAT points shape in 1 file (no outline of an object)",
        "skipped 1 CVAT polyline shape in 1 file (no outline of an object)",
        "skipped 1 CVAT unlabelled polygon shape in 1 file (no label)"]
    coco = to_coco(conversion.records, conversion.class_names)
    assert [a["bbox"] for a in coco["annotations"]] == [[0, 2, 4, 2]]
    with pytest.raises(ValueError, match=r"image 'img0.jpg': shape 1 \(polyline ''\): no outline of an object"):
        read_cvat(folder / "train.xml", strict=True)


def test_cvat_ellipse_converts_and_skeleton_and_tag_are_skipped(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    (tmp_path / "annotations.xml").write_text(
        '<annotations><version>1.1</version><meta><task><labels><label><name>egg</name><type>ellipse</type>'
        '</label><label><name>hand</name><type>skeleton</type></label><label><name>wrist</name><type>points'
        '</type><parent>hand</parent></label></labels></task></meta>'
        '<image id="0" name="a.png" width="64" height="48">'
        '<ellipse label="egg" cx="30" cy="20" rx="12" ry="6" rotation="30" z_order="0"/>'
        '<skeleton label="hand"><points label="wrist" points="3,4"/></skeleton><tag label="egg"/>'
        '</image></annotations>')
    conversion = read_cvat(tmp_path / "annotations.xml")
    assert conversion.class_names == ["egg"]
    assert conversion.skipped.lines() == ["skipped 1 CVAT skeleton shape in 1 file (no outline of an object)",
                                          "skipped 1 CVAT tag shape in 1 file (no outline of an object)"]
    (egg,) = to_coco(conversion.records, conversion.class_names)["annotations"]
    assert egg["area"] == pytest.approx(np.pi * 12 * 6, rel=0.03)
    x, y, w, h = egg["bbox"]
    half_w = np.hypot(12 * np.cos(np.pi / 6), 6 * np.sin(np.pi / 6))  # extent of an ellipse turned 30 degrees
    assert x + w / 2 == pytest.approx(30, abs=1) and w == pytest.approx(2 * half_w, abs=1.5)


# ---------------------------------------------------------------------------- YOLO (Ultralytics)

def _yolo_images(folder, size):
    for label in folder.rglob("*.txt"):
        if "labels" in label.parts:
            image = Path(*["images" if p == "labels" else p for p in label.parts]).with_suffix(".jpg")
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size).save(image)


def test_yolo_ultralytics_data_yaml_subsets_are_honoured(tmp_path, capsys):
    folder = _copy("yolo_coco8_seg", tmp_path)
    _yolo_images(folder, (64, 40))
    _convert("--from", "yolo", folder / "data.yaml", "--out", tmp_path / "inst.json")
    train = json.loads((tmp_path / "inst_train.json").read_text())
    val = json.loads((tmp_path / "inst_val.json").read_text())
    assert [im["file_name"] for im in train["images"]] == ["images/train/000000000009.jpg"]
    assert [im["file_name"] for im in val["images"]] == ["images/val/000000000036.jpg"]
    assert len(train["categories"]) == 80 and train["categories"][45]["name"] == "bowl"
    assert [a["category_id"] for a in train["annotations"]] == [46, 51]
    np.testing.assert_allclose(train["annotations"][0]["segmentation"][0],
                               [6.4, 8, 25.6, 8, 25.6, 24, 6.4, 24])


def test_yolo_list_files_as_cvat_writes_them(tmp_path):
    _yolo_images(_copy("yolo_coco8_seg", tmp_path), (64, 40))
    folder = tmp_path / "yolo_coco8_seg"
    (folder / "train.txt").write_text("images/train/000000000009.jpg\n")
    (folder / "val.txt").write_text("./images/val/000000000036.jpg\n")
    (folder / "data.yaml").write_text("path: .\ntrain: train.txt\nval: val.txt\nnames:\n  0: a\n")
    (folder / "labels" / "train" / "000000000009.txt").write_text("0 0.1 0.2 0.4 0.2 0.4 0.6\n")
    (folder / "labels" / "val" / "000000000036.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    conversion = read_yolo(folder)
    assert [(r.subset, r.file_name, len(r.instances)) for r in conversion.records] == [
        ("train", "images/train/000000000009.jpg", 1), ("val", "images/val/000000000036.jpg", 1)]


def test_yolo_roboflow_export_names_its_missing_val_folder_and_reads_once_fixed(tmp_path):
    folder = _copy("yolo_roboflow", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data.yaml: val: .*valid/images is neither a folder"):
        read_yolo(folder)
    (folder / "data.yaml").write_text((folder / "data.yaml").read_text().replace("valid", "val"))
    conversion = read_yolo(folder)
    assert [(r.subset, r.file_name, r.width, r.height) for r in conversion.records] == [
        ("train", "train/images/train_001.jpg", 10, 5), ("train", "train/images/train_002.jpg", 10, 5),
        ("val", "val/images/val_001.jpg", 10, 5)]
    coco = to_coco(conversion.records, conversion.class_names)
    np.testing.assert_allclose(coco["annotations"][0]["bbox"], [2, 1, 3, 1], atol=1e-6)  # 0 0.35 0.3 0.3 0.2
