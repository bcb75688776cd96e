import json
import runpy
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from maskrcnn.config import config_to_dict
from maskrcnn.rle import encode_masks
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.predictor import Instances, Predictor, to_image_tensor

from tiny import tiny_config

CLASS_NAMES = ["square", "circle", "triangle"]


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return build_model(tiny_config().model).state_dict()


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor(tiny_config(), weights, class_names=CLASS_NAMES, score_thresh=0.2, precision="fp32")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (48, 72, 3), dtype=np.uint8)
    image[10:30, 20:50] = (200, 40, 90)
    return image


def assert_same_detections(a: Instances, b: Instances):
    assert a.image_size == b.image_size
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    assert torch.equal(a.labels, b.labels)


def test_array_input_gives_detections_in_original_pixels(predictor, image):
    result = predictor(image)
    assert isinstance(result, Instances) and len(result) > 0
    assert result.image_size == (48, 72)
    assert result.boxes.dtype == torch.float32 and result.boxes.shape == (len(result), 4)
    assert (result.boxes[:, 2] <= 72 + 1e-3).all() and (result.boxes[:, 3] <= 48 + 1e-3).all()
    assert result.masks.dtype == torch.bool and result.masks.shape == (len(result), 48, 72)
    assert ((result.labels >= 1) & (result.labels <= 3)).all()
    assert result.class_names == [CLASS_NAMES[i - 1] for i in result.labels.tolist()]
    assert (result.scores >= 0.2).all()


def test_path_input_equals_array_input(predictor, image, tmp_path):
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert_same_detections(predictor(path), predictor(image))
    assert_same_detections(predictor(str(path)), predictor(image))


def test_bgr_flag_flips_channels(predictor, image):
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    assert torch.equal(to_image_tensor(bgr, bgr=True), to_image_tensor(image))
    assert not torch.equal(to_image_tensor(bgr), to_image_tensor(image))
    assert_same_detections(predictor(bgr, bgr=True), predictor(image))
    bgr_predictor = Predictor(tiny_config(), predictor.model.state_dict(), score_thresh=0.2, precision="fp32", bgr=True)
    assert_same_detections(bgr_predictor(bgr), predictor(image))


def test_pil_and_tensor_inputs_equal_array_input(predictor, image):
    expected = predictor(image)
    assert_same_detections(predictor(Image.fromarray(image)), expected)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    assert_same_detections(predictor(chw), expected)
    assert_same_detections(predictor(chw.float() / 255), expected)


def test_grayscale_and_rgba_inputs_are_converted(image):
    gray = image[:, :, 0]
    expected = to_image_tensor(np.repeat(gray[:, :, None], 3, axis=2))
    assert torch.equal(to_image_tensor(gray), expected)
    assert torch.equal(to_image_tensor(gray[:, :, None]), expected)
    assert torch.equal(to_image_tensor(Image.fromarray(gray)), expected)
    assert torch.equal(to_image_tensor(torch.from_numpy(gray)), expected)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], axis=2)
    assert torch.equal(to_image_tensor(rgba), to_image_tensor(image))
    assert torch.equal(to_image_tensor(Image.fromarray(rgba, "RGBA")), to_image_tensor(image))
    assert torch.equal(to_image_tensor(torch.from_numpy(rgba).permute(2, 0, 1)), to_image_tensor(image))


def test_list_of_mixed_sizes_runs_as_one_batch(predictor, image):
    small = image[:30, :40].copy()
    results = predictor([image, Image.fromarray(small)])
    assert isinstance(results, list) and len(results) == 2
    assert [r.image_size for r in results] == [(48, 72), (30, 40)]
    assert results[1].masks.shape[1:] == (30, 40)
    assert predictor([]) == []


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((8, 8, 3), np.float64), ValueError, "input: expected a uint8 image array, got dtype float64"),
    (np.zeros((8, 8, 2), np.uint8), ValueError, r"input: expected an H x W.*got shape \(8, 8, 2\)"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "input: image is empty"),
    (torch.rand(2, 8, 8), ValueError, r"input: expected a 3 x H x W.*got shape \(2, 8, 8\)"),
    (torch.full((3, 8, 8), 255.0), ValueError, "input: float image tensors must hold values in 0-1"),
    (torch.full((3, 8, 8), float("nan")), ValueError, "input: the image holds NaN or infinite values"),
    (torch.full((3, 8, 8), float("inf")), ValueError, "input: the image holds NaN or infinite values"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), ValueError, "input: expected a uint8 or float image tensor"),
    (42, ValueError, "input: unsupported image type int"),
])
def test_bad_inputs_are_rejected_with_a_message(predictor, bad, error, message):
    with pytest.raises(error, match=message):
        predictor(bad)


