import copy
import json
import os
import pickle
import time
import warnings

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools.coco import COCO

from maskrcnn.config import Config
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.shapes import generate_shapes, uncompressed_rle
from maskrcnn.data.transforms import RandomHorizontalFlip, ResizeShortestEdge, build_transforms
from maskrcnn.structures import BitMasks, PolygonMasks


# ---------------------------------------------------------------- a hand-written dataset


def _rle_of_box(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _tiny_coco():
    """Four images: (1) a polygon and a compressed RLE instance, (2) a polygon instance and an uncompressed
    RLE crowd, (3) nothing, (4) only a crowd. Category ids 2, 5, 9 named b, a, c."""
    rle = mask_utils.encode(np.asfortranarray(_rle_of_box(40, 60, 30, 5, 50, 25)))
    return {
        "images": [
            {"id": 1, "file_name": "one.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "two.png", "height": 50, "width": 30},
            {"id": 3, "file_name": "three.png", "height": 30, "width": 30},
            {"id": 4, "file_name": "four.png", "height": 30, "width": 40},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 5, "bbox": [2, 3, 10, 12], "iscrowd": 0, "area": 120,
             "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]]},
            {"id": 11, "image_id": 1, "category_id": 9, "bbox": [30, 5, 20, 20], "iscrowd": 0, "area": 400,
             "segmentation": {"size": [40, 60], "counts": rle["counts"].decode("utf-8")}},
            {"id": 20, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 20], "iscrowd": 0, "area": 200,
             "segmentation": [[5, 5, 15, 5, 15, 25, 5, 25]]},
            {"id": 21, "image_id": 2, "category_id": 2, "bbox": [0, 30, 30, 20], "iscrowd": 1, "area": 600,
             "segmentation": uncompressed_rle(_rle_of_box(50, 30, 0, 30, 30, 50).astype(bool))},
            {"id": 40, "image_id": 4, "category_id": 9, "bbox": [1, 1, 8, 8], "iscrowd": 1, "area": 64,
             "segmentation": uncompressed_rle(_rle_of_box(30, 40, 1, 1, 9, 9).astype(bool))},
        ],
        "categories": [{"id": 5, "name": "a"}, {"id": 2, "name": "b"}, {"id": 9, "name": "c"}],
    }


def _write(root, data, images=True):
    """Write ``data`` as ``root/ann.json`` and (if ``images``) random PNGs of the listed sizes."""
    image_dir = root / "images"
    image_dir.mkdir(exist_ok=True)
    if images:
        rng = np.random.default_rng(0)
        for image in data["images"]:
            pixels = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
            cv2.imwrite(str(image_dir / image["file_name"]), pixels)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


@pytest.fixture
def tiny(tmp_path):
    return _write(tmp_path, _tiny_coco())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, num_train=30, num_val=2, seed=0, min_size=64, max_size=112)
    return out / "annotations" / "instances_train.json", out / "train"


# ---------------------------------------------------------------- contents


def test_category_ids_map_to_contiguous_labels_in_id_order(tiny):
    ds = CocoDetection(*tiny)
    assert ds.cat_id_to_label == {2: 1, 5: 2, 9: 3}
    assert ds.label_to_cat_id == {1: 2, 2: 5, 3: 9}
    assert ds.class_names == ["b", "a", "c"]
    _, target = ds[0]
    assert [ds.label_to_cat_id[int(label)] for label in target["labels"]] == [5, 9]
    assert target["labels"].dtype == torch.int64


def test_targets_agree_with_pycocotools(shapes):
    ann_file, image_dir = shapes
    ds = CocoDetection(ann_file, image_dir)
    coco = COCO(str(ann_file))
    kinds = set()
    for index, image_id in enumerate(ds.image_ids):
        image, target = ds[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        instances = [a for a in anns if not a["iscrowd"]]
        crowds = [a for a in anns if a["iscrowd"]]
        info = coco.imgs[image_id]
        assert target["image_id"] == image_id
        assert target["orig_size"] == (info["height"], info["width"])
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in instances)]
        assert torch.equal(target["boxes"], torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4))
        assert torch.equal(target["crowd_boxes"], torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in crowds)], dtype=torch.float32).reshape(-1, 4))
        labels = [ds.cat_id_to_label[a["category_id"]] for a in instances]
        assert target["labels"].tolist() == labels
        all_polygons = all(isinstance(a["segmentation"], list) for a in instances)
        masks = target["masks"]
        assert isinstance(masks, PolygonMasks if all_polygons else BitMasks)
        kinds.add(type(masks))
        bits = masks.to_bitmasks().tensor if isinstance(masks, PolygonMasks) else masks.tensor
        expected = np.stack([coco.annToMask(a) for a in instances]) if instances else np.zeros((0, *image.shape[1:]))
        np.testing.assert_array_equal(bits.numpy(), expected.astype(bool))
    assert kinds == {PolygonMasks, BitMasks}


