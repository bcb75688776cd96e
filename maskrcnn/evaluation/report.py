"""The error-analysis report: one self-contained HTML page of where a model fails, from COCO results.

    write_report("output/report", load_coco("instances_val.json"), results, "val/", command="...")

Writes ``index.html`` (styles, scripts, charts and the per-image data inline; opens from ``file://`` with no
server and no network) and ``images/<n>.jpg``, one thumbnail per image, loaded lazily by the gallery. The page
holds, for boxes and masks: COCO AP overall, per size and per class (:func:`evaluate_results`) and, given a
training split, the train - validation gap; the AP50 points each error type costs, overall and per class
(:mod:`maskrcnn.evaluation.errors`); precision-recall curves per class; a confusion matrix with background;
a gallery of every image, ground truth and detections drawn together (true positives, false positives by
error type, missed ground truth), sortable, filterable by class and error type, paged; and the command and
package versions that produced it.
"""

from __future__ import annotations

import datetime
import html
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from tqdm import tqdm

from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import SUMMARY_KEYS, evaluate_results
from maskrcnn.evaluation.errors import (ERROR_NAMES, ERROR_TYPES, SPECIAL_TYPES, RECALL_POINTS, ErrorAnalysis,
                                        analyze_errors, confusion_matrix)
from maskrcnn.fileio import atomic_write, read_image

THUMB_SIZE = 320  # longest side of a gallery thumbnail, pixels
# Gallery colours (RGB): one per outcome, named in the page's legend.
OUTCOME_COLORS = {"tp": (40, 200, 70), "fp": (235, 50, 50), "miss": (255, 190, 0), "gt": (255, 255, 255)}
OUTCOME_NAMES = {"tp": "true positive", "fp": "false positive (error type)", "miss": "missed ground truth",
                 "gt": "matched ground truth"}
_DRAW_ORDER = ("gt", "fp", "tp", "miss")  # later on top: a true positive over its duplicates
VERSIONED = ("maskrcnn", "torch", "torchvision", "numpy", "pycocotools", "opencv-python", "opencv-python-headless")


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

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file (and the entry) when it
    is not JSON, not a list, or an entry lacks ``image_id``, ``category_id``, ``score`` or ``bbox``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"results file {path} is not JSON: {error}") from error
    if not isinstance(results, list):
        raise InputError(f"results file {path} holds a {type(results).__name__}, expected a list of COCO results")
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


def _bar_chart(values: Dict[str, float], width: int = 420) -> str:
    """Inline SVG: one horizontal bar per (label, AP points)."""
    top = max(max(values.values(), default=0.0), 1e-9)
    row, label_w = 22, 190
    bars = []
    for i, (label, value) in enumerate(values.items()):
        length = (width - label_w - 60) * value / top
        y = i * row
        bars.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
                    f'<rect x="{label_w}" y="{y + 4}" width="{length:.1f}" height="14" class="bar"/>'
                    f'<text x="{label_w + length + 4:.1f}" y="{y + 15}">{value:.2f}</text>')
    return f'<svg class="chart" width="{width}" height="{row * len(values)}">{"".join(bars)}</svg>'


def _pr_chart(title: str, curves: Dict[str, np.ndarray], size: int = 220) -> str:
    """Inline SVG of precision (y) against recall (x), one polyline per curve, with its AP in the legend."""
    pad = 28
    span = size - 2 * pad
    lines, legend = [], []
    for i, (label, precision) in enumerate(curves.items()):
        points = " ".join(f"{pad + span * r:.1f},{pad + span * (1 - p):.1f}" for r, p in zip(RECALL_POINTS, precision))
        lines.append(f'<polyline points="{points}" class="c{i}"/>')
        legend.append(f'<text x="{pad}" y="{size + 4 + 13 * i}" class="t{i}">'
                      f'{html.escape(label)} AP {100 * precision.mean():.1f}</text>')
    axes = (f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" class="axes"/>'
            f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle">recall</text>'
            f'<text x="10" y="{size / 2}" transform="rotate(-90 10 {size / 2})" text-anchor="middle">precision</text>'
            f'<text x="{size / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>')
    height = size + 8 + 13 * len(curves)
    return f'<svg class="pr" width="{size}" height="{height}">{axes}{"".join(lines)}{"".join(legend)}</svg>'


