"""Where the AP goes: TIDE's error breakdown, a confusion matrix and precision-recall curves, from COCO results.

    analysis = analyze_errors(load_coco("instances_val.json"), results, "segm")
    analysis.delta_ap()["overall"]["dupe"]     # AP50 points gained if every duplicate were removed
    confusion_matrix(analysis)     # detections scoring at least maskrcnn.config.DISPLAY_SCORE_THRESH

The error types are those of TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection
Errors", ECCV 2020) with the definitions of its reference code, ``tidecv``: detections are matched to ground
truth image by image, highest score first, each to the unmatched ground truth of its class with the highest
IoU, when that IoU is at least the foreground threshold ``pos_thresh`` (:data:`TIDE_POS_THRESH`). A detection
left unmatched is an error of the first of these kinds that applies (IoU is its largest with the ground truth
named):

- ``loc``  localisation: IoU in [bg_thresh, pos_thresh] with ground truth of its class;
- ``cls``  classification: IoU >= pos_thresh with ground truth of another class;
- ``dupe`` duplicate: IoU >= pos_thresh with ground truth of its class already matched to a higher score;
- ``bkg``  background: IoU <= bg_thresh (:data:`TIDE_BG_THRESH`) with every ground truth;
- ``both`` classification and localisation: anything else (IoU in (bg_thresh, pos_thresh) with another class).

Ground truth left unmatched that no ``cls``/``loc`` error points at is ``miss``. The AP of an error type is
the AP50 gained when its errors alone are fixed: a ``cls``/``loc`` error becomes the true positive of its
ground truth (only the highest-scoring such error per ground truth, and only where that ground truth is
unmatched; the others are removed), ``dupe``/``bkg``/``both`` detections are removed, a ``miss`` leaves the
ground truth count. Two further figures bound what precision and recall could give: ``false_pos`` (every
false positive scored below every true positive) and ``false_neg`` (every unmatched ground truth removed).

AP here is TIDE's: AP at IoU ``pos_thresh``, 101-point interpolation as in COCOeval, in points (0-100),
averaged over the classes that have ground truth or detections (a class with detections but no ground truth
counts as 0, where COCOeval leaves it out). Crowd regions follow COCO: an unmatched detection of their class
with crowd IoU above ``pos_thresh`` is left out of the AP (its error is still classified and fixable, as in
``tidecv``). Only the ``max_dets`` highest-scoring detections of each image count. Masks may be given as
COCO RLE or as polygons (:func:`rle_results` converts them at their image's size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_utils

import maskrcnn.config
from maskrcnn.errors import InputError

# TIDE's definitions, not settings: the IoU at which a detection finds an object (its foreground threshold)
# and the IoU at or below which it overlaps nothing (its background threshold). The error types, and their
# agreement with tidecv, are those of these values.
TIDE_POS_THRESH = 0.5
TIDE_BG_THRESH = 0.1

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
SPECIAL_TYPES = ("false_pos", "false_neg")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "classification + localisation",
               "dupe": "duplicate", "bkg": "background", "miss": "missed", "false_pos": "all false positives",
               "false_neg": "all false negatives"}
RECALL_POINTS = np.arange(101) / 100  # COCOeval's (and tidecv's) recall grid
# Rows of the confusion matrix after the classes: detections that found no object, by why (see confusion_matrix).
UNMATCHED_ROWS = ("dupe", "loc", "bkg")


def _geometry(ann: dict, coco_gt, iou_type: str):
    """The box (x, y, w, h) or the RLE of a ground truth annotation (polygons converted)."""
    return ann["bbox"] if iou_type == "bbox" else coco_gt.annToRLE(ann)


def _iou(dets: list, gts: list, crowd: bool = False) -> np.ndarray:
    """``(D, G)`` IoU of boxes (x, y, w, h) or RLEs; with ``crowd`` the area of the detection is the union."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou(dets, gts, [int(crowd)] * len(gts)), dtype=np.float64).reshape(len(dets), len(gts))


