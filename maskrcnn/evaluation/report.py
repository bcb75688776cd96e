"""The error-analysis report: one self-contained HTML page of where a model fails, from COCO results.

    write_report("output/report", load_coco("instances_val.json"), results, "val/", command="...")

Writes ``index.html`` (styles, scripts, charts and the per-image data inline; opens from ``file://`` with no
server and no network) and, per image, ``images/<n>.jpg``, the gallery's thumbnail, and ``images/<n>_full.jpg``,
the same drawing at full size (a small image enlarged to :data:`VIEW_MIN_SIZE`) that a click on the thumbnail
opens in the page. The page holds, for boxes and masks: COCO AP overall, per size and per class
(:func:`evaluate_results`; for masks Boundary AP beside mask AP) and, given a training split, the train -
validation gap; the AP50 points each error type costs, overall and per class (:mod:`maskrcnn.evaluation.errors`),
and apart from them the bounds of perfect scoring and perfect recall; precision-recall curves per class; a
confusion matrix with the detections that found no object and the objects no detection found; a gallery of every
image, ground truth and detections drawn together (true positives, false positives by error type, missed ground
truth), sortable, filterable by class and error type, paged; and the command and package versions that produced
it. The gallery counts errors as the chart does (TIDE's definitions): an object is missed only when no detection,
of any score, accounts for it.
"""

from __future__ import annotations

import datetime
import html
import json
import platform
import warnings
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from tqdm import tqdm

import maskrcnn.config
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import (BOUNDARY_DILATION_RATIO, BOUNDARY_SKIPPED, SUMMARY_KEYS,
                                                 boundary_ap_available, evaluate_results)
from maskrcnn.evaluation.errors import (ERROR_NAMES, ERROR_TYPES, RECALL_POINTS, SPECIAL_TYPES, TIDE_BG_THRESH,
                                        TIDE_POS_THRESH, UNMATCHED_ROWS, ErrorAnalysis, analyze_errors,
                                        confusion_matrix, rle_results)
from maskrcnn.fileio import atomic_write, read_image, read_json

THUMB_SIZE = 320  # longest side of a gallery thumbnail, pixels
VIEW_MIN_SIZE = 800  # the full view shows an image at its own size; a smaller one is enlarged to this longest side
STRICT_IOU = 0.75  # COCO's AP75 IoU: each class's second precision-recall curve
# Gallery colours (RGB) and line styles: one per outcome, named in the page's legend. A dashed outline leaves
# what lies under it visible: a false positive is drawn dashed over the true positive it duplicates.
OUTCOME_COLORS = {"tp": (40, 200, 70), "fp": (235, 50, 50), "miss": (255, 190, 0), "gt": (255, 255, 255),
                  "below": (255, 255, 255)}
OUTCOME_NAMES = {"tp": "true positive", "fp": "false positive, labelled with its error type",
                 "miss": "missed (no detection of any score accounts for it)",
                 "gt": "ground truth that a shown detection found or points at",
                 "below": "ground truth whose detection scores below the threshold"}
DASHED = ("fp", "below")
_DRAW_ORDER = ("gt", "below", "miss", "tp", "fp")  # later on top: a false positive over the true positive
_LABEL_ORDER = ("fp", "miss", "tp")  # labels placed first take the spot above their outline
_FONT = cv2.FONT_HERSHEY_SIMPLEX
UNMATCHED_NAMES = {"dupe": "duplicate", "loc": "poorly localised", "bkg": "background"}
VERSIONED = ("maskrcnn", "torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval", "opencv-python",
             "opencv-python-headless")
AP_LABELS = {"bbox": "box", "segm": "mask", "boundary": "boundary"}  # the AP tables' row and column names