def test_image_is_float_rgb_in_unit_range(tiny):
    ann_file, image_dir = tiny
    image, _ = CocoDetection(ann_file, image_dir)[1]
    bgr = cv2.imread(str(image_dir / "two.png"))
    assert image.dtype == torch.float32 and image.shape == (3, 50, 30) and image.is_contiguous()
    expected = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(image, expected)


def test_crowd_regions_go_to_crowd_boxes_only(tiny):
    _, target = CocoDetection(*tiny)[1]
    assert target["boxes"].tolist() == [[5, 5, 15, 25]]
    assert target["crowd_boxes"].tolist() == [[0, 30, 30, 50]]
    assert len(target["masks"]) == 1


def test_empty_images_are_kept_by_default(tiny):
    ds = CocoDetection(*tiny)
    assert ds.image_ids == [1, 2, 3, 4]
    _, target = ds[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and len(target["masks"]) == 0
    assert ds.image_sizes == [(40, 60), (50, 30), (30, 30), (30, 40)]


def test_drop_empty_drops_images_without_non_crowd_instances(tiny):
    ds = CocoDetection(*tiny)
    assert ds.image_ids == [1, 2, 3, 4]
    ds.drop_empty()
    assert ds.image_ids == [1, 2]
    assert [ds.record(i)["image_id"] for i in range(len(ds))] == [1, 2]


def test_box_and_polygon_within_tolerance_are_clipped(tmp_path):
    data = _tiny_coco()
    data["annotations"][2].update(bbox=[-0.5, 5, 10, 20], segmentation=[[-0.5, 5, 30.8, 5, 15, 25]])
    _, target = CocoDetection(*_write(tmp_path, data))[1]
    assert target["boxes"][0].tolist() == [0, 5, 9.5, 25]
    assert target["masks"].polygons[0][0].tolist() == [0, 5, 30, 5, 15, 25]


# ---------------------------------------------------------------- bad input


BAD_ANNOTATIONS = {
    "polygon with fewer than 3 points": {"segmentation": [[2, 3, 12, 3]]},
    "box outside image": {"bbox": [50, 3, 20, 12]},
    "segmentation outside image": {"segmentation": [[2, 3, 75, 3, 12, 15]]},
    "non-positive box size": {"bbox": [2, 3, 0, 12]},
    "unknown category id": {"category_id": 4},
    "segmentation size mismatch": {"segmentation": {"size": [41, 60], "counts": "PX1"}},
    "malformed bbox": {"bbox": [2, 3, 10]},
    "malformed segmentation": {"segmentation": [[2, "3", 12, 3, 12, 15]]},
    "missing segmentation": {"segmentation": []},
}


# Compressed RLE of the 60 x 40 image 1: runs that miss the image size, and strings that do not decode.
BAD_COMPRESSED_RLE = {
    "runs short of the image": ("0`0", "cover 2400 pixels|cover .* pixels"),
    "character outside the alphabet": ("PX1~~", "do not decode: character '~'"),
    "cut off inside a run": ("Pm", "do not decode: the counts string ends inside a run length"),
    "negative run": ("@", "do not decode: run 0 has a negative length"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMPRESSED_RLE))
def test_bad_compressed_rle_is_refused_at_load(tmp_path, case):
    counts, message = BAD_COMPRESSED_RLE[case]
    data = _tiny_coco()
    data["annotations"][1]["segmentation"] = {"size": [40, 60], "counts": counts}
    ann_file, image_dir = _write(tmp_path, data, images=False)
    with pytest.raises(ValueError, match=message) as info:
        CocoDetection(ann_file, image_dir)
    assert str(ann_file) in str(info.value) and "annotation id 11 (image id 1)" in str(info.value)


def test_compressed_rle_of_the_wrong_length_is_refused_at_load(tmp_path):
    data = _tiny_coco()
    short = mask_utils.encode(np.asfortranarray(_rle_of_box(40, 59, 30, 5, 50, 25)))  # one column short
    data["annotations"][1]["segmentation"] = {"size": [40, 60], "counts": short["counts"].decode()}
    ann_file, image_dir = _write(tmp_path, data, images=False)
    with pytest.raises(ValueError, match=r"annotation id 11 \(image id 1\): compressed RLE runs cover 2360 "
                                         r"pixels, the 60x40 image has 2400"):
        CocoDetection(ann_file, image_dir)


@pytest.mark.parametrize("reason", sorted(BAD_ANNOTATIONS))
def test_bad_annotation_raises_naming_file_annotation_and_image(tmp_path, reason):
    data = _tiny_coco()
    data["annotations"][0].update(BAD_ANNOTATIONS[reason])
    ann_file, image_dir = _write(tmp_path, data, images=False)
    with pytest.raises(ValueError) as info:
        CocoDetection(ann_file, image_dir)
    message = str(info.value)
    assert str(ann_file) in message and "annotation id 10" in message and "image id 1" in message


def test_unknown_image_id_raises(tmp_path):
    data = _tiny_coco()
    data["annotations"][2]["image_id"] = 99
    ann_file, image_dir = _write(tmp_path, data, images=False)
    with pytest.raises(ValueError, match=r"annotation id 20 \(image id 99\): unknown image id"):
        CocoDetection(ann_file, image_dir)


def test_skip_bad_annotations_counts_them_and_warns_once(tmp_path):
    data = _tiny_coco()
    for ann, reason in zip(data["annotations"], ["polygon with fewer than 3 points", "unknown category id",
                                                 "polygon with fewer than 3 points"]):
        ann.update(BAD_ANNOTATIONS[reason])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(*_write(tmp_path, data), skip_bad_annotations=True)
    ds.drop_empty()
    assert ds.skipped == {"polygon with fewer than 3 points": 2, "unknown category id": 1}
    assert len(caught) == 1 and "skipped 3 bad annotations" in str(caught[0].message)
    assert ds.image_ids == []
    clean = CocoDetection(*_write(tmp_path, _tiny_coco()), skip_bad_annotations=True)
    assert clean.skipped == {}


def test_malformed_json_names_file_and_position(tmp_path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": [\n  {"id": 1,, }]}')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 2 column 12"):
        CocoDetection(ann_file, tmp_path)


def test_missing_annotation_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_missing_image_file_raises_on_read(tiny):
    ann_file, image_dir = tiny
    (image_dir / "two.png").unlink()
    ds = CocoDetection(ann_file, image_dir)
    with pytest.raises(FileNotFoundError, match=r"two\.png not found \(image id 2"):
        ds[1]


def test_unreadable_image_file_raises_on_read(tiny):
    ann_file, image_dir = tiny
    (image_dir / "two.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image file .*two\.png \(image id 2"):
        CocoDetection(ann_file, image_dir)[1]


def test_image_size_different_from_json_raises_on_read(tmp_path):
    data = _tiny_coco()
    ann_file, image_dir = _write(tmp_path, data)
    data["images"][2]["width"] = 31
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"three\.png \(image id 3\) is 30x30 \(WxH\) but .*ann\.json gives 31x30"):
        CocoDetection(ann_file, image_dir)[2]


