"""The error analysis (maskrcnn.evaluation.errors), its report page (maskrcnn.evaluation.report) and
tools/analyze.py, on constructed cases whose answer is known, against tidecv, and in a headless browser."""

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from maskrcnn.cli import run
from maskrcnn.evaluation.coco_evaluator import evaluate_results, load_coco
from maskrcnn.evaluation.errors import ERROR_TYPES, analyze_errors, confusion_matrix
from maskrcnn.evaluation.report import write_report
from browser import chromium
from tiny import save_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import analyze as analyze_tool  # noqa: E402

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "triangle"}]
SIZE = 80  # images are SIZE x SIZE pixels


def _rle(x, y, w, h):
    x, y, w, h = (int(v) for v in (x, y, w, h))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8, order="F")
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    return rle


def _detection(image_id, cat, box, score):
    """A pixel-exact rectangle detection: box and mask IoU agree."""
    return {"image_id": image_id, "category_id": cat, "bbox": [float(v) for v in box], "score": score,
            "segmentation": _rle(*box)}


def _dataset(root: Path, num_images: int = 6, crowd: bool = False) -> Path:
    """``num_images`` images with two filled rectangles each (categories in turn), written with their json.
    Odd annotations are polygons, even ones RLE; with ``crowd`` image 1 also holds a crowd region."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:03d}.png", "height": SIZE, "width": SIZE})
        pixels = np.tile(np.linspace(60, 160, SIZE, dtype=np.uint8)[:, None, None], (1, SIZE, 3))
        for x, y, w, h in [(4, 6, 30, 24), (40, 36, 32, 36)]:
            pixels[y:y + h, x:x + w] = rng.integers(0, 255, 3)
        cv2.imwrite(str(root / "images" / f"{image_id:03d}.png"), pixels)
        for box in [(4, 6, 30, 24), (40, 36, 32, 36)]:
            ann_id = len(annotations) + 1
            x, y, w, h = box
            segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]] if ann_id % 2 else _rle(*box)
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": CATEGORIES[ann_id % 3]["id"],
                                "bbox": list(box), "area": float(w * h), "iscrowd": 0, "segmentation": segmentation})
    if crowd:
        annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": 1, "bbox": [4, 62, 40, 14],
                            "area": 560.0, "iscrowd": 1, "segmentation": _rle(4, 62, 40, 14)})
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann_file


def _perfect(coco_gt):
    """One exact detection per ground truth, scores 0.99, 0.98, ... in annotation order."""
    anns = [a for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    return [_detection(a["image_id"], a["category_id"], a["bbox"], 0.99 - 0.01 * n) for n, a in enumerate(anns)]


def _other(cat):
    return CATEGORIES[(next(i for i, c in enumerate(CATEGORIES) if c["id"] == cat) + 1) % 3]["id"]


def _only(kind, coco_gt):
    """Results whose every error is of one type (every fourth ground truth affected, at its own score)."""
    results = []
    for n, det in enumerate(_perfect(coco_gt)):
        x, y, w, h = det["bbox"]
        if n % 4:
            results.append(det)
        elif kind == "dupe":  # an exact copy scoring above the next true positives
            results += [det, _detection(det["image_id"], det["category_id"], det["bbox"], det["score"] - 0.005)]
        elif kind == "cls":
            results.append(_detection(det["image_id"], _other(det["category_id"]), det["bbox"], det["score"]))
        elif kind == "loc":  # shifted by half its width: IoU 1/3
            results.append(_detection(det["image_id"], det["category_id"], (x + w // 2, y, w, h), det["score"]))
        elif kind == "both":
            results.append(_detection(det["image_id"], _other(det["category_id"]), (x + w // 2, y, w, h),
                                      det["score"]))
        elif kind == "bkg":  # a detection of nothing, beside the right one
            results += [det, _detection(det["image_id"], det["category_id"], (x + 34, y + 40, 6, 6),
                                        det["score"] + 0.005)]
        # "miss": the detection is left out
    return results


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    ann_file = _dataset(root)
    return ann_file, load_coco(ann_file)


def test_perfect_results_have_ap_100_and_no_errors(case):
    _, coco_gt = case
    for iou_type in ("bbox", "segm"):
        analysis = analyze_errors(coco_gt, _perfect(coco_gt), iou_type)
        delta = analysis.delta_ap()
        assert delta["AP"] == pytest.approx(100)
        assert not any(delta["overall"][kind] for kind in ERROR_TYPES)
        assert not any(analysis.counts().values())


@pytest.mark.parametrize("kind", ["cls", "loc", "dupe", "bkg", "miss"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_one_error_type_accounts_for_the_whole_gap(case, kind, iou_type):
    _, coco_gt = case
    analysis = analyze_errors(coco_gt, _only(kind, coco_gt), iou_type)
    delta = analysis.delta_ap()
    assert delta["AP"] < 95
    assert delta["overall"][kind] == pytest.approx(100 - delta["AP"])
    assert all(delta["overall"][other] == 0 for other in ERROR_TYPES if other != kind)
    assert analysis.counts() == {other: 3 if other == kind else 0 for other in ERROR_TYPES}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_wrong_class_and_place_is_both_and_leaves_its_object_missed(case, iou_type):
    """A 'both' detection points at no ground truth (TIDE cannot tell which it was meant for): removing it
    restores precision, and its object counts as missed."""
    _, coco_gt = case
    analysis = analyze_errors(coco_gt, _only("both", coco_gt), iou_type)
    delta = analysis.delta_ap()["overall"]
    assert analysis.counts() == {kind: 3 if kind in ("both", "miss") else 0 for kind in ERROR_TYPES}
    assert delta["both"] > 0 and delta["miss"] > 0
    assert all(delta[kind] == 0 for kind in ("cls", "loc", "dupe", "bkg"))


def test_ap_matches_cocoeval_ap50(case):
    """With no crowds, no ties and no class without ground truth, TIDE's AP is COCOeval's AP50."""
    _, coco_gt = case
    results = _mixed(coco_gt)
    for iou_type in ("bbox", "segm"):
        ap50 = evaluate_results(coco_gt, results, [iou_type], verbose=False)[iou_type]["AP50"]
        assert analyze_errors(coco_gt, results, iou_type).delta_ap()["AP"] == pytest.approx(100 * ap50, abs=1e-6)


def test_confusion_matrix_of_a_known_swap(case):
    """Every circle detected as a triangle; one background detection; one square missed."""
    _, coco_gt = case
    results = []
    for det in _perfect(coco_gt):
        if det["category_id"] == 3:
            det = _detection(det["image_id"], 7, det["bbox"], det["score"])
        results.append(det)
    missed = next(i for i, det in enumerate(results) if det["category_id"] == 1)
    results.pop(missed)
    results.append(_detection(2, 1, (70, 2, 8, 8), 0.9))
    results.append(_detection(2, 1, (70, 2, 8, 8), 0.3))  # below the threshold: not counted
    gt_counts = {cat["id"]: len(coco_gt.getAnnIds(catIds=[cat["id"]])) for cat in CATEGORIES}
    matrix = confusion_matrix(analyze_errors(coco_gt, results, "bbox"), score_thresh=0.5)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 3] = gt_counts[1] - 1, 1  # squares: found, one missed
    expected[1, 2] = gt_counts[3]                          # circles taken for triangles
    expected[2, 2] = gt_counts[7]
    expected[3, 0] = 1                                     # a square on background
    np.testing.assert_array_equal(matrix, expected)


def _mixed(coco_gt, seed=1):
    """Results with every kind of error, random scores (no ties)."""
    rng = np.random.default_rng(seed)
    results = [dict(det, score=float(rng.random())) for kind in ERROR_TYPES for det in _only(kind, coco_gt)]
    return results


def _competing(coco_gt, seed=2):
    """Unmatched objects with a classification and a localisation error each, random scores: only the
    higher-scoring of the two becomes the object's true positive when fixed."""
    rng = np.random.default_rng(seed)
    return [dict(det, score=float(rng.random())) for kind in ("cls", "loc", "miss") for det in _only(kind, coco_gt)]


