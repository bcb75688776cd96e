"""Boundary AP (maskrcnn.evaluation.coco_evaluator, scored by faster-coco-eval's boundary mode): known answers on
constructed masks, and every detection x ground truth IoU of synthetic-shape masks against Boundary IoU computed
here from its definition (Cheng et al. 2021, as their reference implementation, boundary-iou-api, computes it)."""

import contextlib
import io
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.data.shapes import CATEGORIES, render_image
from maskrcnn.evaluation.coco_evaluator import BOUNDARY_SKIPPED, SUMMARY_KEYS, evaluate_results, run_cocoeval

PAPER_DILATION_RATIO = 0.02  # the paper's band width: 2% of the image diagonal
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's


def boundary_region(mask, dilation=None, pad=True):
    """The boundary region of an ``(H, W)`` bool mask: the mask minus its erosion by d pixels, d =
    round(0.02 * image diagonal) (at least 1), eroded as boundary-iou-api does (3x3 kernel, d times) after one
    pixel of zero padding, so that a mask cut by the image border has a boundary along it.

    dilation, pad: another band width, or no padding: the definitions that the data must tell apart.
    """
    h, w = mask.shape
    if dilation is None:
        dilation = max(1, int(round(PAPER_DILATION_RATIO * np.sqrt(h ** 2 + w ** 2))))
    kernel = np.ones((3, 3), dtype=np.uint8)
    if pad:
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, kernel, iterations=dilation)[1:h + 1, 1:w + 1]
    else:  # OpenCV's default border erodes nothing from outside the image
        eroded = cv2.erode(mask.astype(np.uint8), kernel, iterations=dilation)
    return mask & ~eroded.astype(bool)


def mask_iou(dt, gt):
    return np.logical_and(dt, gt).sum() / np.logical_or(dt, gt).sum()


def boundary_iou(dt, gt, **definition):
    """|G_d ∩ P_d ∩ G ∩ P| / |(G_d ∩ G) ∪ (P_d ∩ P)|: the IoU of the two boundary regions."""
    return mask_iou(boundary_region(dt, **definition), boundary_region(gt, **definition))