def test_bad_files_and_list_positions_are_named(predictor, image, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor(missing)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*broken.jpg"):
        predictor([image, broken])
    with pytest.raises(ValueError, match="input 1 of the list: expected a uint8 image array"):
        predictor([image, image.astype(np.float32)])


def test_indexing_and_filtering(predictor, image):
    result = predictor(image)
    n = len(result)
    assert n >= 3
    first = result[0]
    assert len(first) == 1 and first.class_names == result.class_names[:1]
    assert torch.equal(first.masks, result.masks[:1])
    assert torch.equal(result[-1].boxes, result.boxes[-1:])
    assert torch.equal(result[1:3].scores, result.scores[1:3])
    keep = torch.zeros(n, dtype=torch.bool)
    keep[[0, 2]] = True
    picked = result[keep]
    assert picked.class_names == [result.class_names[0], result.class_names[2]]
    assert torch.equal(picked.masks, result.masks[[0, 2]])
    median = float(result.scores.median())
    kept = result.filter(median)
    assert len(kept) == int((result.scores >= median).sum()) and (kept.scores >= median).all()
    assert kept.image_size == result.image_size


def test_rle_and_bitmap_formats_agree(weights, image):
    bitmap = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32", mask_format="bitmap")(image)
    rle = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32", mask_format="rle")(image)
    none = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32", mask_format="none")(image)
    assert_same_detections(rle, bitmap)
    assert_same_detections(none, bitmap)
    assert none.masks is None
    assert rle.masks == encode_masks(bitmap.masks)
    assert [r["segmentation"] for r in rle[1:3].to_coco(1)] == rle.masks[1:3]


def test_bitmap_masks_equal_the_models_own_paste(predictor, image):
    result = predictor(image)
    with torch.no_grad():
        out = predictor.model([to_image_tensor(image)])[0]
    assert torch.equal(result.masks, out["masks"])


def test_to_coco(predictor, image):
    result = predictor(image)[:4]
    coco = result.to_coco(image_id=7, label_to_cat_id={1: 10, 2: 20, 3: 30})
    assert len(coco) == 4
    for r, box, score, label, mask in zip(coco, result.boxes, result.scores, result.labels, result.masks):
        assert r["image_id"] == 7 and r["category_id"] == 10 * int(label)
        x, y, w, h = r["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx(box.tolist())
        assert r["score"] == pytest.approx(float(score))
        assert isinstance(r["segmentation"]["counts"], str)
        assert np.array_equal(mask_utils.decode(r["segmentation"]).astype(bool), mask.numpy())
    assert [r["category_id"] for r in result.to_coco(1)] == result.labels.tolist()
    assert result.to_coco(3, label_to_cat_id={}) == []


def test_to_coco_leaves_out_labels_without_a_dataset_category(predictor, weights, image):
    result = predictor(image)
    present = sorted(set(result.labels.tolist()))
    assert len(present) >= 2
    mapping = {present[0]: 11}
    coco = result.to_coco(5, label_to_cat_id=mapping)
    assert len(coco) == int((result.labels == present[0]).sum())
    assert {r["category_id"] for r in coco} == {11}
    carried = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32",
                        label_to_cat_id=mapping)(image)
    assert carried.to_coco(5) == coco


def test_predictor_with_dataset_categories_drops_labels_the_dataset_lacks(predictor, weights, image):
    result = predictor(image)
    names = predictor.class_names
    kept_label = int(result.labels[0])
    categories = [{"id": 40, "name": names[kept_label - 1].upper()}, {"id": 41, "name": "zebra"}]
    restricted = Predictor(tiny_config(), weights, class_names=names, score_thresh=0.2, precision="fp32",
                           categories=categories)
    assert restricted.label_to_cat_id == {kept_label: 40}
    out = restricted(image)
    assert out.labels.tolist() == [label for label in result.labels.tolist() if label == kept_label]
    assert {r["category_id"] for r in out.to_coco(1)} == {40}
    with pytest.raises(ValueError, match="no category in common.*zebra"):
        Predictor(tiny_config(), None, class_names=names, categories=[{"id": 41, "name": "zebra"}])


def test_from_checkpoint_restores_config_and_class_names(weights, image, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": weights, "config": config_to_dict(tiny_config()), "class_names": CLASS_NAMES,
                "iteration": 5}, path)
    loaded = Predictor.from_checkpoint(path, score_thresh=0.2, precision="fp32")
    assert loaded.class_names == CLASS_NAMES
    direct = Predictor(tiny_config(), weights, class_names=CLASS_NAMES, score_thresh=0.2, precision="fp32")
    assert_same_detections(loaded(image), direct(image))
    assert_same_detections(Predictor(tiny_config(), path, score_thresh=0.2, precision="fp32")(image), direct(image))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        Predictor.from_checkpoint(tmp_path / "nothere.pth")