def precision_curve(scores: np.ndarray, true_positive: np.ndarray, num_gt: int) -> np.ndarray:
    """Interpolated precision at the 101 recall points :data:`RECALL_POINTS` (COCOeval's rule).

    scores: ``(D,)`` detection scores; true_positive: ``(D,)`` bool; num_gt: ground truth count (> 0).
    Returns ``(101,)`` precision in 0-1, 0 beyond the highest recall reached.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(true_positive, dtype=bool)[order]
    correct = np.cumsum(hits)
    precision = correct / np.arange(1, len(hits) + 1)
    recall = correct / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # remove the dips
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    curve = np.zeros(len(RECALL_POINTS))
    inside = index < len(precision)
    curve[inside] = precision[index[inside]]
    return curve


def _class_aps(points: Tuple[np.ndarray, np.ndarray, np.ndarray], num_gt: Dict[int, int]) -> Dict[int, float]:
    """AP (points) per class of (classes, scores, true positive) detections against ``num_gt`` ground truth:
    every class with ground truth or detections; 0 where it has no ground truth."""
    classes, scores, hits = points
    aps = {}
    for cat in sorted(set(classes.tolist()) | {c for c, n in num_gt.items() if n > 0}):
        n = num_gt.get(cat, 0)
        keep = classes == cat
        aps[cat] = 100 * float(precision_curve(scores[keep], hits[keep], n).mean()) if n > 0 else 0.0
    return aps


@dataclass
class ErrorAnalysis:
    """TIDE's matching of one result set against the ground truth, for one IoU type.

    Detection arrays have one entry per detection counted (the ``max_dets`` best of each image of the
    ground truth), in image order then score order; ground-truth arrays one per non-crowd annotation.
    ``det_index``: position in the results list; ``det_status``: "tp" or an error type; ``det_ignored``:
    left out of the AP by a crowd region; ``det_gt``: the annotation id it matched (tp) or whose error it is
    (cls, loc, dupe), else -1; ``det_fixed_class``: the class it would take when fixed; ``det_fixes``: a
    cls/loc error that becomes a true positive when fixed. ``gt_status``: "tp", "miss" or "fixable" (unmatched,
    but a cls/loc error points at it). ``images``: per image id, (detection positions, gt positions, IoU).
    """

    iou_type: str
    pos_thresh: float
    bg_thresh: float
    category_ids: List[int]
    det_index: np.ndarray
    det_image: np.ndarray
    det_class: np.ndarray
    det_score: np.ndarray
    det_status: np.ndarray
    det_ignored: np.ndarray
    det_gt: np.ndarray
    det_fixed_class: np.ndarray
    det_fixes: np.ndarray
    gt_id: np.ndarray
    gt_image: np.ndarray
    gt_class: np.ndarray
    gt_status: np.ndarray
    images: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = field(repr=False)

    def num_gt(self) -> Dict[int, int]:
        """Ground truth count per category id (non-crowd)."""
        return {cat: int((self.gt_class == cat).sum()) for cat in self.category_ids}

    def _points(self, fix: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(classes, scores, true positive) of the detections in the AP, with the errors of type ``fix`` fixed."""
        keep = ~self.det_ignored & (self.det_status != fix)
        classes, scores, hits = self.det_class[keep], self.det_score[keep], self.det_status[keep] == "tp"
        if fix in ("cls", "loc"):
            fixed = (self.det_status == fix) & self.det_fixes
            classes = np.concatenate([classes, self.det_fixed_class[fixed]])
            scores = np.concatenate([scores, self.det_score[fixed]])
            hits = np.concatenate([hits, np.ones(int(fixed.sum()), dtype=bool)])
        if fix == "false_pos":
            scores = hits.astype(np.float64)
        return classes, scores, hits

    def ap(self, fix: Optional[str] = None) -> Dict[int, float]:
        """TIDE's AP (points, 0-100) per category id, with the errors of type ``fix`` (an error or special type)
        fixed, or none."""
        num_gt = self.num_gt()
        if fix in ("miss", "false_neg"):
            lost = self.gt_status == "miss" if fix == "miss" else self.gt_status != "tp"
            for cat in self.gt_class[lost].tolist():
                num_gt[cat] -= 1
        return _class_aps(self._points(fix), num_gt)

    def delta_ap(self) -> Dict[str, Dict]:
        """AP points gained by fixing each error type alone (never below 0, as in tidecv).

        Returns ``{"AP": mean AP, "per_class_ap": {cat: AP}, "overall": {type: dAP},
        "per_class": {cat: {type: dAP}}}`` over :data:`ERROR_TYPES` and :data:`SPECIAL_TYPES`.
        """
        base = self.ap()
        mean = float(np.mean(list(base.values()))) if base else 0.0
        overall, per_class = {}, {cat: {} for cat in base}
        for kind in ERROR_TYPES + SPECIAL_TYPES:
            fixed = self.ap(kind)
            overall[kind] = max((float(np.mean(list(fixed.values()))) if fixed else 0.0) - mean, 0.0)
            for cat in base:
                per_class[cat][kind] = max(fixed.get(cat, 0.0) - base[cat], 0.0)
        return {"AP": mean, "per_class_ap": base, "overall": overall, "per_class": per_class}

    def counts(self) -> Dict[str, int]:
        """Number of errors of each type."""
        found = dict(zip(*np.unique(self.det_status[self.det_status != "tp"], return_counts=True)))
        found["miss"] = int((self.gt_status == "miss").sum())
        return {kind: int(found.get(kind, 0)) for kind in ERROR_TYPES}

    def pr_curves(self) -> Dict[int, np.ndarray]:
        """Interpolated precision ``(101,)`` at :data:`RECALL_POINTS` per category id with ground truth."""
        classes, scores, hits = self._points()
        return {cat: precision_curve(scores[classes == cat], hits[classes == cat], n)
                for cat, n in self.num_gt().items() if n > 0}