def _confusion_table(matrix: np.ndarray, names: Sequence[str]) -> str:
    """The confusion matrix as an HTML table, cells shaded by their share of the row."""
    labels = [html.escape(n) for n in names] + ["background"]
    rows = []
    for i, label in enumerate(labels):
        total = max(int(matrix[i].sum()), 1)
        cells = [f'<span class="{"diag" if i == j else "off"}" style="--a:{matrix[i, j] / total:.2f}">'
                 f'{int(matrix[i, j])}</span>' for j in range(len(labels))]
        rows.append([f"<b>{label}</b>"] + cells)
    rows[-1][-1] = "-"
    return _table(["ground truth \\ detected"] + labels, rows, "confusion")


def _draw_thumbnail(image: np.ndarray, marks: List[dict], size: int) -> np.ndarray:
    """The image scaled so its longest side is ``size`` px, each mark drawn: outline of its mask (or its box),
    colour by outcome, a short label. marks: ``{"outcome", "bbox" (x, y, w, h px), "rle" or None, "label"}``."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    thumb = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    for mark in sorted(marks, key=lambda m: _DRAW_ORDER.index(m["outcome"])):
        color = OUTCOME_COLORS[mark["outcome"]]
        thickness = 1 if mark["outcome"] == "gt" else 2
        if mark["rle"] is not None:
            mask = mask_utils.decode(mark["rle"])
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(thumb, [np.round(c * scale).astype(np.int32) for c in contours], -1, color, thickness)
        else:
            x, y, w, h = (v * scale for v in mark["bbox"])
            cv2.rectangle(thumb, (round(x), round(y)), (round(x + w), round(y + h)), color, thickness)
        if mark["label"]:
            x, y = mark["bbox"][0] * scale, mark["bbox"][1] * scale
            org = (int(x) + 2, max(int(y) - 3, 10))
            cv2.putText(thumb, mark["label"], org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(thumb, mark["label"], org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    return thumb


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise InputError(f"cannot encode thumbnail {path}")
    atomic_write(path, lambda f: f.write(data.tobytes()))


def gallery_items(coco_gt, results: Sequence[dict], analysis: ErrorAnalysis, *, score_thresh: float
                  ) -> List[Tuple[dict, List[dict]]]:
    """Per image of the ground truth: its gallery record and the marks to draw on its thumbnail.

    Detections scoring below ``score_thresh`` are not shown; a ground truth is missed when no shown true
    positive matches it. The record: ``id``, ``file``, ``tp``, ``fp``, ``miss`` (counts shown), ``errors``
    (error type -> count: false positives by type, and ``miss``), ``score`` (highest shown score, 0 if
    none), ``classes`` (category ids of its ground truth and shown detections).
    """
    names = {cat["id"]: cat["name"] for cat in coco_gt.dataset["categories"]}
    gt_by_id = {int(ann["id"]): ann for ann in coco_gt.dataset["annotations"]}
    items = []
    for image_id, (rows, gt_rows, _) in analysis.images.items():
        info = coco_gt.imgs[image_id]
        shown = [r for r in rows if analysis.det_score[r] >= score_thresh]
        found = {int(analysis.det_gt[r]) for r in shown if analysis.det_status[r] == "tp"}
        marks, errors = [], {kind: 0 for kind in ERROR_TYPES}
        for g in gt_rows:
            ann = gt_by_id[int(analysis.gt_id[g])]
            hit = int(ann["id"]) in found
            rle = coco_gt.annToRLE(ann) if analysis.iou_type == "segm" else None
            marks.append({"outcome": "gt" if hit else "miss", "bbox": ann["bbox"], "rle": rle,
                          "label": "" if hit else names[ann["category_id"]]})
            errors["miss"] += not hit
        for r in shown:
            result = results[int(analysis.det_index[r])]
            status = str(analysis.det_status[r])
            tp = status == "tp"
            if not tp:
                errors[status] += 1
            label = f"{names[int(analysis.det_class[r])]} {analysis.det_score[r]:.2f}" + ("" if tp else f" {status}")
            marks.append({"outcome": "tp" if tp else "fp", "bbox": result["bbox"],
                          "rle": result.get("segmentation") if analysis.iou_type == "segm" else None, "label": label})
        classes = sorted({int(analysis.gt_class[g]) for g in gt_rows} | {int(analysis.det_class[r]) for r in shown})
        tp = sum(analysis.det_status[r] == "tp" for r in shown)
        record = {"id": image_id, "file": info["file_name"], "tp": int(tp), "fp": len(shown) - int(tp),
                  "miss": errors["miss"], "errors": {k: v for k, v in errors.items() if v},
                  "score": float(max((analysis.det_score[r] for r in shown), default=0.0)), "classes": classes}
        items.append((record, marks))
    return items


def write_report(output_dir: Union[str, Path], coco_gt, results: List[dict], image_dir: Union[str, Path], *,
                 command: str, train: Optional[Tuple[object, List[dict]]] = None, score_thresh: float = 0.5,
                 thumb_size: int = THUMB_SIZE, progress: bool = True) -> Path:
    """Write the report (``index.html`` and ``images/``) under ``output_dir``; returns the page's path.

    coco_gt: the validation ground truth (pycocotools COCO); results: COCO result dicts on it (``bbox`` and,
        for mask figures, ``segmentation`` RLE on every result); image_dir: the folder of its image files.
    command: the command line that produced the report, shown on the page.
    train: optional (ground truth, results) of a training split, for the train - validation gap.
    score_thresh: detections shown in the gallery and counted in the confusion matrix score at least this.
    Raises ``FileNotFoundError`` naming a missing image file (checked first) and ``ValueError`` naming one
    that does not decode.
    """
    output_dir, image_dir = Path(output_dir), Path(image_dir)
    missing = [img for img in coco_gt.dataset["images"] if not (image_dir / img["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image files of the ground truth are not in {image_dir}, e.g. "
                                f"{missing[0]['file_name']} (image id {missing[0]['id']})")
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    iou_types = ("bbox", "segm") if results and all("segmentation" in r for r in results) else ("bbox",)
    metrics = evaluate_results(coco_gt, results, iou_types, verbose=False)
    train_metrics = evaluate_results(train[0], train[1], iou_types, verbose=False) if train else None
    cat_ids = sorted(coco_gt.getCatIds())
    names = [coco_gt.cats[cat]["name"] for cat in cat_ids]
    analyses = {iou_type: analyze_errors(coco_gt, results, iou_type) for iou_type in iou_types}
    strict = {iou_type: analyze_errors(coco_gt, results, iou_type, pos_thresh=0.75) for iou_type in iou_types}
    sections = [_ap_section(metrics, train_metrics, iou_types), _errors_section(analyses, cat_ids, names),
                _pr_section(analyses, strict, cat_ids, names), _confusion_section(analyses, names, score_thresh)]
    shown = analyses[iou_types[-1]]
    records = []
    items = gallery_items(coco_gt, results, shown, score_thresh=score_thresh)
    for n, (record, marks) in enumerate(tqdm(items, desc="thumbnails", unit="img", disable=not progress)):
        image = read_image(image_dir / record["file"], f"image id {record['id']} of the ground truth")
        record["thumb"] = f"images/{n}.jpg"
        _save_jpeg(output_dir / record["thumb"], _draw_thumbnail(image, marks, thumb_size))
        records.append(record)
    page = _page(sections, records, names, cat_ids, shown.iou_type, score_thresh, command,
                 len(coco_gt.getImgIds()), len(results))
    path = output_dir / "index.html"
    atomic_write(path, lambda f: f.write(page.encode("utf-8")))
    return path


def _ap_section(metrics: dict, train_metrics: Optional[dict], iou_types: Sequence[str]) -> str:
    label = {"bbox": "box", "segm": "mask"}
    rows = [[label[t]] + [_fmt(metrics[t][k]) for k in SUMMARY_KEYS] for t in iou_types]
    header = ["", *SUMMARY_KEYS]
    parts = ["<h2>AP (COCO, IoU 0.50:0.95)</h2>", _table(header, rows)]
    if train_metrics:
        gap = [[label[t]] + [_fmt(train_metrics[t][k]) + " / " + _fmt(metrics[t][k]) for k in SUMMARY_KEYS]
               for t in iou_types]
        parts += ["<h3>Training split / validation split</h3>",
                  "<p>The same weights on images they were trained on and on images they never saw; a large gap "
                  "means the model memorises its training set (more data, augmentation, or fewer iterations).</p>",
                  _table(header, gap)]
    per_class = metrics[iou_types[0]]["per_category"]
    class_header = ["class"] + [f"{label[t]} AP" for t in iou_types]
    if train_metrics:
        class_header += [f"{label[t]} gap (train - val)" for t in iou_types]
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
             "<p>AP50 points gained if every error of one type were fixed (TIDE's definitions: foreground IoU "
             "0.5, background 0.1). The largest bar is the first thing to fix; see docs/analyze.md.</p>"]
    for iou_type, analysis in analyses.items():
        delta = analysis.delta_ap()
        counts = analysis.counts()
        chart = {f"{ERROR_NAMES[k]} ({counts[k]})": delta["overall"][k] for k in ERROR_TYPES}
        chart.update({ERROR_NAMES[k]: delta["overall"][k] for k in SPECIAL_TYPES})
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
                  _bar_chart(chart),
                  _table(["class", "AP50"] + [ERROR_NAMES[k] for k in ERROR_TYPES], rows), "</div>"]
    return '<section id="errors">' + "".join(parts) + "</section>"


def _pr_section(analyses: Dict[str, ErrorAnalysis], strict: Dict[str, ErrorAnalysis], cat_ids: Sequence[int],
                names: Sequence[str]) -> str:
    label = {"bbox": "box", "segm": "mask"}
    curves = {t: (analyses[t].pr_curves(), strict[t].pr_curves()) for t in analyses}
    charts = []
    for cat, name in zip(cat_ids, names):
        lines = {}
        for t, (loose, tight) in curves.items():
            if cat in loose:
                lines[f"{label[t]} IoU.50"] = loose[cat]
                lines[f"{label[t]} IoU.75"] = tight[cat]
        if lines:
            charts.append(_pr_chart(name, lines))
    return ('<section id="pr"><h2>Precision-recall per class</h2><p>Each curve is precision at 101 recall '
            'points, interpolated as COCO does; the gap between the IoU 0.50 and 0.75 curves is localisation '
            'quality, a curve ending early is missed objects.</p><div class="grid">' + "".join(charts)
            + "</div></section>")


def _confusion_section(analyses: Dict[str, ErrorAnalysis], names: Sequence[str], score_thresh: float) -> str:
    parts = ['<section id="confusion"><h2>Confusion matrix</h2>',
             f"<p>Detections scoring at least {score_thresh:g}, matched to the ground truth of any class at IoU "
             "&ge; 0.5. Off the diagonal: one class taken for another; background row: detections of nothing; "
             "background column: objects no detection found.</p>"]
    for iou_type, analysis in analyses.items():
        parts += [f"<h3>{'masks' if iou_type == 'segm' else 'boxes'}</h3>",
                  _confusion_table(confusion_matrix(analysis, score_thresh=score_thresh), names)]
    return "".join(parts) + "</section>"


def _page(sections: List[str], records: List[dict], names: Sequence[str], cat_ids: Sequence[int], iou_type: str,
          score_thresh: float, command: str, num_images: int, num_results: int) -> str:
    data = json.dumps({"images": records, "classes": dict(zip(map(str, cat_ids), names)),
                       "errors": {k: ERROR_NAMES[k] for k in ERROR_TYPES}}).replace("</", "<\\/")
    legend = "".join(f'<span class="swatch" style="background:rgb{OUTCOME_COLORS[k]}"></span>{OUTCOME_NAMES[k]} '
                     for k in OUTCOME_COLORS)
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    footer = (f'<section id="provenance"><h2>How this report was made</h2><pre>{html.escape(command)}</pre>'
              f"<p>{html.escape(versions)}; written {datetime.datetime.now().isoformat(timespec='seconds')}.</p>"
              "</section>")
    gallery = (f'<section id="gallery"><h2>Gallery</h2><p>{"Masks" if iou_type == "segm" else "Boxes"} of '
               f"detections scoring at least {score_thresh:g}, matched at IoU 0.5. {legend}</p>"
               '<div class="controls"><label>sort <select id="sort"><option value="errors">most errors</option>'
               '<option value="fewest">fewest errors</option><option value="score">highest score</option>'
               '<option value="lowscore">lowest score</option><option value="id">image id</option></select></label>'
               '<label>class <select id="class"><option value="">all</option></select></label>'
               '<label>error <select id="error"><option value="">any</option></select></label>'
               '<button id="prev">&larr; previous</button><span id="page"></span><button id="next">next &rarr;</button>'
               '</div><div id="cards" class="cards"></div></section>')
    return (_TEMPLATE.replace("%%SUMMARY%%", f"{num_images} images, {num_results} detections")
            .replace("%%SECTIONS%%", "".join(sections) + gallery + footer)
            .replace("%%DATA%%", data))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Error analysis</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{margin:18px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}
.chart text,.pr text{font-size:11px}.bar{fill:#c0392b}.pr .title{font-size:12px;font-weight:bold}
.axes{fill:none;stroke:#999}polyline{fill:none;stroke-width:1.6}
.c0{stroke:#1f77b4}.c1{stroke:#1f77b4;stroke-dasharray:4 3}.c2{stroke:#d62728}.c3{stroke:#d62728;stroke-dasharray:4 3}
.t0,.t1{fill:#1f77b4}.t2,.t3{fill:#d62728}
.grid{display:flex;flex-wrap:wrap;gap:8px}.errors{display:inline-block;vertical-align:top;margin-right:30px}
.heat{display:block;background:rgba(192,57,43,var(--a))}.diag{display:block;background:rgba(39,174,96,var(--a))}
.off{display:block;background:rgba(192,57,43,var(--a))}
.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;border:1px solid #555;vertical-align:middle}
.controls{display:flex;gap:12px;align-items:center;margin:8px 0;flex-wrap:wrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px}
.card{border:1px solid #ccc;border-radius:4px;padding:4px;background:#fafafa}
.card img{width:100%;height:220px;object-fit:contain;background:#eee;display:block}.card .meta{font-size:12px}
.card .bad{color:#c0392b}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}
</style></head><body>
<h1>Error analysis</h1><p>%%SUMMARY%%</p>
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
  function card(im) {
    const div = document.createElement("div");
    div.className = "card";
    const errs = Object.entries(im.errors).map(([k, n]) => k + " " + n).join(", ");
    div.innerHTML = '<img loading="lazy" alt="">' + '<div class="meta"></div>';
    div.querySelector("img").src = im.thumb;
    div.querySelector(".meta").innerHTML = "<b></b><br>" + im.tp + " TP, <span class=bad>" + im.fp
      + " FP, " + im.miss + " missed</span>" + (errs ? "<br>" + errs : "");
    div.querySelector("b").textContent = im.file + " (id " + im.id + ")";
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
  render();
})();
</script></body></html>
"""