def pair_iou(dt, gt, crowd=False, **definition):
    """The IoU Boundary AP matches with: min(mask IoU, Boundary IoU); against a crowd region COCO's crowd IoU
    (the share of the detection inside it), with no boundary term, as boundary-iou-api does."""
    if crowd:
        return np.logical_and(dt, gt).sum() / dt.sum()
    return min(mask_iou(dt, gt), boundary_iou(dt, gt, **definition))


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _ground_truth(images, annotations):
    """A pycocotools COCO of ``images`` (dicts) and ``(image_id, category_id, mask, iscrowd)`` annotations."""
    coco = COCO()
    coco.dataset = {"images": images, "categories": CATEGORIES, "annotations": [
        {"id": n, "image_id": image_id, "category_id": cat, "segmentation": _rle(mask), "area": float(mask.sum()),
         "bbox": mask_utils.toBbox(_rle(mask)).tolist(), "iscrowd": int(crowd)}
        for n, (image_id, cat, mask, crowd) in enumerate(annotations, start=1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _result(image_id, cat, mask, score):
    return {"image_id": image_id, "category_id": cat, "score": score, "segmentation": _rle(mask),
            "bbox": mask_utils.toBbox(_rle(mask)).tolist()}


def _large_object(height=300, width=400):
    """A 300x400 image (diagonal 500: d = 10 px) holding an ellipse of 280 x 200 px, and its ground truth."""
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.ellipse(mask, (200, 150), (140, 100), 20, 0, 360, 1, -1)
    image = {"id": 1, "file_name": "1.png", "height": height, "width": width}
    return mask.astype(bool), _ground_truth([image], [(1, 1, mask.astype(bool), False)])


def _ap(iou):
    """COCO AP of one detection on its one object: the share of IoU thresholds its IoU reaches."""
    return float(np.mean(IOU_THRESHOLDS <= iou))


@pytest.mark.parametrize("backend", ["pycocotools", "faster-coco-eval"])
def test_a_mask_equal_to_the_ground_truth_has_boundary_ap_one(backend):
    mask, coco_gt = _large_object()
    metrics = evaluate_results(coco_gt, [_result(1, 1, mask, 0.9)], verbose=False, backend=backend)
    assert metrics["boundary"]["AP"] == metrics["boundary"]["APl"] == pytest.approx(1.0)
    assert metrics["boundary"]["per_category"] == {"square": pytest.approx(1.0), "circle": None, "triangle": None}


def test_an_eroded_outline_keeps_mask_ap_and_loses_boundary_ap():
    """The ground truth eroded by 3 px: the same body (mask IoU > 0.9), but of its 10 px boundary band only 7
    of 13 px overlap (Boundary IoU about 0.54): mask AP 0.9, Boundary AP 0.1."""
    mask, coco_gt = _large_object()
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=3).astype(bool)
    assert mask_iou(eroded, mask) > 0.9 and boundary_iou(eroded, mask) < 0.6
    metrics = evaluate_results(coco_gt, [_result(1, 1, eroded, 0.9)], verbose=False)
    assert metrics["segm"]["AP"] == pytest.approx(_ap(mask_iou(eroded, mask))) == pytest.approx(0.9)
    assert metrics["boundary"]["AP"] == pytest.approx(_ap(pair_iou(eroded, mask))) == pytest.approx(0.1)


def _shift(mask, dx, dy):
    """``mask`` moved by (dx, dy) pixels, what leaves the image lost."""
    moved = np.zeros_like(mask)
    h, w = mask.shape
    moved[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0),
                                                                        max(-dx, 0):w - max(dx, 0)]
    return moved


def _perturbed(mask, n, rng):
    """The n-th kind of error on a ground truth mask: eroded, dilated, shifted (up to off the image's edge),
    its outline roughened, or as it is."""
    kernel = np.ones((3, 3), np.uint8)
    kind = n % 5
    if kind == 0:
        out = cv2.erode(mask.astype(np.uint8), kernel, iterations=int(rng.integers(1, 4)))
    elif kind == 1:
        out = cv2.dilate(mask.astype(np.uint8), kernel, iterations=int(rng.integers(1, 5)))
    elif kind == 2:
        ys, xs = np.nonzero(mask)
        out = _shift(mask, int(-xs.min() - 3 if n % 2 else rng.integers(-6, 7)), int(rng.integers(-6, 7)))
    elif kind == 3:
        noise = rng.random(mask.shape) < 0.5
        edge = cv2.dilate(mask.astype(np.uint8), kernel, iterations=2).astype(bool) & ~cv2.erode(
            mask.astype(np.uint8), kernel, iterations=2).astype(bool)
        out = np.where(edge, noise, mask)
    else:
        out = mask
    return out.astype(bool)


@pytest.fixture(scope="module")
def shapes_case():
    """Synthetic-shape images (maskrcnn.data.shapes) with their instances as ground truth, crowd regions
    included, and per object one perturbed mask as detection: (images, ground truth rows, detection rows,
    COCO ground truth, results)."""
    rng = np.random.default_rng(3)
    images, gts, dts = [], [], []
    while len(gts) < 40:
        pixels, instances = render_image(rng, min_size=96, max_size=320)
        height, width = pixels.shape[:2]
        band = PAPER_DILATION_RATIO * np.hypot(height, width)
        assert abs(band % 1 - 0.5) > 1e-6, "a tie in the rounding of the band width: see docs/evaluation.md"
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
        for category, mask, _, crowd in instances:
            gts.append((image_id, category, mask, crowd))
            detected = _perturbed(mask, len(gts), rng)
            if detected.any():
                dts.append((image_id, category, detected, 1.0 - 0.001 * len(dts)))
    coco_gt = _ground_truth(images, gts)
    return images, gts, dts, coco_gt, [_result(*row) for row in dts]


def _expected_ious(gts, dts, image_id, cat, **definition):
    """The pair IoUs of one image and category: rows the detections highest score first, columns the ground
    truth in annotation order, as COCOeval's ``ious`` holds them."""
    rows = sorted((d for d in dts if d[:2] == (image_id, cat)), key=lambda d: -d[3])
    cols = [g for g in gts if g[:2] == (image_id, cat)]
    return np.array([[pair_iou(d[2], g[2], g[3], **definition) for g in cols] for d in rows])


def test_each_pairs_iou_is_the_papers_boundary_iou_where_it_is_below_mask_iou(shapes_case):
    """faster-coco-eval's IoU of every detection x ground truth pair (the IoUs Boundary AP matches with) equals
    min(mask IoU, Boundary IoU) computed here from the definition, exactly; a band one pixel wider or narrower,
    or no padding at the image border, gives other numbers on these masks."""
    images, gts, dts, coco_gt, results = shapes_case
    evaluator = run_cocoeval(coco_gt, results, "boundary")
    pairs = {(d[0], d[1]) for d in dts} & {(g[0], g[1]) for g in gts}
    assert len(pairs) >= 20 and sum(g[3] for g in gts) >= 1  # crowd regions among them
    compared = alternatives = overlapping = boundary_bound = 0
    for image_id, cat in sorted(pairs):
        expected = _expected_ious(gts, dts, image_id, cat)
        np.testing.assert_array_equal(np.asarray(evaluator.ious[image_id, cat]), expected)
        compared += expected.size
        size = next((img["height"], img["width"]) for img in images if img["id"] == image_id)
        d = max(1, int(round(PAPER_DILATION_RATIO * np.hypot(*size))))
        for other in ({"dilation": d - 1}, {"dilation": d + 1}, {"pad": False}):
            alternatives += not np.array_equal(_expected_ious(gts, dts, image_id, cat, **other), expected)
        for det in (d for d in dts if d[:2] == (image_id, cat)):
            for gt in (g for g in gts if g[:2] == (image_id, cat) and not g[3]):
                if 0 < mask_iou(det[2], gt[2]) < 1:
                    overlapping += 1
                    boundary_bound += boundary_iou(det[2], gt[2]) < mask_iou(det[2], gt[2])
    assert compared >= 80 and overlapping >= 30
    assert boundary_bound >= 2 * overlapping // 3  # the boundary term decides most pairs that overlap
    assert alternatives >= len(pairs)  # the wrong definitions differ on many image/category pairs


class _IoUsFromDefinition(COCOeval):
    """pycocotools' COCOeval matching on :func:`pair_iou` of the decoded masks."""

    def computeIoU(self, imgId, catId):
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gts or not dts:
            return []
        dts = [dts[i] for i in np.argsort([-d["score"] for d in dts], kind="mergesort")][:self.params.maxDets[-1]]
        decode = lambda ann: mask_utils.decode(self.cocoGt.annToRLE(ann)).astype(bool)  # noqa: E731
        return np.array([[pair_iou(decode(d), decode(g), g["iscrowd"]) for g in gts] for d in dts])


def test_boundary_ap_is_cocos_ap_over_the_papers_ious(shapes_case):
    """Boundary AP, overall, per size and per class, equals pycocotools' AP when its matching uses the IoUs
    computed here from the definition."""
    _, _, _, coco_gt, results = shapes_case
    metrics = evaluate_results(coco_gt, results, ("boundary",), verbose=False)["boundary"]
    dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]  # areas from the masks, as for segm
    reference = _IoUsFromDefinition(coco_gt, coco_gt.loadRes(dets), "segm")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    for key, value in zip(SUMMARY_KEYS, reference.stats[:6]):
        assert metrics[key] == (None if value < 0 else pytest.approx(value, abs=1e-12)), key
    assert metrics["AP"] < evaluate_results(coco_gt, results, ("segm",), verbose=False)["segm"]["AP"]
    for k, cat in enumerate(reference.params.catIds):
        p = reference.eval["precision"][:, :, k, 0, -1]
        assert metrics["per_category"][coco_gt.cats[cat]["name"]] == pytest.approx(p[p > -1].mean(), abs=1e-12)


def test_without_faster_coco_eval_boundary_ap_is_skipped_in_one_line(monkeypatch, capsys):
    mask, coco_gt = _large_object()
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import faster_coco_eval fails
    metrics = evaluate_results(coco_gt, [_result(1, 1, mask, 0.9)], verbose=False)
    assert set(metrics) == {"bbox", "segm"} and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert capsys.readouterr().out == BOUNDARY_SKIPPED + "\n"
