import json
import os
import runpy
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.cocoeval import COCOeval

from maskrcnn.config import config_to_dict
from maskrcnn.data.coco import CocoDetection
from maskrcnn.evaluation.coco_evaluator import evaluate, evaluate_results, load_coco, run_inference
from maskrcnn.rle import encode_masks
from maskrcnn.modeling.maskrcnn import build_model
from tiny import tiny_config

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "triangle"}]
IMAGES = [{"id": 1, "file_name": "a.png", "height": 60, "width": 90},
          {"id": 2, "file_name": "b.png", "height": 50, "width": 70},
          {"id": 5, "file_name": "c.png", "height": 40, "width": 40}]
# (image id, category id, x, y, w, h, iscrowd): pixel-exact rectangles, so box and mask IoU agree.
OBJECTS = [(1, 1, 2, 4, 40, 20, 0), (1, 3, 10, 32, 20, 24, 0), (2, 1, 30, 10, 20, 30, 0),
           (2, 3, 4, 6, 20, 12, 0), (1, 1, 60, 30, 24, 24, 1)]


def _rect_mask(height, width, x, y, w, h):
    mask = np.zeros((height, width), dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask


def _rle(mask):
    return encode_masks(mask[None])[0]


@pytest.fixture
def dataset_dir(tmp_path):
    """A three-image COCO dataset: non-contiguous category ids, a category without ground truth, a crowd
    region and an image without annotations."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in IMAGES}
    annotations = []
    for ann_id, (image_id, cat_id, x, y, w, h, crowd) in enumerate(OBJECTS, start=1):
        mask = _rect_mask(*sizes[image_id], x, y, w, h)
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": [x, y, w, h],
                            "area": float(w * h), "iscrowd": crowd, "segmentation": _rle(mask)})
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for img in IMAGES:
        pixels = rng.integers(0, 255, (img["height"], img["width"], 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "images" / img["file_name"]), pixels)
    ann = {"images": IMAGES, "categories": CATEGORIES, "annotations": annotations}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path


def _detection(image_id, cat_id, x, y, w, h, score):
    height, width = next((img["height"], img["width"]) for img in IMAGES if img["id"] == image_id)
    return {"image_id": image_id, "category_id": cat_id, "bbox": [float(x), float(y), float(w), float(h)],
            "score": score, "segmentation": _rle(_rect_mask(height, width, x, y, w, h))}


def _perfect_results():
    return [_detection(i, c, x, y, w, h, 0.9) for i, c, x, y, w, h, crowd in OBJECTS if not crowd]


def test_perfect_predictions_give_ap_one(dataset_dir):
    metrics = evaluate_results(load_coco(dataset_dir / "ann.json"), _perfect_results(), verbose=False)
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert m["AP"] == m["AP50"] == m["AP75"] == pytest.approx(1.0)
        assert m["per_category"] == {"square": pytest.approx(1.0), "circle": pytest.approx(1.0), "triangle": None}


def test_box_shift_to_iou_06_gives_pycocotools_ap(dataset_dir):
    coco_gt = load_coco(dataset_dir / "ann.json")
    # Shifting a w-wide rectangle right by w / 4 leaves IoU (3w/4) / (5w/4) = 0.6 with its ground truth.
    results = [_detection(i, c, x + w // 4, y, w, h, 0.9) for i, c, x, y, w, h, crowd in OBJECTS if not crowd]
    metrics = evaluate_results(coco_gt, results, verbose=False)
    thresholds = COCOeval(iouType="bbox").params.iouThrs
    expected = float(np.mean(thresholds <= 0.6))
    assert expected == pytest.approx(0.3)
    for iou_type in ("bbox", "segm"):
        direct = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
        assert metrics[iou_type]["AP"] == pytest.approx(direct.stats[0]) == pytest.approx(expected)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(0.0)


def test_no_detections_give_zeros(dataset_dir):
    metrics = evaluate_results(load_coco(dataset_dir / "ann.json"), [], verbose=False)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 0.0
        assert metrics[iou_type]["AP50"] == 0.0
        assert metrics[iou_type]["per_category"] == {"square": 0.0, "circle": 0.0, "triangle": None}


def test_detection_on_crowd_region_is_ignored(dataset_dir):
    coco_gt = load_coco(dataset_dir / "ann.json")
    on_crowd = _detection(1, 1, 62, 32, 10, 10, 1.0)  # top-scoring, inside the crowd region of its category
    assert evaluate_results(coco_gt, _perfect_results() + [on_crowd], verbose=False)["bbox"]["AP"] == pytest.approx(1.0)
    off_crowd = dict(on_crowd, category_id=3)  # the same box of a category without a crowd there: a false positive
    assert evaluate_results(coco_gt, _perfect_results() + [off_crowd], verbose=False)["bbox"]["AP"] < 0.99


def test_results_are_not_modified(dataset_dir):
    results = _perfect_results()
    before = json.dumps(results)
    evaluate_results(load_coco(dataset_dir / "ann.json"), results, verbose=False)
    assert json.dumps(results) == before


def test_matches_faster_coco_eval(dataset_dir, tmp_path):
    rng = np.random.default_rng(1)
    results = []
    for i, c, x, y, w, h, crowd in OBJECTS[:3]:  # image 2 keeps one object undetected
        for _ in range(3):
            dx, dy, dw, dh = rng.integers(-4, 5, 4)
            results.append(_detection(i, c, max(x + dx, 0), max(y + dy, 0), w + dw, h + dh, float(rng.random())))
    results.append(_detection(5, 1, 5, 5, 20, 20, 0.7))  # false positive on the image without objects
    results.append(_detection(2, 7, 0, 0, 10, 10, 0.8))  # category without ground truth
    metrics = evaluate_results(load_coco(dataset_dir / "ann.json"), results, verbose=False)

    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    coco_gt = FasterCOCO(str(dataset_dir / "ann.json"))
    for iou_type in ("bbox", "segm"):
        reference = COCOeval_faster(coco_gt, coco_gt.loadRes(str(results_file)), iou_type)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
        names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        for name, value in zip(names, reference.stats[:6]):
            assert metrics[iou_type][name] == (None if value < 0 else pytest.approx(value, abs=1e-6)), name
        precision = reference.eval["precision"]
        for k, cat_id in enumerate(reference.params.catIds):
            p = precision[:, :, k, 0, -1]
            expected = float(p[p > -1].mean()) if (p > -1).any() else None
            name = coco_gt.cats[cat_id]["name"]
            assert metrics[iou_type]["per_category"][name] == (expected if expected is None
                                                               else pytest.approx(expected, abs=1e-6))
    assert 0 < metrics["bbox"]["AP"] < 1


def test_segm_needs_segmentation(dataset_dir):
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in _perfect_results()]
    coco_gt = load_coco(dataset_dir / "ann.json")
    assert evaluate_results(coco_gt, results, ("bbox",), verbose=False)["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image id 1 has no 'segmentation'"):
        evaluate_results(coco_gt, results, ("segm",), verbose=False)


def test_results_for_unknown_images_or_categories_are_rejected(dataset_dir):
    coco_gt = load_coco(dataset_dir / "ann.json")
    with pytest.raises(ValueError, match=r"image_id values not in the ground truth: \[99\]"):
        evaluate_results(coco_gt, [dict(_perfect_results()[0], image_id=99)], verbose=False)
    with pytest.raises(ValueError, match=r"category_id values not in the ground truth: \[2\]"):
        evaluate_results(coco_gt, [dict(_perfect_results()[0], category_id=2)], verbose=False)


def test_summary_and_per_category_table_are_printed(dataset_dir, capsys):
    evaluate_results(load_coco(dataset_dir / "ann.json"), _perfect_results(), ("bbox",))
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in out
    assert "square" in out and "triangle" in out


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg.model.roi_heads.score_thresh = 0.2
    cfg.model.roi_heads.detections_per_img = 20
    return cfg, build_model(cfg.model)


def test_evaluate_writes_results_and_metrics(dataset_dir, tmp_path):
    cfg, model = _tiny_model()
    model.train()
    metrics = evaluate(model, dataset_dir / "ann.json", dataset_dir / "images", tmp_path / "out", batch_size=2,
                       verbose=False)
    assert model.training  # state restored
    assert metrics["images"] == 3 and metrics["images_per_s"] > 0
    for iou_type in ("bbox", "segm", "boundary"):
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_category"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results, "a random model at score 0.2 should still detect something on noise images"
    sizes = {img["id"]: [img["height"], img["width"]] for img in IMAGES}
    for r in results:
        assert r["category_id"] in (1, 3, 7)  # labels 1..3 mapped back to the dataset's ids
        assert r["segmentation"]["size"] == sizes[r["image_id"]]
        assert isinstance(r["segmentation"]["counts"], str)
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and x + w <= sizes[r["image_id"]][1] + 1e-3
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_run_inference_segmentations_match_full_resolution_masks(dataset_dir):
    cfg, model = _tiny_model()
    model.eval()
    dataset = CocoDetection(dataset_dir / "ann.json", dataset_dir / "images")
    results = run_inference(model, dataset, batch_size=1, progress=False, precision="fp32")
    image, target = dataset[0]
    with torch.no_grad():
        out = model([image])[0]
    ours = [r for r in results if r["image_id"] == target["image_id"]]
    assert len(ours) == len(out["boxes"]) > 0
    assert [r["segmentation"] for r in ours] == encode_masks(out["masks"])
    assert np.allclose([r["score"] for r in ours], out["scores"].numpy())


def _distributed_worker(rank, world_size, port, dataset_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _, model = _tiny_model()
        dataset = CocoDetection(Path(dataset_dir) / "ann.json", Path(dataset_dir) / "images")
        queue.put((rank, run_inference(model, dataset, batch_size=1, progress=False, precision="fp32")))
    finally:
        dist.destroy_process_group()


def test_distributed_inference_gathers_every_image_on_rank_zero(dataset_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(rank, 2, port, str(dataset_dir), queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    returned = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert returned[1] is None
    _, model = _tiny_model()
    dataset = CocoDetection(dataset_dir / "ann.json", dataset_dir / "images")
    single = run_inference(model, dataset, batch_size=1, progress=False, precision="fp32")
    assert len(returned[0]) == len(single) > 0
    for image_id in dataset.image_ids:
        gathered = [r for r in returned[0] if r["image_id"] == image_id]
        alone = [r for r in single if r["image_id"] == image_id]
        assert [r["category_id"] for r in gathered] == [r["category_id"] for r in alone]
        assert np.allclose([r["score"] for r in gathered], [r["score"] for r in alone], atol=1e-4)
        assert np.allclose([r["bbox"] for r in gathered], [r["bbox"] for r in alone], atol=1e-2)


def test_eval_tool_prints_and_writes_metrics(dataset_dir, tmp_path, capsys):
    cfg, model = _tiny_model()
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg),
                "class_names": ["square", "circle", "triangle"], "iteration": 0}, checkpoint)
    main = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "eval.py"))["main"]
    main(["--checkpoint", str(checkpoint), "--ann", str(dataset_dir / "ann.json"), "--images",
          str(dataset_dir / "images"), "--output", str(tmp_path / "eval"), "--batch-size", "2", "--num-workers", "0"])
    out = capsys.readouterr().out
    assert "Average Precision" in out and "images/s" in out and "triangle" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 3
    assert "Evaluation of boundary" in out and f"boundary AP {metrics['boundary']['AP']:.4f}" in out
    assert (tmp_path / "eval" / "results.json").is_file()


def _random_scene(rng, num_images=40):
    """Ground truth and jittered detections over ``num_images`` 160x200 images: rectangles and ellipses of three
    categories at small, medium and large sizes, crowd regions, missed objects, false positives, tied scores."""
    images, annotations, results = [], [], []
    height, width = 160, 200
    yy, xx = np.mgrid[:height, :width]
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
        for _ in range(rng.integers(0, 6)):
            w, h = rng.integers(4, 150), rng.integers(4, 120)
            x, y = rng.integers(0, width - w), rng.integers(0, height - h)
            ellipse = bool(rng.integers(2))
            cat_id = int(rng.choice([1, 3, 7]))

            def shape(x, y, w, h):
                if ellipse:
                    return ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1
                return _rect_mask(height, width, x, y, w, h)

            mask = shape(x, y, w, h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id,
                                "bbox": [float(x), float(y), float(w), float(h)], "area": float(mask.sum()),
                                "iscrowd": int(rng.random() < 0.1), "segmentation": _rle(mask)})
            for _ in range(rng.integers(0, 4)):  # 0 detections: a miss; several: duplicates
                dx, dy, dw, dh = rng.integers(-w // 6 - 1, w // 6 + 2, 2).tolist() + rng.integers(-3, 4, 2).tolist()
                bx, by = int(np.clip(x + dx, 0, width - 4)), int(np.clip(y + dy, 0, height - 4))
                bw, bh = int(np.clip(w + dw, 2, width - bx)), int(np.clip(h + dh, 2, height - by))
                score = float(np.round(rng.random(), 1))  # ties between detections
                results.append({"image_id": image_id, "category_id": cat_id if rng.random() < 0.9 else 3,
                                "bbox": [float(bx), float(by), float(bw), float(bh)], "score": score,
                                "segmentation": _rle(shape(bx, by, bw, bh))})
        for _ in range(rng.integers(0, 3)):  # false positives
            bw, bh = rng.integers(3, 40, 2)
            bx, by = rng.integers(0, width - bw), rng.integers(0, height - bh)
            results.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 7])),
                            "bbox": [float(bx), float(by), float(bw), float(bh)], "score": float(rng.random()),
                            "segmentation": _rle(_rect_mask(height, width, bx, by, bw, bh))})
    return {"images": images, "categories": CATEGORIES, "annotations": annotations}, results


def test_backends_give_identical_metrics(tmp_path):
    ground_truth, results = _random_scene(np.random.default_rng(3))
    (tmp_path / "ann.json").write_text(json.dumps(ground_truth))
    assert len(results) > 150 and any(a["iscrowd"] for a in ground_truth["annotations"])
    reference = evaluate_results(load_coco(tmp_path / "ann.json"), results, verbose=False)
    faster = evaluate_results(load_coco(tmp_path / "ann.json", "faster-coco-eval"), results, verbose=False,
                              backend="faster-coco-eval")
    # the ground truth of either backend serves either backend
    converted = evaluate_results(load_coco(tmp_path / "ann.json"), results, verbose=False, backend="faster-coco-eval")
    for iou_type in ("bbox", "segm", "boundary"):
        for metrics in (faster, converted):
            # the six summary numbers are bit-identical; per-category means may differ in the last bit
            assert {k: v for k, v in metrics[iou_type].items() if k != "per_category"} == \
                {k: v for k, v in reference[iou_type].items() if k != "per_category"}
            assert metrics[iou_type]["per_category"] == pytest.approx(reference[iou_type]["per_category"],
                                                                      rel=1e-12, abs=0)
        assert all(reference[iou_type][key] is not None for key in ("APs", "APm", "APl"))
    assert 0.1 < reference["bbox"]["AP"] < 0.9 and 0.1 < reference["segm"]["AP"] < 0.9
    assert 0 < reference["boundary"]["AP"] < reference["segm"]["AP"]  # jittered outlines


def test_unknown_backend_is_rejected(dataset_dir):
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate_results(load_coco(dataset_dir / "ann.json"), _perfect_results(), verbose=False, backend="detectron2")


def test_faster_backend_prints_the_same_summary(dataset_dir, capsys):
    coco_gt = load_coco(dataset_dir / "ann.json")
    evaluate_results(coco_gt, _perfect_results(), ("bbox",), backend="faster-coco-eval")
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in capsys.readouterr().out


def test_scoring_leaves_the_ground_truth_as_it_was(dataset_dir):
    """Boundary AP is scored by faster-coco-eval on a pycocotools ground truth: the RLE and boundary fields that
    faster-coco-eval adds to its annotations stay out of the caller's."""
    coco_gt = load_coco(dataset_dir / "ann.json")
    fields = [set(ann) for ann in coco_gt.dataset["annotations"]]
    evaluate_results(coco_gt, _perfect_results(), ("boundary",), verbose=False)
    assert [set(ann) for ann in coco_gt.dataset["annotations"]] == fields