def rle_results(coco_gt, results: Sequence[dict]) -> List[dict]:
    """``results`` with every ``segmentation`` as compressed COCO RLE, the form pycocotools scores.

    Polygons (a list of ``[x1, y1, x2, y2, ...]`` lists, pixels, as some tools write them) and uncompressed RLE
    (``counts`` a list) are converted at the height and width of their image in ``coco_gt``; compressed RLE is
    kept. Results without ``segmentation``, and of images the ground truth lacks, are left as they are. The
    input is not modified: converted results are new dicts.
    Raises :class:`~maskrcnn.errors.InputError` naming the first result (position and image id) whose
    segmentation is none of these forms, or an RLE of another size than its image.
    """
    converted = []
    for n, result in enumerate(results):
        segmentation = result.get("segmentation")
        info = coco_gt.imgs.get(result["image_id"])
        if segmentation is None or info is None:
            converted.append(result)
            continue
        height, width = info["height"], info["width"]
        where = f"result {n} (image id {result['image_id']})"
        if isinstance(segmentation, dict) and {"counts", "size"} <= segmentation.keys():
            size = segmentation["size"]
            if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
                raise InputError(f"{where}: its segmentation RLE has size {size}, its image is [{height}, {width}] "
                                 "(height, width)")
            if isinstance(segmentation["counts"], (str, bytes)):
                converted.append(result)
                continue
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif (isinstance(segmentation, list) and segmentation and all(
                isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                and all(isinstance(v, (int, float)) for v in p) for p in segmentation)):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        else:
            raise InputError(f"{where}: 'segmentation' is neither COCO RLE (a dict of 'counts' and 'size') nor a "
                             f"list of polygons (lists of at least 3 x, y pairs), got {str(segmentation)[:60]}")
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
        converted.append(dict(result, segmentation=rle))
    return converted