@pytest.mark.parametrize("make_results", [_mixed, _competing], ids=["mixed", "competing"])
def test_error_breakdown_matches_tidecv(tmp_path, make_results):
    """Same AP, error counts and dAP as tidecv (within 0.1 AP point) for boxes and masks, on a set with a crowd
    region and polygon and RLE ground truth. tidecv uses NumPy aliases that NumPy 2 removed: restored here."""
    tidecv = pytest.importorskip("tidecv")
    for alias, value in (("float", float), ("int", int), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, value)
    from tidecv import TIDE, datasets

    ann_file = _dataset(tmp_path, num_images=8, crowd=True)
    coco_gt = load_coco(ann_file)
    results = make_results(coco_gt) + [_detection(1, 1, (6, 63, 10, 10), 0.7), _detection(1, 3, (20, 63, 10, 10), 0.6)]
    (tmp_path / "results.json").write_text(json.dumps(results))
    short = {"Cls": "cls", "Loc": "loc", "Both": "both", "Dupe": "dupe", "Bkg": "bkg", "Miss": "miss"}
    for mode, iou_type in ((TIDE.BOX, "bbox"), (TIDE.MASK, "segm")):
        tide = TIDE()
        run_ = tide.evaluate(datasets.COCO(str(ann_file)), datasets.COCOResult(str(tmp_path / "results.json")),
                             mode=mode, name="run")
        theirs = tide.get_all_errors()
        ours = analyze_errors(coco_gt, results, iou_type)
        delta = ours.delta_ap()
        assert delta["AP"] == pytest.approx(run_.ap, abs=0.1)
        assert ours.counts() == {short[e.short_name]: n for e, n in run_.count_errors().items()}
        for name, value in theirs["main"]["run"].items():
            assert delta["overall"][short[name]] == pytest.approx(value, abs=0.1), (iou_type, name)
        assert delta["overall"]["false_pos"] == pytest.approx(theirs["special"]["run"]["FalsePos"], abs=0.1)
        assert delta["overall"]["false_neg"] == pytest.approx(theirs["special"]["run"]["FalseNeg"], abs=0.1)


