"""The error analysis (maskrcnn.evaluation.errors), its report page (maskrcnn.evaluation.report) and
tools/analyze.py, on constructed cases whose answer is known, against tidecv, and in a headless browser."""

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

import maskrcnn.config
from maskrcnn.cli import run
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import BOUNDARY_SKIPPED, SUMMARY_KEYS, evaluate_results, load_coco
from maskrcnn.evaluation.errors import (ERROR_NAMES, ERROR_TYPES, SPECIAL_TYPES, TIDE_BG_THRESH, TIDE_POS_THRESH,
                                        UNMATCHED_ROWS, analyze_errors, confusion_matrix)
from maskrcnn.evaluation.report import OUTCOME_COLORS, VIEW_MIN_SIZE, _render, gallery_items, write_report
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
    expected = np.zeros((6, 4), dtype=np.int64)
    expected[0, 0], expected[0, 3] = gt_counts[1] - 1, 1  # squares: found, one not found
    expected[1, 2] = gt_counts[3]                          # circles taken for triangles
    expected[2, 2] = gt_counts[7]
    expected[3 + UNMATCHED_ROWS.index("bkg"), 0] = 1       # a square on background
    np.testing.assert_array_equal(matrix, expected)


def test_confusion_matrix_sorts_the_detections_that_found_no_object(case):
    """A duplicate, a poorly placed detection and one on background each land in their own row, not all in one
    row of "detections of nothing"."""
    _, coco_gt = case
    results = _perfect(coco_gt)
    first, second = results[0], results[1]  # a circle (id 3) and a triangle (id 7) of image 1
    assert (first["category_id"], second["category_id"]) == (3, 7)
    x, y, w, h = second["bbox"]
    results += [_detection(1, 3, first["bbox"], 0.9),                   # duplicate
                _detection(1, 7, (x + w // 2, y, w, h), 0.8),           # IoU 1/3
                _detection(1, 1, (70, 2, 8, 8), 0.7)]                   # a square where there is nothing
    matrix = confusion_matrix(analyze_errors(coco_gt, results, "segm"), score_thresh=0.5)
    unmatched = {kind: matrix[3 + UNMATCHED_ROWS.index(kind)].tolist() for kind in UNMATCHED_ROWS}
    assert unmatched == {"dupe": [0, 1, 0, 0], "loc": [0, 0, 1, 0], "bkg": [1, 0, 0, 0]}
    np.testing.assert_array_equal(matrix[:3, :3], np.diag([len(coco_gt.getAnnIds(catIds=[c["id"]]))
                                                           for c in CATEGORIES]))
    assert not matrix[:, 3].any()


def test_display_threshold_is_the_configs(case, monkeypatch):
    """The confusion matrix and the report default to config.DISPLAY_SCORE_THRESH (None passed down), and the
    TIDE thresholds are the module's named constants, not literals repeated in the signatures."""
    _, coco_gt = case
    results = _perfect(coco_gt)  # scores 0.99 down to 0.88
    analysis = analyze_errors(coco_gt, results, "bbox")
    monkeypatch.setattr(maskrcnn.config, "DISPLAY_SCORE_THRESH", 0.95)
    counted = int(confusion_matrix(analysis)[:3, :3].sum())
    assert counted == sum(r["score"] >= 0.95 for r in results) == 5
    assert inspect.signature(write_report).parameters["score_thresh"].default is None
    assert inspect.signature(confusion_matrix).parameters["score_thresh"].default is None
    for function, name, constant in ((analyze_errors, "pos_thresh", "TIDE_POS_THRESH"),
                                     (analyze_errors, "bg_thresh", "TIDE_BG_THRESH"),
                                     (confusion_matrix, "iou_thresh", "TIDE_POS_THRESH"),
                                     (confusion_matrix, "bg_thresh", "TIDE_BG_THRESH")):
        args = ast.parse(inspect.getsource(function)).body[0].args
        default = dict(zip([a.arg for a in args.kwonlyargs], args.kw_defaults))[name]
        assert isinstance(default, ast.Name) and default.id == constant, (function.__name__, name)
    assert (TIDE_POS_THRESH, TIDE_BG_THRESH) == (0.5, 0.1)  # tidecv's defaults


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


def _tidecv(tmp_path, ann_file, results):
    """tidecv's runs of ``results`` on ``ann_file``: {iou type: (run, errors of get_all_errors, counts)}.
    tidecv uses NumPy aliases that NumPy 2 removed: restored here."""
    tidecv = pytest.importorskip("tidecv")
    for alias, value in (("float", float), ("int", int), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, value)
    from tidecv import TIDE, datasets

    (tmp_path / "results.json").write_text(json.dumps(results))
    short = {"Cls": "cls", "Loc": "loc", "Both": "both", "Dupe": "dupe", "Bkg": "bkg", "Miss": "miss"}
    found = {}
    for mode, iou_type in ((TIDE.BOX, "bbox"), (TIDE.MASK, "segm")):
        tide = TIDE()
        run_ = tide.evaluate(datasets.COCO(str(ann_file)), datasets.COCOResult(str(tmp_path / "results.json")),
                             mode=mode, name="run")
        errors = tide.get_all_errors()
        errors = {**{short[k]: v for k, v in errors["main"]["run"].items()},
                  "false_pos": errors["special"]["run"]["FalsePos"], "false_neg": errors["special"]["run"]["FalseNeg"]}
        found[iou_type] = (run_.ap, errors, {short[e.short_name]: n for e, n in run_.count_errors().items()})
    return found


@pytest.mark.parametrize("make_results", [_mixed, _competing], ids=["mixed", "competing"])
def test_error_breakdown_matches_tidecv(tmp_path, make_results):
    """Same AP, error counts and dAP as tidecv (within 0.1 AP point) for boxes and masks, on a set with a crowd
    region and polygon and RLE ground truth."""
    ann_file = _dataset(tmp_path, num_images=8, crowd=True)
    coco_gt = load_coco(ann_file)
    results = make_results(coco_gt) + [_detection(1, 1, (6, 63, 10, 10), 0.7), _detection(1, 3, (20, 63, 10, 10), 0.6)]
    for iou_type, (ap, theirs, counts) in _tidecv(tmp_path, ann_file, results).items():
        ours = analyze_errors(coco_gt, results, iou_type)
        delta = ours.delta_ap()
        assert delta["AP"] == pytest.approx(ap, abs=0.1)
        assert ours.counts() == counts
        for kind, value in theirs.items():
            assert delta["overall"][kind] == pytest.approx(value, abs=0.1), (iou_type, kind)


def test_with_tied_scores_ap_and_counts_still_match_tidecv(tmp_path):
    """Scores rounded to 0.1 (many ties): the AP and the error counts are still tidecv's (what docs/analyze.md
    says); the dAP is not, because tidecv ranks the false positives first among equal scores when it re-scores
    with errors fixed (docs/analyze.md)."""
    ann_file = _dataset(tmp_path, num_images=8)
    coco_gt = load_coco(ann_file)
    results = [dict(r, score=round(r["score"], 1)) for r in _mixed(coco_gt)]
    assert len({r["score"] for r in results}) <= 11 < len(results)
    for iou_type, (ap, theirs, counts) in _tidecv(tmp_path, ann_file, results).items():
        ours = analyze_errors(coco_gt, results, iou_type)
        assert ours.delta_ap()["AP"] == pytest.approx(ap, abs=1e-9)
        assert ours.counts() == counts


@pytest.mark.parametrize("make_results", [_mixed, _competing, lambda gt: _only("cls", gt), lambda gt: _only("loc", gt),
                                          lambda gt: _only("miss", gt)],
                         ids=["mixed", "competing", "cls", "loc", "miss"])
def test_gallery_counts_errors_as_the_chart_does(case, make_results):
    """Shown at any score, the gallery's counts are the chart's, type by type: an object that a classification
    or localisation error points at is not also missed, so no error counts twice in "most errors"."""
    _, coco_gt = case
    results = make_results(coco_gt)
    analysis = analyze_errors(coco_gt, results, "segm")
    records = [record for record, _ in gallery_items(coco_gt, results, analysis, score_thresh=0.0)]
    chart = analysis.counts()
    assert {kind: sum(r["errors"].get(kind, 0) for r in records) for kind in ERROR_TYPES} == chart
    assert sum(r["miss"] for r in records) == chart["miss"]
    assert sum(r["fp"] + r["miss"] for r in records) == sum(chart.values())  # the "most errors" order's key


def test_gallery_counts_misses_as_the_chart_above_the_display_threshold(case):
    """Classification errors (every fourth object, scores >= 0.88) shown at the display threshold: each image
    with one holds one error, not a classification error and a missed object; an object found by a true
    positive below the threshold is drawn as such, not missed."""
    _, coco_gt = case
    results = _only("cls", coco_gt)
    analysis = analyze_errors(coco_gt, results, "bbox")
    items = gallery_items(coco_gt, results, analysis, score_thresh=0.5)
    assert [(r["errors"], r["fp"] + r["miss"]) for r, _ in items if r["fp"]] == [({"cls": 1}, 1)] * 3
    assert not any(r["miss"] or r["below"] for r, _ in items)
    items = gallery_items(coco_gt, _perfect(coco_gt), analyze_errors(coco_gt, _perfect(coco_gt), "bbox"),
                          score_thresh=0.95)
    assert [(r["tp"], r["miss"], r["below"]) for r, _ in items] == [(2, 0, 0), (2, 0, 0), (1, 0, 1), (0, 0, 2),
                                                                    (0, 0, 2), (0, 0, 2)]
    assert {m["outcome"] for _, marks in items[3:] for m in marks} == {"below"}


def _close(picture, color, tolerance=40):
    """``(H, W)`` bool: the pixels of ``picture`` within ``tolerance`` (per channel) of the RGB ``color``."""
    return np.abs(picture.astype(int) - np.array(color)).max(axis=2) <= tolerance


@pytest.mark.parametrize("scale", [4.0, 10.0])
def test_an_error_drawn_over_another_outline_leaves_both_visible(scale):
    """A duplicate exactly over its true positive, a classification error exactly over its object: both
    outlines of each pair show (the error's is dashed, on top)."""
    image = np.full((80, 80, 3), 110, dtype=np.uint8)
    for under in ("tp", "gt"):
        marks = [{"outcome": under, "bbox": [10, 12, 40, 30], "rle": _rle(10, 12, 40, 30), "label": ""},
                 {"outcome": "fp", "bbox": [10, 12, 40, 30], "rle": _rle(10, 12, 40, 30), "label": ""}]
        picture = _render(image, marks, scale)
        alone = _render(image, marks[:1], scale)
        assert _close(picture, OUTCOME_COLORS["fp"]).sum() > 0.25 * _close(alone, OUTCOME_COLORS[under]).sum()
        assert _close(picture, OUTCOME_COLORS[under]).sum() > 0.25 * _close(alone, OUTCOME_COLORS[under]).sum(), under


def test_an_error_on_a_one_pixel_part_is_drawn_as_a_dot():
    """A dashed outline of a one-pixel mask (its path is a single point) shows, rather than stopping the page."""
    image = np.full((40, 40, 3), 110, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=np.uint8, order="F")
    mask[20, 20] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    picture = _render(image, [{"outcome": "fp", "bbox": [20, 20, 1, 1], "rle": rle, "label": ""}], 4.0)
    assert _close(picture, OUTCOME_COLORS["fp"]).sum() > 0


def _label_boxes(picture):
    """(x, y, w, h) of the dark label boxes drawn on a light picture."""
    dark = (picture.max(axis=2) <= 40).astype(np.uint8)
    contours, _ = cv2.findContours(dark, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)  # not the holes of letters
    return sorted(cv2.boundingRect(c) for c in contours if cv2.contourArea(c) > 20)


def test_labels_of_marks_at_one_place_do_not_cover_each_other():
    image = np.full((80, 80, 3), 200, dtype=np.uint8)
    marks = [{"outcome": outcome, "bbox": [10, 30, 40, 30], "rle": None, "label": label}
             for outcome, label in (("tp", "circle 0.99"), ("fp", "circle 0.98 dupe"), ("fp", "square 0.97 cls"),
                                    ("miss", "missed circle"))]
    for scale in (4.0, 10.0):
        boxes = _label_boxes(_render(image, marks, scale))
        assert len(boxes) == 4, boxes
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1:]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_full_view_is_written_beside_each_thumbnail_with_large_text(case, tmp_path):
    """The full view of a small image is enlarged to VIEW_MIN_SIZE, and its labels' letters are at least 1/50 of
    it high (16 px; the 0.4-scale Hershey text the thumbnails had is 10)."""
    image = np.full((80, 80, 3), 200, dtype=np.uint8)
    marks = [{"outcome": "fp", "bbox": [10, 30, 40, 30], "rle": None, "label": "circle 0.98 dupe"}]
    picture = _render(image, marks, VIEW_MIN_SIZE / 80)
    assert picture.shape[:2] == (VIEW_MIN_SIZE, VIEW_MIN_SIZE)
    [(x, y, w, h)] = _label_boxes(picture)
    letters = _close(picture[y:y + h, x:x + w], OUTCOME_COLORS["fp"], tolerance=60)
    assert letters.any(axis=1).sum() >= VIEW_MIN_SIZE / 50
    ann_file, coco_gt = case
    write_report(tmp_path, coco_gt, _perfect(coco_gt), ann_file.parent / "images", command="test", progress=False)
    views = sorted((tmp_path / "images").glob("*_full.jpg"))
    assert len(views) == 6 and all(cv2.imread(str(v)).shape[:2] == (VIEW_MIN_SIZE,) * 2 for v in views)


@pytest.fixture(scope="module")
def mixed_page(case, tmp_path_factory):
    """The report of mixed errors on the 6-image set: its HTML."""
    ann_file, coco_gt = case
    out = tmp_path_factory.mktemp("mixed_report")
    return write_report(out, coco_gt, _mixed(coco_gt), ann_file.parent / "images", command="test",
                        progress=False).read_text()


def _svgs(page, cls):
    return re.findall(rf'<svg class="{cls}".*?</svg>', page)


def test_bounds_are_charted_apart_from_the_error_types(case, mixed_page):
    """The error chart holds the six error types, its longest bar the largest of them; the two bounds,
    larger here, have a chart of their own."""
    _, coco_gt = case
    charts = _svgs(mixed_page, "chart")
    assert len(charts) == 4  # errors and bounds, for boxes and masks
    for chart, iou_type in zip(charts[::2], ("bbox", "segm")):
        overall = analyze_errors(coco_gt, _mixed(coco_gt), iou_type).delta_ap()["overall"]
        assert max(overall[k] for k in SPECIAL_TYPES) > max(overall[k] for k in ERROR_TYPES)
        assert 'data-chart="errors"' in chart
        labels = re.findall(r'text-anchor="end">([^<]*)</text>', chart)
        assert [label.rsplit(" (", 1)[0] for label in labels] == [ERROR_NAMES[k] for k in ERROR_TYPES]
        widths = [float(w) for w in re.findall(r'<rect [^>]*width="([\d.]+)"', chart)]
        assert widths.index(max(widths)) == list(ERROR_TYPES).index(max(ERROR_TYPES, key=overall.get))
        assert max(widths) == pytest.approx(420 - 190 - 60)
    for chart in charts[1::2]:
        assert 'data-chart="bounds"' in chart
        assert re.findall(r'text-anchor="end">([^<]*)</text>', chart) == [ERROR_NAMES[k] for k in SPECIAL_TYPES]


def test_precision_recall_charts_have_tick_values_and_name_each_line(mixed_page):
    charts = _svgs(mixed_page, "pr")
    assert len(charts) == 3
    for chart in charts:
        for axis in ("x", "y"):
            assert re.findall(rf'class="tick {axis}">([^<]*)<', chart) == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
        curves = re.findall(r'<polyline [^>]*class="(c\d)"', chart)
        legend = re.findall(r'<line [^>]*class="(c\d)"/><text [^>]*>([^<]*)</text>', chart)
        assert [c for c, _ in legend] == curves == ["c0", "c1", "c2", "c3"]
        assert [text.split(":")[0] for _, text in legend] == ["box, IoU 0.50", "box, IoU 0.75", "mask, IoU 0.50",
                                                              "mask, IoU 0.75"]


def test_confusion_table_names_its_rows_for_what_they_hold(mixed_page):
    rows = re.findall(r"<tr><td><b>([^<]*)</b>", mixed_page.split('id="confusion"')[1].split("</section>")[0])
    assert rows == ["square", "circle", "triangle", "duplicate", "poorly localised", "background"] * 2


def _cells(row):
    return [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]


def _percent(value):
    return "-" if value is None else f"{100 * value:.1f}"


def test_ap_tables_show_boundary_ap_per_size_and_per_class(case, tmp_path):
    """Boundary AP is a row of the AP table (overall, AP50, AP75 and per object size) and a column of the
    per-class table, with evaluate_results' numbers: here, every mask one pixel short of its object's outline,
    far below mask AP."""
    ann_file, coco_gt = case
    results = [_detection(d["image_id"], d["category_id"], (x + 1, y + 1, w - 2, h - 2), d["score"])
               for d in _perfect(coco_gt) for x, y, w, h in [d["bbox"]]]
    page = write_report(tmp_path, coco_gt, results, ann_file.parent / "images", command="test", progress=False)
    metrics = evaluate_results(coco_gt, results, verbose=False)
    section = page.read_text().split('<section id="ap">')[1].split("</section>")[0]
    summary, per_class = (re.findall(r"<tr>(.*?)</tr>", table) for table in re.findall(r"<table.*?</table>", section))
    assert _cells(summary[0]) == ["", *SUMMARY_KEYS]
    rows = {cells[0]: cells[1:] for cells in map(_cells, summary[1:])}
    assert list(rows) == ["box", "mask", "boundary"]
    assert rows["boundary"] == [_percent(metrics["boundary"][k]) for k in SUMMARY_KEYS]
    assert metrics["boundary"]["AP"] < metrics["segm"]["AP"] - 0.5
    assert _cells(per_class[0]) == ["class", "box AP", "mask AP", "boundary AP"]
    assert [cells[3] for cells in map(_cells, per_class[1:])] == [
        _percent(metrics["boundary"]["per_category"][cat["name"]]) for cat in CATEGORIES]
    assert "Boundary AP" in section and "docs/evaluation.md" in section


def test_without_faster_coco_eval_the_page_says_boundary_ap_was_skipped(case, tmp_path, monkeypatch):
    ann_file, coco_gt = case
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval fails
    with pytest.warns(UserWarning, match=re.escape(BOUNDARY_SKIPPED)):
        page = write_report(tmp_path, coco_gt, _perfect(coco_gt), ann_file.parent / "images", command="test",
                            progress=False).read_text()
    assert f'<p class="warning">{BOUNDARY_SKIPPED}</p>' in page and "boundary AP" not in page


@pytest.fixture(scope="module")
def gallery_page(tmp_path_factory):
    """The report of mixed errors on 30 images: (ground truth, results, page path)."""
    root = tmp_path_factory.mktemp("gallery")
    coco_gt = load_coco(_dataset(root, num_images=30))
    results = _mixed(coco_gt)
    return coco_gt, results, write_report(root / "report", coco_gt, results, root / "images", command="test",
                                          progress=False)


def test_report_gallery_in_a_browser(gallery_page):
    """30 images: the first page shows 24 cards, the next the other 6; a class filter keeps only the images
    holding that class; the error filter only images with that error. Screenshot: analyze_report.png."""
    coco_gt, results, page = gallery_page
    assert len(list((page.parent / "images").glob("*[0-9].jpg"))) == 30
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing loaded from the network
    analysis = analyze_errors(coco_gt, results, "segm")
    shown = [(gt_rows, rows[analysis.det_score[rows] >= 0.5]) for rows, gt_rows, _ in analysis.images.values()]
    with_circle = sum(3 in set(analysis.gt_class[gt]) | set(analysis.det_class[dets]) for gt, dets in shown)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    screenshots = Path(os.environ.get("MASKRCNN_SCREENSHOTS") or page.parent)
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


def test_a_click_on_a_thumbnail_opens_it_at_full_size_with_the_legend(gallery_page):
    """From disk, no server: the picture opens in the page, VIEW_MIN_SIZE wide, with the legend and the image's
    counts; Escape closes it. Screenshot: analyze_view.png."""
    _, _, page = gallery_page
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    screenshots = Path(os.environ.get("MASKRCNN_SCREENSHOTS") or page.parent)
    with chromium(1280, 1200) as driver:
        driver.get(page.as_uri())
        viewer = driver.find_element(By.ID, "viewer")
        assert not viewer.is_displayed()
        card = driver.find_element(By.CSS_SELECTOR, "#cards .card")
        card.find_element(By.TAG_NAME, "img").click()
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(
            "const img = document.getElementById('viewer-img'); return img.complete && img.naturalWidth > 0"))
        assert viewer.is_displayed()
        assert driver.execute_script("return document.getElementById('viewer-img').naturalWidth") == VIEW_MIN_SIZE
        assert driver.find_element(By.ID, "viewer-img").size["width"] == VIEW_MIN_SIZE  # fits: shown 1:1
        legend = viewer.find_element(By.CLASS_NAME, "legend")
        assert legend.is_displayed() and "missed" in legend.text and "true positive" in legend.text
        assert card.find_element(By.CLASS_NAME, "meta").text in driver.find_element(By.ID, "viewer-meta").text
        driver.save_screenshot(str(screenshots / "analyze_view.png"))
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        assert not viewer.is_displayed()