def test_check_images_lists_every_bad_file(tiny):
    ann_file, image_dir = tiny
    ds = CocoDetection(ann_file, image_dir)
    ds.check_images()
    (image_dir / "one.png").unlink()
    (image_dir / "three.png").write_bytes(b"garbage")
    cv2.imwrite(str(image_dir / "four.png"), np.zeros((31, 40, 3), np.uint8))
    with pytest.raises(ValueError) as info:
        ds.check_images()
    message = str(info.value)
    assert message.startswith("3 bad image files")
    for name, image_id in [("one.png", 1), ("three.png", 3), ("four.png", 4)]:
        assert name in message and f"image id {image_id}" in message


# ---------------------------------------------------------------- transforms


def _tight_boxes(bits):
    """(M, H, W) bool -> (M, 4) float xyxy pixel-edge boxes of the set pixels."""
    boxes = []
    for mask in bits:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _bits(masks):
    return masks.to_bitmasks().tensor if isinstance(masks, PolygonMasks) else masks.tensor


def _as_uint8(image):
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, the pixels of the file."""
    return (image * 255).round().byte().permute(1, 2, 0).numpy()


def _raw_samples(shapes):
    """(image HxWx3 uint8, target) for one PolygonMasks and one BitMasks image with instances."""
    ds = CocoDetection(*shapes)
    ds.drop_empty()
    found = {}
    for index in range(len(ds)):
        image, target = ds[index]
        found.setdefault(type(target["masks"]), (_as_uint8(image), target))
    return [found[PolygonMasks], found[BitMasks]]


@pytest.mark.parametrize("kind", [0, 1], ids=["polygons", "bitmasks"])
def test_flip_keeps_masks_aligned_with_boxes(shapes, kind):
    image, target = _raw_samples(shapes)[kind]
    flipped_image, flipped = RandomHorizontalFlip(1.0)(image, target, np.random.default_rng(0))
    assert np.array_equal(flipped_image, image[:, ::-1])
    assert torch.equal(_tight_boxes(_bits(flipped["masks"])), flipped["boxes"])
    assert torch.equal(_bits(flipped["masks"]), _bits(target["masks"]).flip(-1))
    assert torch.equal(flipped["labels"], target["labels"])
    width = image.shape[1]
    assert torch.equal(flipped["boxes"][:, [0, 2]], width - target["boxes"][:, [2, 0]])


def test_flip_mirrors_crowd_boxes(tiny):
    image, target = CocoDetection(*tiny)[1]
    image = _as_uint8(image)
    _, flipped = RandomHorizontalFlip(1.0)(image, target, np.random.default_rng(0))
    assert flipped["crowd_boxes"].tolist() == [[0, 30, 30, 50]]
    assert flipped["boxes"].tolist() == [[15, 5, 25, 25]]
    _, kept = RandomHorizontalFlip(0.0)(image, target, np.random.default_rng(0))
    assert kept["boxes"].tolist() == [[5, 5, 15, 25]]


@pytest.mark.parametrize("kind", [0, 1], ids=["polygons", "bitmasks"])
def test_resize_scales_boxes_and_masks_consistently(shapes, kind):
    image, target = _raw_samples(shapes)[kind]
    height, width = image.shape[:2]
    short = int(min(height, width) * 1.7)
    resized_image, resized = ResizeShortestEdge([short], 10_000)(image, target, np.random.default_rng(0))
    new_h, new_w = resized_image.shape[:2]
    assert min(new_h, new_w) == short
    assert _bits(resized["masks"]).shape[1:] == (new_h, new_w)
    factors = torch.tensor([new_w / width, new_h / height] * 2)
    assert torch.allclose(resized["boxes"], target["boxes"] * factors)
    assert (_tight_boxes(_bits(resized["masks"])) - resized["boxes"]).abs().max() <= 1.7


def test_resize_caps_the_longest_side(tiny):
    image, target = CocoDetection(*tiny)[0]
    image = _as_uint8(image)
    resized_image, resized = ResizeShortestEdge([80, 400], 90)(image, target, np.random.default_rng(0))
    assert resized_image.shape[:2] == (60, 90)
    assert torch.allclose(resized["boxes"], target["boxes"] * 1.5)


def test_training_transforms_are_reproducible_from_the_seed(shapes):
    cfg = Config()
    cfg.model.input.min_size = [64, 96, 128]
    cfg.model.input.max_size = 200
    ds = CocoDetection(*shapes, transforms=build_transforms(cfg, train=True))
    ds.drop_empty()
    first, second = ds[(3, 12345)], ds[(3, 12345)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["boxes"], second[1]["boxes"])
    outcomes = set()
    for seed in range(12):
        image, target = ds[(3, seed)]
        outcomes.add((tuple(image.shape), float(target["boxes"][0, 0])))
    assert len(outcomes) > 3


def test_build_transforms_follows_the_config():
    cfg = Config()
    cfg.model.input.min_size = [10, 20]
    cfg.model.input.max_size = 50
    cfg.data.flip_prob = 0.25
    resize, flip = build_transforms(cfg, train=True).transforms
    assert isinstance(resize, ResizeShortestEdge) and resize.min_sizes == [10, 20] and resize.max_size == 50
    assert isinstance(flip, RandomHorizontalFlip) and flip.prob == 0.25
    assert build_transforms(cfg, train=False).transforms == []


def test_transforms_do_not_modify_their_input(shapes):
    image, target = _raw_samples(shapes)[1]
    before = copy.deepcopy(target)
    image_before = image.copy()
    cfg = Config()
    cfg.model.input.min_size = [150]
    cfg.data.flip_prob = 1.0
    transform = build_transforms(cfg, train=True)
    transform(image, target, np.random.default_rng(1))
    assert np.array_equal(image, image_before)
    assert torch.equal(target["boxes"], before["boxes"]) and torch.equal(target["masks"].tensor, before["masks"].tensor)


# ---------------------------------------------------------------- packed annotations and their cache


def _records(ds):
    return [ds.record(i) for i in range(len(ds))]


def _assert_same_records(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ("image_id", "file_name", "height", "width"):
            assert ra[key] == rb[key]
        for key in ("boxes", "labels", "crowd_boxes"):
            np.testing.assert_array_equal(ra[key], rb[key])
        assert len(ra["segmentations"]) == len(rb["segmentations"])
        for sa, sb in zip(ra["segmentations"], rb["segmentations"]):
            if isinstance(sa, dict):
                assert sa == sb
            else:
                assert len(sa) == len(sb) and all(np.array_equal(pa, pb) for pa, pb in zip(sa, sb))


def test_cache_is_written_beside_the_json_and_memory_mapped(shapes, monkeypatch):
    ann_file, image_dir = shapes
    built = CocoDetection(ann_file, image_dir)
    cache_file = ann_file.with_name(ann_file.name + ".maskrcnn-cache")
    assert cache_file.is_file()
    monkeypatch.setattr("maskrcnn.data.coco.pack_annotations",
                        lambda ann_file, skip: pytest.fail("rebuilt despite a valid cache"))
    loaded = CocoDetection(ann_file, image_dir)
    assert isinstance(loaded._records.arrays["coords"].base, np.memmap) or \
        isinstance(loaded._records.arrays["coords"], np.memmap)
    assert loaded.image_ids == built.image_ids and loaded.class_names == built.class_names
    _assert_same_records(_records(loaded), _records(built))


def test_packed_records_match_the_json(shapes):
    ann_file, image_dir = shapes
    ds = CocoDetection(ann_file, image_dir, cache=False)
    coco = COCO(str(ann_file))
    for record in _records(ds):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=record["image_id"])) if not a["iscrowd"]]
        assert record["file_name"] == coco.imgs[record["image_id"]]["file_name"]
        for ann, segmentation in zip(anns, record["segmentations"]):
            if isinstance(ann["segmentation"], list):  # polygons as float32
                assert [p.dtype for p in segmentation] == [np.float32] * len(ann["segmentation"])
                for ours, theirs in zip(segmentation, ann["segmentation"]):
                    np.testing.assert_array_equal(ours, np.float32(theirs))
            elif isinstance(ann["segmentation"]["counts"], str):
                assert segmentation["counts"] == ann["segmentation"]["counts"].encode()
            else:
                assert segmentation["counts"] == coco.annToRLE(ann)["counts"]


def test_chunked_validation_packs_the_same_records(shapes, monkeypatch):
    ann_file, image_dir = shapes
    whole = CocoDetection(ann_file, image_dir, cache=False)
    monkeypatch.setattr("maskrcnn.data.packing._CHUNK", 3)
    chunked = CocoDetection(ann_file, image_dir, cache=False)
    whole.drop_empty()
    chunked.drop_empty()
    assert chunked.image_ids == whole.image_ids
    _assert_same_records(_records(chunked), _records(whole))


def test_first_bad_annotation_in_file_order_is_reported_across_chunks(tmp_path, monkeypatch):
    data = _tiny_coco()
    data["annotations"][3].update(BAD_ANNOTATIONS["malformed bbox"])  # rejected by its type
    data["annotations"][4].update(BAD_ANNOTATIONS["box outside image"])  # rejected by the numeric check
    data["annotations"][2].update(BAD_ANNOTATIONS["segmentation outside image"])
    ann_file, image_dir = _write(tmp_path, data, images=False)
    for chunk in (2, 65536):
        monkeypatch.setattr("maskrcnn.data.packing._CHUNK", chunk)
        with pytest.raises(ValueError, match=r"annotation id 20 \(image id 2\): polygon lies outside"):
            CocoDetection(ann_file, image_dir, cache=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = CocoDetection(ann_file, image_dir, cache=False, skip_bad_annotations=True)
    assert ds.skipped == {"segmentation outside image": 1, "malformed bbox": 1, "box outside image": 1}


def test_cache_is_rebuilt_when_the_json_changes(tmp_path):
    data = _tiny_coco()
    ann_file, image_dir = _write(tmp_path, data, images=False)
    before = CocoDetection(ann_file, image_dir)
    stat = ann_file.stat()
    data["annotations"][0]["bbox"] = [3, 3, 10, 12]  # same length, same modification time: only the hash differs
    ann_file.write_text(json.dumps(data))
    os.utime(ann_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ann_file.stat().st_size == stat.st_size
    after = CocoDetection(ann_file, image_dir)
    assert before.record(0)["boxes"][0].tolist() == [2, 3, 12, 15]
    assert after.record(0)["boxes"][0].tolist() == [3, 3, 13, 15]


def test_cache_keeps_skip_counts_and_the_option_is_part_of_its_key(tmp_path):
    data = _tiny_coco()
    data["annotations"][0].update(BAD_ANNOTATIONS["unknown category id"])
    ann_file, image_dir = _write(tmp_path, data, images=False)
    for _ in range(2):  # built, then read from the cache: the same counts and warning
        with pytest.warns(UserWarning, match="skipped 1 bad annotations"):
            ds = CocoDetection(ann_file, image_dir, skip_bad_annotations=True)
        assert ds.skipped == {"unknown category id": 1}
    with pytest.raises(ValueError, match="unknown category id 4"):
        CocoDetection(ann_file, image_dir)


def test_unwritable_cache_keeps_annotations_in_memory(tiny, monkeypatch):
    def refuse(path, write):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr("maskrcnn.data.annotation_cache.atomic_write", refuse)
    with pytest.warns(UserWarning, match="cannot write the annotation cache"):
        ds = CocoDetection(*tiny)
    assert ds.image_ids == [1, 2, 3, 4] and ds[0][1]["labels"].tolist() == [2, 3]


def test_pickled_dataset_refers_to_the_cache(shapes):
    ds = CocoDetection(*shapes)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the path and key, not the arrays
    _assert_same_records(_records(pickle.loads(blob)), _records(ds))
    in_memory = CocoDetection(*shapes, cache=False)
    _assert_same_records(_records(pickle.loads(pickle.dumps(in_memory))), _records(ds))


def _build_in_process(ann_file, image_dir, builds, start):
    from maskrcnn.data import coco

    pack = coco.pack_annotations

    def counted(ann_file, skip):
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # hold the lock long enough for the other process to meet it
        return pack(ann_file, skip)

    coco.pack_annotations = counted
    start.wait()
    ds = coco.CocoDetection(ann_file, image_dir)
    assert len(ds) == 30


def test_processes_starting_at_once_build_once(shapes, tmp_path):
    ann_file = tmp_path / "ann.json"
    ann_file.write_bytes(shapes[0].read_bytes())
    ctx = mp.get_context("fork")
    start = ctx.Event()
    builds = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_build_in_process, args=(ann_file, shapes[1], builds, start)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert len(builds.read_text().split()) == 1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_annotation_with_several_faults_reports_the_first_check(tmp_path):
    data = _tiny_coco()
    data["annotations"][1].update(bbox=[50, 3, 20, 12], segmentation={"size": [41, 60], "counts": "PX1"})
    ann_file, image_dir = _write(tmp_path, data, images=False)
    with pytest.raises(ValueError, match=r"annotation id 11 \(image id 1\): bbox .* lies outside"):
        CocoDetection(ann_file, image_dir, cache=False)