def test_from_checkpoint_applies_overrides_to_the_stored_config(weights, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": weights, "config": config_to_dict(tiny_config()), "class_names": CLASS_NAMES}, path)
    stored = Predictor.from_checkpoint(path, precision="fp32").inference_model
    changed = Predictor.from_checkpoint(path, ["model.input.min_size_test=72", "model.roi_heads.score_thresh=0.3"],
                                        precision="fp32")
    assert changed.inference_model.min_size == 72 != stored.min_size
    assert changed.inference_model.roi_heads.score_thresh == 0.3
    with pytest.raises(ValueError, match="did you mean model.input.min_size_test"):
        Predictor.from_checkpoint(path, ["model.input.min_size_testt=72"])


def test_bf16_precision_returns_float32(weights, image):
    result = Predictor(tiny_config(), weights, score_thresh=0.2, precision="bf16")(image)
    assert result.boxes.dtype == torch.float32 and result.scores.dtype == torch.float32
    assert result.masks.shape[1:] == (48, 72)


@pytest.mark.parametrize("kwargs", [{"precision": "fp16"}, {"mask_format": "png"}, {"mask_format": "probs"}])
def test_unknown_options_are_rejected(weights, kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        Predictor(tiny_config(), weights, **kwargs)


def test_infer_tool_writes_overlays_label_maps_and_results(weights, image, tmp_path):
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": weights, "config": config_to_dict(tiny_config()), "class_names": CLASS_NAMES,
                "iteration": 0}, checkpoint)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "000042.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "small.jpg"), cv2.cvtColor(image[:30, :40], cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("skipped")
    main = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "infer.py"))["main"]
    main(["--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(tmp_path / "out"),
          "--score-thresh", "0.2", "--label-map", "--precision", "fp32"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["000042.png", "000042_labels.png", "results.json",
                                                      "small.png", "small_labels.png"]
    assert cv2.imread(str(out / "000042.png")).shape == image.shape
    assert cv2.imread(str(out / "small_labels.png")).shape[0] >= 30
    results = json.loads((out / "results.json").read_text())
    expected = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32")(image).to_coco(42)
    ours = [r for r in results if r["image_id"] == 42]  # digit file names become COCO-style ids
    assert [r["segmentation"] for r in ours] == [r["segmentation"] for r in expected]
    assert np.allclose([r["bbox"] + [r["score"]] for r in ours], [r["bbox"] + [r["score"]] for r in expected])
    assert {r["image_id"] for r in results} <= {42, "small.jpg"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(weights, image):
    cpu = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32")(image)
    cuda = Predictor(tiny_config(), weights, score_thresh=0.2, precision="fp32", device="cuda")(image)
    assert cuda.boxes.device.type == "cpu"
    assert torch.allclose(cuda.boxes, cpu.boxes, atol=1e-2)