def _versions() -> Dict[str, str]:
    """Python and the installed versions of the packages that shape the numbers."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def read_results(path: Union[str, Path]) -> List[dict]:
    """COCO result dicts from a JSON file (``results.json`` of ``tools/eval.py`` or ``tools/analyze.py``).

    Raises ``FileNotFoundError`` for a missing file and :class:`InputError` naming the file (and the entry) when
    it is not JSON, not a list, or an entry lacks ``image_id``, ``category_id``, ``score`` or ``bbox``.
    """
    results = read_json(path, "results file", list)
    for n, result in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score", "bbox")
                   if not isinstance(result, dict) or k not in result]
        if missing:
            raise InputError(f"results file {path}: entry {n} lacks {', '.join(missing)}")
    return results


def _fmt(value: Optional[float], scale: float = 100) -> str:
    return "-" if value is None else f"{scale * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _bar_chart(values: Dict[str, float], kind: str, width: int = 420) -> str:
    """Inline SVG: one horizontal bar per (label, AP points), the longest bar the largest value.

    kind: the chart's ``data-chart`` name (``errors`` or ``bounds``).
    """
    top = max(max(values.values(), default=0.0), 1e-9)
    row, label_w = 22, 190
    bars = []
    for i, (label, value) in enumerate(values.items()):
        length = (width - label_w - 60) * value / top
        y = i * row
        bars.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
                    f'<rect x="{label_w}" y="{y + 4}" width="{length:.1f}" height="14" class="bar {kind}"/>'
                    f'<text x="{label_w + length + 4:.1f}" y="{y + 15}">{value:.2f}</text>')
    return (f'<svg class="chart" data-chart="{kind}" width="{width}" height="{row * len(values)}">'
            f'{"".join(bars)}</svg>')


def _pr_chart(title: str, curves: Dict[str, np.ndarray], size: int = 240) -> str:
    """Inline SVG of precision (y) against recall (x), both 0-1 with ticks every 0.2, one polyline per curve;
    the legend draws each curve's line (colour and dash) beside its name and AP."""
    left, top = 44, 24
    span = size - left - 12
    bottom = top + span
    lines, legend, ticks = [], [], []
    for i, (label, precision) in enumerate(curves.items()):
        points = " ".join(f"{left + span * r:.1f},{top + span * (1 - p):.1f}"
                          for r, p in zip(RECALL_POINTS, precision))
        lines.append(f'<polyline points="{points}" class="c{i}"/>')
        y = bottom + 46 + 15 * i
        legend.append(f'<line x1="{left}" y1="{y - 4}" x2="{left + 26}" y2="{y - 4}" class="c{i}"/>'
                      f'<text x="{left + 32}" y="{y}" class="t{i}">{html.escape(label)}: AP {100 * precision.mean():.1f}'
                      "</text>")
    for value in np.linspace(0, 1, 6):
        x, y, text = left + span * value, top + span * (1 - value), f"{value:g}"
        ticks.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" class="axes"/>'
                     f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle" class="tick x">{text}</text>'
                     f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" class="axes"/>'
                     f'<text x="{left - 6}" y="{y + 3.5:.1f}" text-anchor="end" class="tick y">{text}</text>')
    axes = (f'<rect x="{left}" y="{top}" width="{span}" height="{span}" class="axes"/>{"".join(ticks)}'
            f'<text x="{left + span / 2}" y="{bottom + 30}" text-anchor="middle">recall</text>'
            f'<text x="10" y="{top + span / 2}" transform="rotate(-90 10 {top + span / 2})" '
            f'text-anchor="middle">precision</text>'
            f'<text x="{left + span / 2}" y="14" text-anchor="middle" class="title">{html.escape(title)}</text>')
    height = bottom + 40 + 15 * len(curves)
    return f'<svg class="pr" width="{size}" height="{height}">{axes}{"".join(lines)}{"".join(legend)}</svg>'


def _confusion_table(matrix: np.ndarray, names: Sequence[str]) -> str:
    """The confusion matrix (:func:`confusion_matrix`'s rows and columns) as an HTML table, cells shaded by
    their share of the row."""
    labels = [html.escape(n) for n in names]
    rows = []
    for i, label in enumerate(labels + [UNMATCHED_NAMES[kind] for kind in UNMATCHED_ROWS]):
        total = max(int(matrix[i].sum()), 1)
        cells = [f'<span class="{"diag" if i == j else "off"}" style="--a:{matrix[i, j] / total:.2f}">'
                 f'{int(matrix[i, j])}</span>' for j in range(len(labels) + 1)]
        if i >= len(labels):
            cells[-1] = "-"
        rows.append([f"<b>{label}</b>"] + cells)
    return _table(["ground truth \\ detected"] + labels + ["not found"], rows, "confusion")