def analyze_errors(coco_gt, results: Sequence[dict], iou_type: str, *, pos_thresh: float = TIDE_POS_THRESH,
                   bg_thresh: float = TIDE_BG_THRESH, max_dets: int = 100) -> ErrorAnalysis:
    """Match ``results`` to ``coco_gt`` as TIDE does and classify every error (see the module doc).

    coco_gt: a pycocotools ``COCO`` (:func:`maskrcnn.evaluation.coco_evaluator.load_coco`).
    results: COCO result dicts (``image_id``, ``category_id``, ``score``, ``bbox`` x, y, w, h pixels, and for
        "segm" ``segmentation``, RLE or polygons: :func:`rle_results`). Results of images the ground truth
        lacks are not counted.
    iou_type: "bbox" or "segm"; pos_thresh, bg_thresh: TIDE's foreground and background IoU thresholds (other
        values than TIDE's are for curves at a stricter IoU, such as AP75).
    Raises :class:`~maskrcnn.errors.InputError` naming the image id of a result without ``segmentation`` for
    "segm", and as :func:`rle_results` does.
    """
    if iou_type not in ("bbox", "segm"):
        raise InputError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == "segm":
        results = rle_results(coco_gt, results)
    by_image: Dict[int, List[int]] = {}
    for index, result in enumerate(results):
        by_image.setdefault(result["image_id"], []).append(index)
    det_rows: List[tuple] = []  # (index, image, class, score, status, ignored, gt id, fixed class, fixes)
    gt_rows: List[tuple] = []   # (id, image, class, status)
    images = {}
    for image_id in coco_gt.getImgIds():
        anns = coco_gt.imgToAnns.get(image_id, [])
        gts = [a for a in anns if not a.get("iscrowd", 0)]
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        indices = sorted(by_image.get(image_id, []), key=lambda i: -results[i]["score"])[:max_dets]
        if iou_type == "segm":
            missing = [results[i]["image_id"] for i in indices if "segmentation" not in results[i]]
            if missing:
                raise InputError(f"result for image id {missing[0]} has no 'segmentation' for segm analysis")
        key = "bbox" if iou_type == "bbox" else "segmentation"
        dets = [results[i][key] for i in indices]
        det_cls = np.array([results[i]["category_id"] for i in indices], dtype=np.int64)
        gt_cls = np.array([a["category_id"] for a in gts], dtype=np.int64)
        iou = _iou(dets, [_geometry(a, coco_gt, iou_type) for a in gts])  # (D, G)
        same = det_cls[:, None] == gt_cls[None, :]
        cls_iou = iou * same
        matched = np.full(len(indices), -1)
        buffer = cls_iou.copy()
        for d in range(len(indices)):
            g = int(buffer[d].argmax()) if len(gts) else 0
            if len(gts) and buffer[d, g] >= pos_thresh:
                matched[d] = g
                buffer[:, g] = 0
        used = np.zeros(len(gts), dtype=bool)
        used[matched[matched >= 0]] = True
        ignored = np.zeros(len(indices), dtype=bool)
        for crowd in crowds:
            crowd_iou = _iou(dets, [_geometry(crowd, coco_gt, iou_type)], crowd=True)[:, 0]
            ignored |= (matched < 0) & (crowd_iou > pos_thresh) & (det_cls == crowd["category_id"])
        best: Dict[int, Tuple[float, int]] = {}  # gt position -> (score, detection row) of its best cls/loc error
        first_row = len(det_rows)
        for d, index in enumerate(indices):
            score = float(results[index]["score"])
            status, target, fixed_class = "tp", -1, int(det_cls[d])
            if matched[d] >= 0:
                target = int(matched[d])
            elif not len(gts):
                status = "bkg"
            else:
                noncls_iou = iou[d] * ~same[d]
                dupe_iou = cls_iou[d] * used
                if bg_thresh <= cls_iou[d].max() <= pos_thresh:
                    status, target = "loc", int(cls_iou[d].argmax())
                elif noncls_iou.max() >= pos_thresh:
                    status, target = "cls", int(noncls_iou.argmax())
                    fixed_class = int(gt_cls[target])
                elif dupe_iou.max() >= pos_thresh:
                    status, target = "dupe", int(dupe_iou.argmax())
                elif iou[d].max() <= bg_thresh:
                    status = "bkg"
                else:
                    status = "both"
                if status in ("loc", "cls") and not used[target] and best.get(target, (-1.0,))[0] < score:
                    best[target] = (score, len(det_rows))
            gt_id = int(gts[target]["id"]) if target >= 0 else -1
            det_rows.append([index, image_id, int(det_cls[d]), score, status, bool(ignored[d]), gt_id, fixed_class,
                             False])
        for _, row in best.values():
            det_rows[row][8] = True
        for g, ann in enumerate(gts):
            status = "tp" if used[g] else ("fixable" if g in best else "miss")
            gt_rows.append((int(ann["id"]), image_id, int(ann["category_id"]), status))
        images[image_id] = (np.arange(first_row, len(det_rows)), np.arange(len(gt_rows) - len(gts), len(gt_rows)), iou)

    def column(rows, i, dtype):
        return np.array([row[i] for row in rows], dtype=dtype)

    return ErrorAnalysis(
        iou_type=iou_type, pos_thresh=pos_thresh, bg_thresh=bg_thresh, category_ids=sorted(coco_gt.getCatIds()),
        det_index=column(det_rows, 0, np.int64), det_image=column(det_rows, 1, np.int64),
        det_class=column(det_rows, 2, np.int64), det_score=column(det_rows, 3, np.float64),
        det_status=column(det_rows, 4, "<U4"), det_ignored=column(det_rows, 5, bool),
        det_gt=column(det_rows, 6, np.int64), det_fixed_class=column(det_rows, 7, np.int64),
        det_fixes=column(det_rows, 8, bool), gt_id=column(gt_rows, 0, np.int64), gt_image=column(gt_rows, 1, np.int64),
        gt_class=column(gt_rows, 2, np.int64), gt_status=column(gt_rows, 3, "<U7"), images=images)