def test_results_partly_without_masks_warn_and_the_page_says_so(case, tmp_path):
    """One result without a segmentation leaves the masks out: a warning and the page say so, naming it."""
    ann_file, coco_gt = case
    results = _perfect(coco_gt)
    del results[3]["segmentation"]
    note = "1 of 12 results have no 'segmentation' (the first: result 3, image id 2): masks are not analysed"
    with pytest.warns(UserWarning, match=re.escape(note)):
        page = write_report(tmp_path, coco_gt, results, ann_file.parent / "images", command="test", progress=False)
    html = page.read_text()
    assert f'<p class="warning">{note}'.replace("'", "&#x27;") in html and "masks: AP50" not in html


def test_the_tool_prints_the_missing_masks_warning_as_one_line(case, tmp_path):
    ann_file, coco_gt = case
    results = _perfect(coco_gt)
    del results[5]["segmentation"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    done = subprocess.run([sys.executable, "tools/analyze.py", "--results", str(tmp_path / "results.json"), "--ann",
                           str(ann_file), "--images", str(ann_file.parent / "images"), "--output", str(tmp_path)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "segmentation" in line] == [
        "warning: 1 of 12 results have no 'segmentation' (the first: result 5, image id 3): masks are not "
        "analysed, boxes only"]


def test_polygon_results_are_converted_at_their_images_size(tmp_path, capsys):
    """Results with polygon masks, or uncompressed RLE, on an image 50 high and 90 wide: the same analysis as
    the same masks in compressed RLE, and a report with masks, not a pycocotools TypeError."""
    height, width = 50, 90
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "wide.png"), np.full((height, width, 3), 90, dtype=np.uint8))
    boxes = {1: (5, 5, 30, 20), 3: (50, 20, 30, 25)}

    def polygon(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    def mask(x, y, w, h):
        bits = np.zeros((height, width), dtype=np.uint8, order="F")
        bits[y:y + h, x:x + w] = 1
        return bits

    def rle(*box):
        return dict(mask_utils.encode(mask(*box)), counts=mask_utils.encode(mask(*box))["counts"].decode())

    def uncompressed(*box):
        """COCO's uncompressed RLE: run lengths of the column-major pixels, the first run of zeros."""
        pixels = mask(*box).ravel(order="F")
        edges = np.flatnonzero(np.diff(pixels)) + 1
        runs = np.diff(np.concatenate([[0], edges, [pixels.size]]))
        return {"counts": ([0] if pixels[0] else []) + runs.tolist(), "size": [height, width]}

    annotations = [{"id": cat, "image_id": 1, "category_id": cat, "bbox": list(box), "area": box[2] * box[3],
                    "iscrowd": 0, "segmentation": polygon(*box)} for cat, box in boxes.items()]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "wide.png", "height": height, "width": width}],
                                    "annotations": annotations, "categories": CATEGORIES}))
    coco_gt = load_coco(ann_file)
    placed = [(1, boxes[1], 0.9), (3, (65, 20, 30, 25), 0.8)]  # the second one shifted: a localisation error
    as_polygons = [{"image_id": 1, "category_id": c, "bbox": list(b), "score": s, "segmentation": polygon(*b)}
                   for c, b, s in placed]
    as_rle = [dict(r, segmentation=rle(*r["bbox"])) for r in as_polygons]
    as_uncompressed = [dict(r, segmentation=uncompressed(*r["bbox"])) for r in as_polygons]
    reference = analyze_errors(coco_gt, as_rle, "segm")
    assert reference.counts() == {k: int(k == "loc") for k in ERROR_TYPES}
    for results in (as_polygons, as_uncompressed):
        ours = analyze_errors(coco_gt, results, "segm")
        assert ours.counts() == reference.counts() and ours.delta_ap() == reference.delta_ap()
    (tmp_path / "results.json").write_text(json.dumps(as_polygons))
    run(analyze_tool.main, ["--results", str(tmp_path / "results.json"), "--ann", str(ann_file), "--images",
                            str(tmp_path / "images"), "--output", str(tmp_path / "report")])
    assert "masks: AP50 50.0" in (tmp_path / "report" / "index.html").read_text()


@pytest.mark.parametrize("segmentation, message", [
    ("abc", "result 2 (image id 2): 'segmentation' is neither COCO RLE (a dict of 'counts' and 'size') nor a list "
            "of polygons"),
    ([[4, 6, 34, 6]], "result 2 (image id 2): 'segmentation' is neither"),
    ({"counts": "PPYo1", "size": [40, 80]}, "result 2 (image id 2): its segmentation RLE has size [40, 80], its "
                                            "image is [80, 80]")], ids=["text", "short-polygon", "rle-size"])
def test_unusable_segmentation_is_a_one_line_error_naming_the_result(case, tmp_path, capsys, segmentation, message):
    ann_file, coco_gt = case
    results = _perfect(coco_gt)
    results[2]["segmentation"] = segmentation
    with pytest.raises(InputError, match=re.escape(message)):
        analyze_errors(coco_gt, results, "segm")
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit):
        run(analyze_tool.main, ["--results", str(tmp_path / "results.json"), "--ann", str(ann_file), "--images",
                                str(ann_file.parent / "images"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


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


@pytest.mark.parametrize("content, message", [(None, "results file not found"), ("{", "is not readable JSON"),
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
