"""Dataset checks: each problem found and named, statistics, the clean copy and the command-line tool."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from maskrcnn.cli import run
from maskrcnn.data.check import check_dataset, plot_statistics, write_clean
from maskrcnn.data.shapes import uncompressed_rle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_dataset as check_tool  # noqa: E402

H, W = 30, 40


def _box_mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _clean_coco():
    """Three 40x30 images: (1) a polygon cat and a polygon dog (areas 100 and 25), (2) a
    compressed-RLE dog (area 1080) and an uncompressed-RLE crowd, (3) none. Every bbox is that of its segmentation."""
    rle = mask_utils.encode(np.asfortranarray(_box_mask(2, 0, 38, 30).astype(np.uint8)))
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100, "bbox": [2, 2, 10, 10],
             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
            {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 25, "bbox": [20, 20, 5, 5],
             "segmentation": [[20, 20, 25, 20, 25, 25, 20, 25]]},
            {"id": 20, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 1080, "bbox": [2, 0, 36, 30],
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
            {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 50, "bbox": [30, 0, 10, 5],
             "segmentation": uncompressed_rle(_box_mask(30, 0, 40, 5))},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _write(root, data, images=True):
    """``data`` as ``root/ann.json`` and, with ``images``, grey PNGs for the images not yet there."""
    root.mkdir(parents=True, exist_ok=True)
    for image in data["images"] if images else []:
        path = root / "images" / image["file_name"]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(path)
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, root / "images"


def test_clean_dataset_has_no_problems_and_correct_statistics(tmp_path):
    result = check_dataset(*_write(tmp_path, _clean_coco()))
    assert result.problems == []
    assert result.stats["images"] == 3 and result.stats["instances"] == 3 and result.stats["crowd_regions"] == 1
    assert result.stats["instances_per_class"] == {"cat": 1, "dog": 2}
    assert result.stats["instances_per_image"] == {0: 1, 1: 1, 2: 1}
    assert result.stats["sizes"] == {"small": 2, "medium": 1, "large": 0}  # 32² = 1024 <= 1080 < 96²
    assert result.stats["image_sizes"] == [[W, H]] * 3


def _set(path, value):
    """A mutation setting ``data[path[0]][path[1]]...`` to ``value``."""
    def mutate(data, root):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _truncate_image(data, root):
    path = root / "images" / "2.png"
    path.write_bytes(path.read_bytes()[:60])


def _garbage_image(data, root):
    (root / "images" / "2.png").write_bytes(b"not an image at all")


def _missing_image(data, root):
    (root / "images" / "2.png").unlink()


def _resized_image(data, root):
    Image.fromarray(np.zeros((H, W + 1, 3), dtype=np.uint8)).save(root / "images" / "2.png")


def _duplicate(key, index):
    def mutate(data, root):
        data[key].append(copy.deepcopy(data[key][index]))
    return mutate


# (mutation, kind, image id, annotation id, text in the message)
CASES = [
    (_missing_image, "missing image", 2, None, "2.png not found"),
    (_garbage_image, "unreadable image", 2, None, "cannot read image file"),
    (_truncate_image, "unreadable image", 2, None, "cannot read image file"),
    (_resized_image, "image size mismatch", 2, None, "is 41x30 (WxH) but the json gives 40x30"),
    (_duplicate("images", 2), "duplicate image id", 3, None, "image id 3 appears twice"),
    (_set(["images", 2, "height"], 0), "bad image entry", 3, None, "positive integer 'height'"),
    (_duplicate("annotations", 1), "duplicate annotation id", 1, 11, "appears twice"),
    (_duplicate("categories", 1), "duplicate category id", None, None, "category id 2 appears twice"),
    (_set(["annotations", 0, "image_id"], 99), "unknown image id", 99, 10, "no image has this id"),
    (_set(["annotations", 0, "category_id"], 7), "unknown category", 1, 10, "unknown category id 7"),
    (_set(["annotations", 0, "bbox"], [2, 2, 0, 10]), "non-positive box size", 1, 10, "non-positive width"),
    (_set(["annotations", 0, "bbox"], [2, 2, "a", 10]), "malformed bbox", 1, 10, "not 4 finite numbers"),
    (_set(["annotations", 0, "bbox"], [30, 2, 12, 10]), "box outside image", 1, 10, "outside the 40x30 image"),
    (_set(["annotations", 0, "bbox"], [2, 2, 5, 10]), "bbox disagrees with segmentation", 1, 10, "IoU 0.50"),
    (_set(["annotations", 0, "segmentation"], [[2, 2, 12, 2]]), "polygon with fewer than 3 points", 1, 10,
     "fewer than 3 points"),
    (_set(["annotations", 0, "segmentation"], [[2, 2, 12, 2, 12]]), "malformed segmentation", 1, 10,
     "not a flat list"),
    (_set(["annotations", 0, "segmentation"], [[2, 2, 12, 2, 12, 33]]), "segmentation outside image", 1, 10,
     "polygon lies outside"),
    (_set(["annotations", 0, "segmentation"], [[2, 2, 7, 2, 12, 2]]), "empty segmentation", 1, 10,
     "covers no pixel"),
    (_set(["annotations", 0, "segmentation"], []), "missing segmentation", 1, 10, "missing segmentation"),
    (_set(["annotations", 2, "segmentation", "size"], [W, H]), "segmentation size mismatch", 2, 20,
     "RLE size [40, 30] differs"),
    (_set(["annotations", 2, "segmentation", "counts"], "0!!~"), "malformed segmentation", 2, 20,
     "compressed RLE counts do not decode"),
    (_set(["annotations", 2, "segmentation", "counts"], "0"), "malformed segmentation", 2, 20,
     "compressed RLE runs cover 0 pixels"),
    (_set(["annotations", 3, "segmentation", "counts"], [10, 20]), "malformed segmentation", 2, 21,
     "summing to 1200"),
]


@pytest.mark.parametrize("mutate, kind, image_id, ann_id, text", CASES,
                         ids=[f"{kind}-{i}" for i, (_, kind, *_) in enumerate(CASES)])
def test_each_problem_is_found_and_named(tmp_path, mutate, kind, image_id, ann_id, text):
    data = _clean_coco()
    _write(tmp_path, data)
    mutate(data, tmp_path)
    ann, images = _write(tmp_path, data, images=False)
    result = check_dataset(ann, images)
    errors = [p for p in result.errors if p.kind == kind]
    assert len(errors) == 1, result.problems
    error = errors[0]
    assert (error.image_id, error.annotation_id) == (image_id, ann_id)
    assert text in error.message and error.message.startswith(f"{ann}: ")
    if ann_id is not None:
        assert f"annotation id {ann_id} (image id {image_id})" in error.message
    elif image_id is not None:
        assert f"image id {image_id}" in error.message


def test_all_problems_are_listed_in_one_pass(tmp_path):
    data = _clean_coco()
    data["annotations"][0]["bbox"] = [2, 2, 0, 10]
    data["annotations"][2]["category_id"] = 7
    ann, images = _write(tmp_path, data)
    (images / "3.png").unlink()
    kinds = sorted(p.kind for p in check_dataset(ann, images).errors)
    assert kinds == ["missing image", "non-positive box size", "unknown category"]


def test_category_without_instances_and_repeated_file_name_are_warnings(tmp_path):
    data = _clean_coco()
    data["categories"].append({"id": 5, "name": "cow"})
    data["images"][2]["file_name"] = "2.png"
    result = check_dataset(*_write(tmp_path, data))
    assert result.errors == []
    duplicate, unused = result.warnings
    assert duplicate.kind == "duplicate file name" and "'2.png' is listed 2 times" in duplicate.message
    assert unused.kind == "category without instances" and "category id 5 ('cow')" in unused.message


def test_clean_copy_drops_bad_annotations_and_images_and_then_passes(tmp_path):
    data = _clean_coco()
    data["annotations"][1]["bbox"] = [20, 20, 0, 5]
    ann, images = _write(tmp_path, data)
    _truncate_image(data, tmp_path)
    result = check_dataset(ann, images)
    out = tmp_path / "clean.json"
    assert write_clean(ann, out, result) == {"images": 1, "annotations": 3}
    clean = json.loads(out.read_text())
    assert [a["id"] for a in clean["annotations"]] == [10]
    assert [im["id"] for im in clean["images"]] == [1, 3]
    again = check_dataset(out, images)
    assert again.errors == [] and again.stats["instances"] == 1
    with pytest.raises(ValueError, match="would overwrite the input"):
        write_clean(ann, ann, result)


def test_statistics_png_is_written(tmp_path):
    result = check_dataset(*_write(tmp_path, _clean_coco()))
    plot_statistics(result.stats, tmp_path / "out" / "stats.png")
    with Image.open(tmp_path / "out" / "stats.png") as img:
        assert img.size == (1100, 800)


def test_tool_exit_status_overlays_and_unusable_input(tmp_path, capsys):
    ann, images = _write(tmp_path, _clean_coco())
    out = tmp_path / "out"
    check_tool.main(["--ann", str(ann), "--images", str(images), "--output", str(out), "--draw", "2"])
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["1_1.png", "2_2.png"]
    overlay = np.asarray(Image.open(out / "overlays" / "1_1.png"))
    assert (overlay != 90).any(axis=2)[3:11, 3:11].all()  # the cat's fill changed its pixels
    assert (out / "dataset_stats.png").is_file()
    data = _clean_coco()
    data["annotations"][0]["category_id"] = 7
    ann.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(check_tool.main, ["--ann", str(ann), "--images", str(images), "--output", str(out)])
    assert info.value.code == 1 and "error: " in capsys.readouterr().out
    ann.write_text("{not json")
    with pytest.raises(SystemExit) as info:
        run(check_tool.main, ["--ann", str(ann), "--images", str(images), "--output", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "malformed JSON" in err