def _outline(mark: dict, scale: float) -> List[np.ndarray]:
    """The outline(s) of a mark in the scaled picture: ``(N, 2)`` float pixel paths, closed, of its mask's
    outer contours, or of its box when it has no mask."""
    if mark["rle"] is None:
        x, y, w, h = (v * scale for v in mark["bbox"])
        return [np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])]
    contours, _ = cv2.findContours(mask_utils.decode(mark["rle"]), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [(c[:, 0, :] + 0.5) * scale - 0.5 for c in contours]  # pixel centres -> scaled pixel centres


def _dashed(picture: np.ndarray, path: np.ndarray, color, thickness: int) -> None:
    """Draw the closed path ``(N, 2)`` (float pixels) on ``picture`` in dashes as long as the gaps between them;
    a path shorter than a pixel (the outline of a one-pixel part) as a dot."""
    dash = 3 * thickness + 3
    closed = np.vstack([path, path[:1]])
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    if along[-1] < 1:
        x, y = np.round(path[0]).astype(int)
        cv2.circle(picture, (int(x), int(y)), thickness, color, -1, cv2.LINE_AA)
        return
    at = np.arange(0.0, along[-1], 1.0)  # a point per pixel of length
    points = np.round(np.stack([np.interp(at, along, closed[:, 0]), np.interp(at, along, closed[:, 1])], 1))
    piece = (at // dash).astype(np.int64)  # even pieces are dashes, odd ones gaps
    starts = np.concatenate([[0], np.flatnonzero(np.diff(piece)) + 1])
    for begin, stop in zip(starts, np.append(starts[1:], len(points))):
        if piece[begin] % 2 == 0 and stop - begin > 1:
            cv2.polylines(picture, [points[begin:stop].astype(np.int32)], False, color, thickness, cv2.LINE_AA)


def _render(image: np.ndarray, marks: List[dict], scale: float) -> np.ndarray:
    """The image scaled by ``scale`` with every mark drawn: its outline in its outcome's colour and line style
    (:data:`OUTCOME_COLORS`, :data:`DASHED`), its label in a dark box above the outline, moved down past the
    labels already placed so that none covers another. Lines and text grow with the picture: capitals 1/45 of
    its longest side high, at least 10 px.

    image: ``(H, W, 3)`` uint8 RGB. marks: ``{"outcome", "bbox" (x, y, w, h pixels of the image), "rle" or None,
    "label"}``. Returns the ``(round(H * scale), round(W * scale), 3)`` uint8 RGB picture.
    """
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    longest = max(size)
    thickness = max(2, round(longest / 320))
    font = max(10, longest / 45) / cv2.getTextSize("Ag", _FONT, 1.0, 1)[0][1]
    weight = max(1, round(font))
    for mark in sorted(marks, key=lambda m: _DRAW_ORDER.index(m["outcome"])):
        color = OUTCOME_COLORS[mark["outcome"]]
        line = thickness if mark["outcome"] in ("tp", "fp", "miss") else max(1, thickness // 2)
        for path in _outline(mark, scale):
            if mark["outcome"] in DASHED:
                _dashed(picture, path, color, line)
            else:
                cv2.polylines(picture, [np.round(path).astype(np.int32)], True, color, line, cv2.LINE_AA)
    placed: List[Tuple[int, int, int, int]] = []
    for mark in sorted((m for m in marks if m["label"]), key=lambda m: _LABEL_ORDER.index(m["outcome"])):
        (w, h), base = cv2.getTextSize(mark["label"], _FONT, font, weight)
        w, h = w + 2 * weight + 2, h + base + 2 * weight
        x = min(max(round(mark["bbox"][0] * scale), 0), max(size[0] - w, 0))
        y = max(round(mark["bbox"][1] * scale) - h - thickness, 0)
        while True:
            below = [b for (px, py, pw, b) in placed if px < x + w and x < pw and py < y + h and y < b]
            if not below or y + h >= size[1]:
                break
            y = min(max(below) + 1, max(size[1] - h, 0))
        placed.append((x, y, x + w, y + h))
        cv2.rectangle(picture, (x, y), (x + w - 1, y + h - 1), (20, 20, 20), -1)
        cv2.putText(picture, mark["label"], (x + weight + 1, y + h - base - weight), _FONT, font,
                    OUTCOME_COLORS[mark["outcome"]], weight, cv2.LINE_AA)
    return picture


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise InputError(f"cannot encode picture {path}")
    atomic_write(path, lambda f: f.write(data.tobytes()))


def gallery_items(coco_gt, results: Sequence[dict], analysis: ErrorAnalysis, *, score_thresh: float
                  ) -> List[Tuple[dict, List[dict]]]:
    """Per image of the ground truth: its gallery record and the marks to draw on its pictures.

    Errors are those of the chart (``analysis``, TIDE's definitions). Detections scoring at least
    ``score_thresh`` are shown: true positives ("tp") and false positives ("fp", labelled with their error
    type; a classification error with the class of its object). Every ground truth is drawn: "miss" when
    TIDE counts it missed (no detection of any score found it or points at it as a classification or
    localisation error), "gt" when a shown detection found it or points at it, "below" when only detections
    scoring below ``score_thresh`` do. The record: ``id``, ``file``, ``tp``, ``fp`` (shown), ``miss``,
    ``below`` (ground truth counts), ``errors`` (error type -> count: shown false positives by type, and
    ``miss``; each error once, as the chart counts it), ``score`` (highest shown score, 0 if none),
    ``classes`` (category ids of its ground truth and shown detections).
    """
    names = {cat["id"]: cat["name"] for cat in coco_gt.dataset["categories"]}
    gt_by_id = {int(ann["id"]): ann for ann in coco_gt.dataset["annotations"]}
    items = []
    for image_id, (rows, gt_rows, _) in analysis.images.items():
        info = coco_gt.imgs[image_id]
        shown = [r for r in rows if analysis.det_score[r] >= score_thresh]
        found = {int(analysis.det_gt[r]) for r in shown if analysis.det_status[r] in ("tp", "cls", "loc")}
        marks, errors = [], {kind: 0 for kind in ERROR_TYPES}
        for g in gt_rows:
            ann = gt_by_id[int(analysis.gt_id[g])]
            missed = analysis.gt_status[g] == "miss"
            outcome = "miss" if missed else "gt" if int(ann["id"]) in found else "below"
            rle = coco_gt.annToRLE(ann) if analysis.iou_type == "segm" else None
            marks.append({"outcome": outcome, "bbox": ann["bbox"], "rle": rle,
                          "label": f"missed {names[ann['category_id']]}" if missed else ""})
            errors["miss"] += missed
        for r in shown:
            result = results[int(analysis.det_index[r])]
            status = str(analysis.det_status[r])
            tp = status == "tp"
            label = f"{names[int(analysis.det_class[r])]} {analysis.det_score[r]:.2f}"
            if not tp:
                errors[status] += 1
                label += f" {status}" + (f" ({names[int(analysis.det_fixed_class[r])]})" if status == "cls" else "")
            marks.append({"outcome": "tp" if tp else "fp", "bbox": result["bbox"],
                          "rle": result.get("segmentation") if analysis.iou_type == "segm" else None, "label": label})
        classes = sorted({int(analysis.gt_class[g]) for g in gt_rows} | {int(analysis.det_class[r]) for r in shown})
        tp = sum(analysis.det_status[r] == "tp" for r in shown)
        record = {"id": image_id, "file": info["file_name"], "tp": int(tp), "fp": len(shown) - int(tp),
                  "miss": errors["miss"], "below": sum(m["outcome"] == "below" for m in marks),
                  "errors": {k: v for k, v in errors.items() if v},
                  "score": float(max((analysis.det_score[r] for r in shown), default=0.0)), "classes": classes}
        items.append((record, marks))
    return items


def write_report(output_dir: Union[str, Path], coco_gt, results: List[dict], image_dir: Union[str, Path], *,
                 command: str, train: Optional[Tuple[object, List[dict]]] = None,
                 score_thresh: Optional[float] = None, thumb_size: int = THUMB_SIZE, progress: bool = True) -> Path:
    """Write the report (``index.html`` and ``images/``) under ``output_dir``; returns the page's path.

    coco_gt: the validation ground truth (pycocotools COCO); results: COCO result dicts on it (``bbox`` and,
        for mask figures, ``segmentation`` on every result: RLE, or polygons, converted at their image's size);
        image_dir: the folder of its image files.
    command: the command line that produced the report, shown on the page.
    train: optional (ground truth, results) of a training split, for the train - validation gap.
    score_thresh: detections shown in the gallery and counted in the confusion matrix score at least this;
        None is :data:`maskrcnn.config.DISPLAY_SCORE_THRESH`.
    When some results have a ``segmentation`` and others none, masks are not analysed: a warning and the page
    say so, naming the first result without one. Raises ``FileNotFoundError`` naming a missing image file
    (checked first) and :class:`~maskrcnn.errors.InputError` naming one that does not decode, or a result
    whose segmentation is neither RLE nor polygons (:func:`~maskrcnn.evaluation.errors.rle_results`).
    """
    score_thresh = maskrcnn.config.DISPLAY_SCORE_THRESH if score_thresh is None else score_thresh
    output_dir, image_dir = Path(output_dir), Path(image_dir)
    missing = [img for img in coco_gt.dataset["images"] if not (image_dir / img["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image files of the ground truth are not in {image_dir}, e.g. "
                                f"{missing[0]['file_name']} (image id {missing[0]['id']})")
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    results = rle_results(coco_gt, results)
    train = (train[0], rle_results(train[0], train[1])) if train else None
    notes = []
    without = [n for n, r in enumerate(results) if "segmentation" not in r]
    iou_types = ("bbox", "segm") if results and not without else ("bbox",)
    if results and without and len(without) < len(results):
        notes.append(f"{len(without)} of {len(results)} results have no 'segmentation' (the first: result "
                     f"{without[0]}, image id {results[without[0]]['image_id']}): masks are not analysed, boxes "
                     "only")
        warnings.warn(notes[-1], stacklevel=2)
    elif results and without:
        notes.append("The results have no masks ('segmentation'): boxes only.")
    scored = iou_types
    if "segm" in iou_types and boundary_ap_available():
        scored = iou_types + ("boundary",)
    elif "segm" in iou_types:
        notes.append(BOUNDARY_SKIPPED)
        warnings.warn(notes[-1], stacklevel=2)
    metrics = evaluate_results(coco_gt, results, scored, verbose=False)
    train_metrics = evaluate_results(train[0], train[1], scored, verbose=False) if train else None
    cat_ids = sorted(coco_gt.getCatIds())
    names = [coco_gt.cats[cat]["name"] for cat in cat_ids]
    analyses = {iou_type: analyze_errors(coco_gt, results, iou_type) for iou_type in iou_types}
    strict = {iou_type: analyze_errors(coco_gt, results, iou_type, pos_thresh=STRICT_IOU) for iou_type in iou_types}
    sections = [_ap_section(metrics, train_metrics, scored), _errors_section(analyses, cat_ids, names),
                _pr_section(analyses, strict, cat_ids, names), _confusion_section(analyses, names, score_thresh)]
    shown = analyses[iou_types[-1]]
    records = []
    items = gallery_items(coco_gt, results, shown, score_thresh=score_thresh)
    for n, (record, marks) in enumerate(tqdm(items, desc="thumbnails", unit="img", disable=not progress)):
        image = read_image(image_dir / record["file"], f"image id {record['id']} of the ground truth")
        longest = max(image.shape[:2])
        record["thumb"], record["view"] = f"images/{n}.jpg", f"images/{n}_full.jpg"
        _save_jpeg(output_dir / record["thumb"], _render(image, marks, thumb_size / longest))
        _save_jpeg(output_dir / record["view"], _render(image, marks, max(1.0, VIEW_MIN_SIZE / longest)))
        records.append(record)
    page = _page(sections, records, names, cat_ids, shown.iou_type, score_thresh, command,
                 len(coco_gt.getImgIds()), len(results), notes)
    path = output_dir / "index.html"
    atomic_write(path, lambda f: f.write(page.encode("utf-8")))
    return path


def _ap_section(metrics: dict, train_metrics: Optional[dict], iou_types: Sequence[str]) -> str:
    rows = [[AP_LABELS[t]] + [_fmt(metrics[t][k]) for k in SUMMARY_KEYS] for t in iou_types]
    header = ["", *SUMMARY_KEYS]
    parts = ["<h2>AP (COCO, IoU 0.50:0.95)</h2>", _table(header, rows)]
    if "boundary" in iou_types:
        parts.append("<p><i>boundary</i>: Boundary AP, mask AP with each match's IoU the smaller of its mask IoU "
                     "and its Boundary IoU, the IoU of the bands within "
                     f"{100 * BOUNDARY_DILATION_RATIO:g}% of the image diagonal inside the two outlines. A mask "
                     "with the right body and a wrong outline keeps its mask AP and loses Boundary AP, most on "
                     "large objects; see docs/evaluation.md.</p>")
    if train_metrics:
        gap = [[AP_LABELS[t]] + [_fmt(train_metrics[t][k]) + " / " + _fmt(metrics[t][k]) for k in SUMMARY_KEYS]
               for t in iou_types]
        parts += ["<h3>Training split / validation split</h3>",
                  "<p>The same weights on images they were trained on and on images they never saw; a large gap "
                  "means the model memorises its training set (more data, augmentation, or fewer iterations).</p>",
                  _table(header, gap)]
    per_class = metrics[iou_types[0]]["per_category"]
    class_header = ["class"] + [f"{AP_LABELS[t]} AP" for t in iou_types]
    if train_metrics:
        class_header += [f"{AP_LABELS[t]} gap (train - val)" for t in iou_types]
    class_rows = []
    for name in per_class:
        row = [html.escape(name)] + [_fmt(metrics[t]["per_category"][name]) for t in iou_types]
        if train_metrics:
            for t in iou_types:
                a, b = train_metrics[t]["per_category"].get(name), metrics[t]["per_category"][name]
                row.append("-" if a is None or b is None else f"{100 * (a - b):+.1f}")
        class_rows.append(row)
    parts += ["<h3>Per class</h3>", _table(class_header, class_rows)]
    return '<section id="ap">' + "".join(parts) + "</section>"


def _errors_section(analyses: Dict[str, ErrorAnalysis], cat_ids: Sequence[int], names: Sequence[str]) -> str:
    parts = ["<h2>Where the AP goes</h2>",
             f"<p>AP50 points gained if every error of one type were fixed (TIDE's definitions: foreground IoU "
             f"{TIDE_POS_THRESH:g}, background {TIDE_BG_THRESH:g}). The largest bar is the first thing to fix; "
             "see docs/analyze.md. Below each chart, on a scale of its own, the two bounds.</p>"]
    for iou_type, analysis in analyses.items():
        delta = analysis.delta_ap()
        counts = analysis.counts()
        errors = {f"{ERROR_NAMES[k]} ({counts[k]})": delta["overall"][k] for k in ERROR_TYPES}
        bounds = {ERROR_NAMES[k]: delta["overall"][k] for k in SPECIAL_TYPES}
        rows = []
        for cat, name in zip(cat_ids, names):
            if cat not in delta["per_class"]:
                continue
            row = delta["per_class"][cat]
            top = max(row[k] for k in ERROR_TYPES) or 1.0
            rows.append([html.escape(name), f"{delta['per_class_ap'][cat]:.1f}"] +
                        [f'<span class="heat" style="--a:{row[k] / top:.2f}">{row[k]:.1f}</span>' for k in ERROR_TYPES])
        title = "masks" if iou_type == "segm" else "boxes"
        parts += [f'<div class="errors" data-iou="{iou_type}"><h3>{title}: AP50 {delta["AP"]:.1f}</h3>',
                  "<h4>Error types (count)</h4>", _bar_chart(errors, "errors"),
                  '<h4>Bounds, not error types: a scale of their own</h4><p class="note">AP50 points if every '
                  "false positive scored below every true positive (perfect scoring), and if every object not "
                  "found were left out (perfect recall). Each holds several error types at once, so it is "
                  "usually larger than any bar above: it says whether precision or recall has more to give, not "
                  "what to fix first.</p>", _bar_chart(bounds, "bounds"),
                  _table(["class", "AP50"] + [ERROR_NAMES[k] for k in ERROR_TYPES], rows), "</div>"]
    return '<section id="errors">' + "".join(parts) + "</section>"


def _pr_section(analyses: Dict[str, ErrorAnalysis], strict: Dict[str, ErrorAnalysis], cat_ids: Sequence[int],
                names: Sequence[str]) -> str:
    curves = {t: (analyses[t].pr_curves(), strict[t].pr_curves()) for t in analyses}
    charts = []
    for cat, name in zip(cat_ids, names):
        lines = {}
        for t, (loose, tight) in curves.items():
            if cat in loose:
                lines[f"{AP_LABELS[t]}, IoU {TIDE_POS_THRESH:.2f}"] = loose[cat]
                lines[f"{AP_LABELS[t]}, IoU {STRICT_IOU:.2f}"] = tight[cat]
        if lines:
            charts.append(_pr_chart(name, lines))
    return ('<section id="pr"><h2>Precision-recall per class</h2><p>Each curve is precision at 101 recall '
            f"points, interpolated as COCO does: solid at IoU {TIDE_POS_THRESH:.2f}, dashed at IoU {STRICT_IOU:.2f}"
            f"{'; blue boxes, red masks' if len(curves) > 1 else ''}. The gap between the two is localisation "
            'quality, a curve ending early is missed objects.</p><div class="grid">' + "".join(charts)
            + "</div></section>")


def _confusion_section(analyses: Dict[str, ErrorAnalysis], names: Sequence[str], score_thresh: float) -> str:
    parts = ['<section id="confusion"><h2>Confusion matrix</h2>',
             f"<p>Detections scoring at least {score_thresh:g}, matched (highest score first) to the ground truth "
             f"of any class at IoU &ge; {TIDE_POS_THRESH:g}. Off the diagonal: one class taken for another; column "
             "<i>not found</i>: objects no detection matched. The rows below the classes hold the detections that "
             f"matched no object: <i>duplicate</i> (IoU &ge; {TIDE_POS_THRESH:g} with an object a higher-scoring "
             f"detection took), <i>poorly localised</i> (IoU between {TIDE_BG_THRESH:g} and {TIDE_POS_THRESH:g} "
             f"with some object, of any class), <i>background</i> (IoU &le; {TIDE_BG_THRESH:g} with every "
             "object). Crowd regions are left out.</p>"]
    for iou_type, analysis in analyses.items():
        parts += [f"<h3>{'masks' if iou_type == 'segm' else 'boxes'}</h3>",
                  _confusion_table(confusion_matrix(analysis, score_thresh=score_thresh), names)]
    return "".join(parts) + "</section>"


def _legend() -> str:
    """The gallery's key: each outcome's line, in its colour and style, and its name."""
    keys = []
    for kind, name in OUTCOME_NAMES.items():
        dash = ' stroke-dasharray="6 5"' if kind in DASHED else ""
        keys.append(f'<span class="key"><svg width="30" height="14"><line x1="3" y1="7" x2="27" y2="7" '
                    f'stroke="rgb{OUTCOME_COLORS[kind]}" stroke-width="3"{dash}/></svg>{html.escape(name)}</span>')
    return '<div class="legend">' + "".join(keys) + "</div>"


def _page(sections: List[str], records: List[dict], names: Sequence[str], cat_ids: Sequence[int], iou_type: str,
          score_thresh: float, command: str, num_images: int, num_results: int, notes: Sequence[str]) -> str:
    data = json.dumps({"images": records, "classes": dict(zip(map(str, cat_ids), names)),
                       "errors": {k: ERROR_NAMES[k] for k in ERROR_TYPES}}).replace("</", "<\\/")
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    footer = (f'<section id="provenance"><h2>How this report was made</h2><pre>{html.escape(command)}</pre>'
              f"<p>{html.escape(versions)}; written {datetime.datetime.now().isoformat(timespec='seconds')}.</p>"
              "</section>")
    gallery = (f'<section id="gallery"><h2>Gallery</h2><p>{"Masks" if iou_type == "segm" else "Boxes"} of '
               f"detections scoring at least {score_thresh:g}, matched as the chart above matches them (IoU "
               f"{TIDE_POS_THRESH:g}), and every object. The counts are the chart's: an object is missed only when no "
               "detection, of any score, found it or points at it as a classification or localisation error. Click "
               f"a picture to see it at full size.</p>{_legend()}"
               '<div class="controls"><label>sort <select id="sort"><option value="errors">most errors</option>'
               '<option value="fewest">fewest errors</option><option value="score">highest score</option>'
               '<option value="lowscore">lowest score</option><option value="id">image id</option></select></label>'
               '<label>class <select id="class"><option value="">all</option></select></label>'
               '<label>error <select id="error"><option value="">any</option></select></label>'
               '<button id="prev">&larr; previous</button><span id="page"></span><button id="next">next &rarr;</button>'
               '</div><div id="cards" class="cards"></div></section>'
               '<div id="viewer" hidden><div class="viewer-box"><div class="viewer-bar"><span id="viewer-meta">'
               f'</span><button id="viewer-close">close (Esc)</button></div>{_legend()}'
               '<img id="viewer-img" alt="" title="click: fit to the window or full size"></div></div>')
    warnings_html = "".join(f'<p class="warning">{html.escape(note)}</p>' for note in notes)
    return (_TEMPLATE.replace("%%SUMMARY%%", f"{num_images} images, {num_results} detections")
            .replace("%%WARNINGS%%", warnings_html)
            .replace("%%SECTIONS%%", "".join(sections) + gallery + footer)
            .replace("%%DATA%%", data))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Error analysis</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{margin:18px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}h4{margin:10px 0 2px}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}
.warning{background:#fdecea;border-left:4px solid #c0392b;padding:6px 10px}.note{font-size:12px;max-width:420px}
.chart text,.pr text{font-size:11px}.bar{fill:#c0392b}.bar.bounds{fill:#7f8c8d}
.pr .title{font-size:12px;font-weight:bold}.axes{fill:none;stroke:#999}
.c0,.c1,.c2,.c3{fill:none;stroke-width:2}
.c0{stroke:#1f77b4}.c1{stroke:#1f77b4;stroke-dasharray:5 3}.c2{stroke:#d62728}.c3{stroke:#d62728;stroke-dasharray:5 3}
.t0,.t1{fill:#1f77b4}.t2,.t3{fill:#d62728}
.grid{display:flex;flex-wrap:wrap;gap:8px}.errors{display:inline-block;vertical-align:top;margin-right:30px}
.heat{display:block;background:rgba(192,57,43,var(--a))}.diag{display:block;background:rgba(39,174,96,var(--a))}
.off{display:block;background:rgba(192,57,43,var(--a))}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:6px 0}.key{display:inline-flex;align-items:center;gap:4px}
.key svg{background:#555;border-radius:2px}
.controls{display:flex;gap:12px;align-items:center;margin:8px 0;flex-wrap:wrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px}
.card{border:1px solid #ccc;border-radius:4px;padding:4px;background:#fafafa}
.card img{width:100%;height:300px;object-fit:contain;background:#eee;display:block;cursor:zoom-in}
.card .meta{font-size:12px}.bad{color:#c0392b}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.8);overflow:auto;z-index:10}#viewer[hidden]{display:none}
.viewer-box{background:#fff;margin:16px auto;padding:8px;width:max-content;max-width:calc(100% - 32px)}
.viewer-bar{display:flex;justify-content:space-between;gap:16px;align-items:start}
#viewer-img{display:block;max-width:100%;cursor:zoom-in}#viewer-img.full{max-width:none;cursor:zoom-out}
</style></head><body>
<h1>Error analysis</h1><p>%%SUMMARY%%</p>%%WARNINGS%%
<nav><a href="#ap">AP</a><a href="#errors">where the AP goes</a><a href="#pr">precision-recall</a>
<a href="#confusion">confusion</a><a href="#gallery">gallery</a><a href="#provenance">command</a></nav>
%%SECTIONS%%
<script id="data" type="application/json">%%DATA%%</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const PAGE = 24;
  const state = {sort: "errors", cls: "", error: "", page: 0};
  const $ = (id) => document.getElementById(id);
  for (const [id, name] of Object.entries(data.classes)) $("class").add(new Option(name, id));
  for (const [id, name] of Object.entries(data.errors)) $("error").add(new Option(name, id));
  const total = (im) => im.fp + im.miss;
  const orders = {
    errors: (a, b) => total(b) - total(a) || a.id - b.id,
    fewest: (a, b) => total(a) - total(b) || a.id - b.id,
    score: (a, b) => b.score - a.score || a.id - b.id,
    lowscore: (a, b) => a.score - b.score || a.id - b.id,
    id: (a, b) => (a.id > b.id) - (a.id < b.id),
  };
  function selected() {
    return data.images.filter((im) => (!state.cls || im.classes.includes(Number(state.cls)))
      && (!state.error || (im.errors[state.error] || 0) > 0)).sort(orders[state.sort]);
  }
  function describe(im, into) {
    const errs = Object.entries(im.errors).map(([k, n]) => k + " " + n).join(", ");
    into.innerHTML = "<b></b><br>" + im.tp + " TP, <span class=bad>" + im.fp + " FP, " + im.miss + " missed</span>"
      + (im.below ? ", " + im.below + " found below the threshold" : "") + (errs ? "<br>" + errs : "");
    into.querySelector("b").textContent = im.file + " (id " + im.id + ")";
  }
  function show(im) {
    $("viewer-img").src = im.view;
    $("viewer-img").classList.remove("full");
    describe(im, $("viewer-meta"));
    $("viewer").hidden = false;
  }
  function hide() { $("viewer").hidden = true; $("viewer-img").removeAttribute("src"); }
  function card(im) {
    const div = document.createElement("div");
    div.className = "card";
    div.innerHTML = '<img loading="lazy" alt="">' + '<div class="meta"></div>';
    const img = div.querySelector("img");
    img.src = im.thumb;
    img.title = "click: full size";
    img.onclick = () => show(im);
    describe(im, div.querySelector(".meta"));
    div.dataset.id = im.id;
    return div;
  }
  function render() {
    const list = selected();
    const pages = Math.max(1, Math.ceil(list.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const cards = $("cards");
    cards.replaceChildren(...list.slice(state.page * PAGE, (state.page + 1) * PAGE).map(card));
    $("page").textContent = "page " + (state.page + 1) + " of " + pages + " (" + list.length + " images)";
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
  }
  $("sort").onchange = (e) => { state.sort = e.target.value; state.page = 0; render(); };
  $("class").onchange = (e) => { state.cls = e.target.value; state.page = 0; render(); };
  $("error").onchange = (e) => { state.error = e.target.value; state.page = 0; render(); };
  $("prev").onclick = () => { state.page -= 1; render(); };
  $("next").onclick = () => { state.page += 1; render(); };
  $("viewer-close").onclick = hide;
  $("viewer").onclick = (e) => { if (e.target === $("viewer")) hide(); };
  $("viewer-img").onclick = () => $("viewer-img").classList.toggle("full");
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("viewer").hidden) hide(); });
  render();
})();
</script></body></html>
"""