def test_report_gallery_in_a_browser(tmp_path):
    """30 images: the first page shows 24 cards, the next the other 6; a class filter keeps only the images
    holding that class; the error filter only images with that error. Screenshot: analyze_report.png."""
    ann_file = _dataset(tmp_path, num_images=30)
    coco_gt = load_coco(ann_file)
    results = _mixed(coco_gt)
    page = write_report(tmp_path / "report", coco_gt, results, tmp_path / "images", command="test", progress=False)
    assert len(list((tmp_path / "report" / "images").glob("*.jpg"))) == 30
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing loaded from the network
    analysis = analyze_errors(coco_gt, results, "segm")
    shown = [(gt_rows, rows[analysis.det_score[rows] >= 0.5]) for rows, gt_rows, _ in analysis.images.values()]
    with_circle = sum(3 in set(analysis.gt_class[gt]) | set(analysis.det_class[dets]) for gt, dets in shown)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    screenshots = Path(os.environ.get("MASKRCNN_SCREENSHOTS") or tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    with chromium(1280, 2000) as driver:
        driver.get(page.as_uri())
        cards = lambda: driver.find_elements(By.CSS_SELECTOR, "#cards .card")  # noqa: E731
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(
            "const img = document.querySelector('#cards img'); return img.complete && img.naturalWidth > 0"))
        assert len(cards()) == 24
        assert "page 1 of 2 (30 images)" in driver.find_element(By.ID, "page").text
        first_page = {card.get_attribute("data-id") for card in cards()}
        driver.find_element(By.ID, "next").click()
        assert len(cards()) == 6 and not first_page & {card.get_attribute("data-id") for card in cards()}
        driver.find_element(By.ID, "prev").click()
        Select(driver.find_element(By.ID, "class")).select_by_visible_text("circle")
        assert len(cards()) == min(with_circle, 24)
        assert f"({with_circle} images)" in driver.find_element(By.ID, "page").text
        Select(driver.find_element(By.ID, "class")).select_by_visible_text("all")
        Select(driver.find_element(By.ID, "error")).select_by_visible_text("duplicate")
        assert cards() and all("dupe" in card.text for card in cards())
        Select(driver.find_element(By.ID, "error")).select_by_visible_text("any")
        driver.execute_script("document.getElementById('gallery').scrollIntoView()")
        driver.save_screenshot(str(screenshots / "analyze_report.png"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("analyze_model") / "model.pth"
    save_tiny_checkpoint(path, ["square", "circle", "triangle"])
    return path


def test_analyze_tool_from_a_checkpoint_and_from_its_results(case, checkpoint, tmp_path, capsys):
    ann_file, _ = case
    images = ann_file.parent / "images"
    run(analyze_tool.main, ["--checkpoint", str(checkpoint), "--ann", str(ann_file), "--images", str(images),
                            "--output", str(tmp_path / "a"), "--train-ann", str(ann_file),
                            "--train-images", str(images)])
    assert (tmp_path / "a" / "index.html").is_file() and (tmp_path / "a" / "results.json").is_file()
    run(analyze_tool.main, ["--results", str(tmp_path / "a" / "results.json"), "--ann", str(ann_file),
                            "--images", str(images), "--output", str(tmp_path / "b")])
    html = (tmp_path / "b" / "index.html").read_text()
    assert "Where the AP goes" in html and "--results" in html and "torch" in html
    assert "Training split" in (tmp_path / "a" / "index.html").read_text()


def test_missing_image_is_a_one_line_error_naming_it(case, tmp_path, capsys):
    ann_file, coco_gt = case
    (tmp_path / "results.json").write_text(json.dumps(_perfect(coco_gt)))
    with pytest.raises(SystemExit):
        run(analyze_tool.main, ["--results", str(tmp_path / "results.json"), "--ann", str(ann_file), "--images",
                                str(tmp_path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6 image files" in err and "001.png (image id 1)" in err


@pytest.mark.parametrize("content, message", [(None, "results file not found"), ("{", "is not JSON"),
                                              ('[{"image_id": 1}]', "entry 0 lacks category_id, score, bbox")])
def test_bad_results_file_is_a_one_line_error(case, tmp_path, capsys, content, message):
    ann_file, _ = case
    results = tmp_path / "results.json"
    if content is not None:
        results.write_text(content)
    with pytest.raises(SystemExit):
        run(analyze_tool.main, ["--results", str(results), "--ann", str(ann_file), "--images", str(tmp_path),
                                "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(results) in err