def confusion_matrix(analysis: ErrorAnalysis, *, score_thresh: Optional[float] = None,
                     iou_thresh: float = TIDE_POS_THRESH, bg_thresh: float = TIDE_BG_THRESH) -> np.ndarray:
    """Class confusion of the detections scoring at least ``score_thresh``, with the detections that found no
    object and the objects no detection found.

    score_thresh: None is :data:`maskrcnn.config.DISPLAY_SCORE_THRESH`, what the report shows.
    Per image, detections (highest score first) are matched to the unmatched ground truth of any class with
    the highest IoU, when it is at least ``iou_thresh``. Returns a ``(K + 3, K + 1)`` int64 array, classes in
    the order of ``analysis.category_ids``: ``[i, j]`` ground truth of class i detected as class j; ``[i, K]``
    ground truth of class i that no detection found; then one row per :data:`UNMATCHED_ROWS` of detections of
    class j that matched nothing: ``[K, j]`` duplicates (IoU >= ``iou_thresh`` with ground truth a higher
    score already took), ``[K + 1, j]`` poorly localised (else IoU > ``bg_thresh`` with some ground truth),
    ``[K + 2, j]`` background (IoU <= ``bg_thresh`` with every ground truth); crowd regions are left out.
    Their column K is 0.
    """
    score_thresh = maskrcnn.config.DISPLAY_SCORE_THRESH if score_thresh is None else score_thresh
    position = {cat: k for k, cat in enumerate(analysis.category_ids)}
    num_classes = len(position)
    dupe, loc, bkg = (num_classes + UNMATCHED_ROWS.index(kind) for kind in ("dupe", "loc", "bkg"))
    matrix = np.zeros((num_classes + len(UNMATCHED_ROWS), num_classes + 1), dtype=np.int64)
    for rows, gt_rows, iou in analysis.images.values():
        found = np.zeros(len(gt_rows), dtype=bool)
        for d, row in enumerate(rows):
            if analysis.det_score[row] < score_thresh:
                continue
            column = position[int(analysis.det_class[row])]
            overlap = iou[d] if len(gt_rows) else np.zeros(1)
            free = np.where(found, -1.0, overlap) if len(gt_rows) else overlap
            if free.max() >= iou_thresh:
                g = int(free.argmax())
                found[g] = True
                matrix[position[int(analysis.gt_class[gt_rows[g]])], column] += 1
            elif not analysis.det_ignored[row]:
                matrix[dupe if overlap.max() >= iou_thresh else loc if overlap.max() > bg_thresh else bkg, column] += 1
        for g in np.flatnonzero(~found):
            matrix[position[int(analysis.gt_class[gt_rows[g]])], num_classes] += 1
    return matrix
