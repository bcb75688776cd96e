"""Figures and the page of the learner's view: what :func:`maskrcnn.diagnostics.trace.explain` recorded,
drawn with matplotlib (one PNG per step, names in :data:`FIGURES`) and tied together in ``explain.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.coco import CocoDetection
from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write
from maskrcnn.modeling.paste import resized_mask_regions
from maskrcnn.predictor import Predictor
from maskrcnn.diagnostics.trace import (explain, load_example, read_eval_metrics, read_training_log)
from maskrcnn.visualize import add_legend, colors, draw_instances, label_map

FIGURES = ("input_gt.png", "fpn_levels.png", "rpn_anchors.png", "rpn_proposals.png", "mask_targets.png",
           "mask_gradients.png", "paste.png", "final.png", "generalisation.png")
PAGE = "explain.md"

_POSITIVE, _IGNORED, _NEGATIVE = (0.2, 0.8, 0.3), (0.95, 0.75, 0.1), (0.15, 0.2, 0.35)


# ---------------------------------------------------------------------------------------------------------
# Figures and the page
# ---------------------------------------------------------------------------------------------------------

def write_explanation(result: dict, output_dir: Union[str, Path]) -> List[Path]:
    """Write the figures named in :data:`FIGURES` and ``explain.md`` for an :func:`explain` result to
    ``output_dir`` (created if missing); returns the paths written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    drawers = {"input_gt.png": _draw_input, "fpn_levels.png": _draw_fpn, "rpn_anchors.png": _draw_anchors,
               "rpn_proposals.png": _draw_proposals, "mask_targets.png": _draw_mask_targets,
               "mask_gradients.png": _draw_gradients, "paste.png": _draw_paste, "final.png": _draw_final,
               "generalisation.png": _draw_generalisation}
    paths = []
    for name in FIGURES:
        fig = drawers[name](result)
        path = output_dir / name
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        paths.append(path)
    page = output_dir / PAGE
    text = explanation_page(result).encode("utf-8")
    atomic_write(page, lambda f: f.write(text))
    return paths + [page]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _show(ax, image, title: str, **kwargs) -> None:
    ax.imshow(image, **kwargs)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(ax, box, color, *, linewidth: float = 1.2, linestyle: str = "-", scale: float = 1.0) -> None:
    """Outline an xyxy box given in pixels (divided by ``scale`` for a feature map); pixel i of an image
    drawn by imshow spans [i - 0.5, i + 0.5]."""
    x0, y0, x1, y1 = (float(v) / scale for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                           linewidth=linewidth, linestyle=linestyle))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def _class_map(masks, labels, class_names: Sequence[str], scores=None, image_size=None) -> np.ndarray:
    """Per-class label map with a legend of the classes present."""
    present = sorted(set(torch.as_tensor(labels).tolist()))
    image = label_map(masks, labels, len(class_names), scores=scores, image_size=image_size)
    return add_legend(image, present, [class_names[c - 1] for c in present])


def _draw_input(result: dict) -> Figure:
    inp, names = result["input"], result["class_names"]
    labels = inp["labels"].tolist()
    ids = list(range(1, len(labels) + 1))
    by_instance = add_legend(label_map(inp["masks"], ids, len(ids)), ids,
                             [f"#{i} {names[c - 1]}" for i, c in zip(ids, labels)])
    height, width = inp["size"]
    fig = _figure(12, 4.2)
    axes = fig.subplots(1, 3)
    _show(axes[0], inp["image"], f"training input {width}x{height} px (file {result['original_size'][1]}x"
                                 f"{result['original_size'][0]})")
    for box in inp["boxes"]:
        _box(axes[0], box, "white")
    _show(axes[1], _class_map(inp["masks"], inp["labels"], names), "ground-truth masks, colour = class")
    _show(axes[2], by_instance, f"{len(ids)} instances, colour = instance")
    return fig


def _draw_fpn(result: dict) -> Figure:
    levels = result["fpn"]
    cols = len(levels[0]["indices"])  # every level has the same channels
    fig = _figure(2.3 * cols, 2.0 * len(levels))
    axes = fig.subplots(len(levels), cols, squeeze=False)
    for row, level in enumerate(levels):
        height, width = level["shape"]
        for col, (channel, feature_map) in enumerate(zip(level["indices"], level["maps"])):
            head = f"{level['name']}: stride {level['stride']}, {width}x{height}\n" if col == 0 else "\n"
            _show(axes[row][col], feature_map, f"{head}channel {channel}", cmap="viridis")
    fig.suptitle("Feature pyramid: the most varied channels of each level (one cell = stride x stride input pixels)",
                 fontsize=9)
    return fig


def _status_image(status: np.ndarray) -> np.ndarray:
    """``(Hi, Wi)`` location status 1 / -1 / 0 -> ``(Hi, Wi, 3)`` float RGB."""
    out = np.empty((*status.shape, 3))
    out[status == 1], out[status == -1], out[status == 0] = _POSITIVE, _IGNORED, _NEGATIVE
    return out


def _draw_anchors(result: dict) -> Figure:
    anchors, inp = result["anchors"], result["input"]
    location = anchors["location"]
    chosen = anchors["levels"][location["level"]]
    height, width = inp["size"]
    fig = _figure(12, 7.5)
    grid = fig.add_gridspec(2, 2 * len(anchors["levels"]), height_ratios=[2.2, 1])
    ax = fig.add_subplot(grid[0, : len(anchors["levels"])])
    _show(ax, inp["image"], f"the {len(location['anchors'])} anchors at one {chosen['name']} location "
                            f"(stride {chosen['stride']}, size {chosen['anchor_size']} px)\n"
                            f"dashed: instance #{location['instance'] + 1}")
    palette = colors(range(len(location["anchors"]))) / 255
    kinds = {1: "positive", 0: "negative", -1: "ignored"}
    for color, box, label, iou, instance, ratio in zip(palette, location["anchors"], location["labels"].tolist(),
                                                       location["ious"].tolist(), location["instances"].tolist(),
                                                       location["aspect_ratios"]):
        _box(ax, box, color, linewidth=1.6)
        ax.plot([], [], color=color, label=f"h/w {ratio:g}: IoU {iou:.2f} with #{instance + 1}, {kinds[label]}")
    _box(ax, inp["boxes"][location["instance"]], "white", linestyle="--")
    boxes = location["anchors"]
    ax.set_xlim(min(-0.5, float(boxes[:, 0].min()) - 1), max(width - 0.5, float(boxes[:, 2].max()) + 1))
    ax.set_ylim(max(height - 0.5, float(boxes[:, 3].max()) + 1), min(-0.5, float(boxes[:, 1].min()) - 1))
    ax.legend(fontsize=7, loc="lower right")
    ax = fig.add_subplot(grid[0, len(anchors["levels"]):])
    _show(ax, inp["image"], f"positive anchors (green): {anchors['positive']} positive, {anchors['negative']} "
                            f"negative, {anchors['ignored']} ignored of {anchors['total']}")
    for box in anchors["positive_anchors"]:
        _box(ax, box, _POSITIVE, linewidth=0.8)
    for box in inp["boxes"]:
        _box(ax, box, "white", linestyle="--")
    for i, level in enumerate(anchors["levels"]):
        ax = fig.add_subplot(grid[1, 2 * i: 2 * i + 2])
        _show(ax, _status_image(level["status"]),
              f"{level['name']} {level['shape'][1]}x{level['shape'][0]}, size {level['anchor_size']}\n"
              f"+{level['positive']}  ?{level['ignored']}  -{level['negative']}")
        if i == location["level"]:
            x, y = location["cell"]
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.suptitle("RPN training labels from rpn.label_anchors; per location: green = a positive anchor, "
                 "yellow = ignored (IoU between the thresholds), dark = all negative", fontsize=9)
    return fig


def _draw_proposals(result: dict) -> Figure:
    proposals, inp = result["proposals"], result["input"]
    fig = _figure(10, 4.8)
    axes = fig.subplots(1, 2)
    panels = [(proposals["before_nms"], f"top {len(proposals['before_nms'])} of {proposals['pre_nms']} candidates "
                                        f"before NMS\n(decoded anchors, highest objectness first)"),
              (proposals["after_nms"], f"top {len(proposals['after_nms'])} of {proposals['post_nms']} proposals after "
                                       f"NMS (IoU {proposals['nms_thresh']:g})")]
    for ax, (boxes, title) in zip(axes, panels):
        _show(ax, inp["image"], title)
        for rank, box in enumerate(boxes):
            _box(ax, box, (1.0, 0.3, 0.2, 1.0 - 0.8 * rank / max(len(boxes), 1)), linewidth=1.0)
    fig.suptitle(f"{proposals['anchors']} anchors -> per-level top-k -> NMS; more opaque = higher objectness",
                 fontsize=9)
    return fig


def mask_caption(result: dict) -> str:
    """One line: what the mask loss of this image covers, against a dense per-pixel, per-class loss."""
    counts = result["counts"]
    height, width = result["input"]["size"]
    side = counts["mask_side"]
    return (f"loss_mask {result['mask_loss']:.4f} = mean per-cell BCE over {counts['positive_rois']} positive RoIs x "
            f"{side}x{side} = {counts['mask_cells']} cells, one class channel each; not H x W x K = {height}x{width}x"
            f"{len(result['class_names'])} = {counts['dense_cells']}")


def _draw_mask_targets(result: dict) -> Figure:
    rois, shown, inp, names = result["mask_rois"], result["shown_rois"], result["input"], result["class_names"]
    side = result["counts"]["mask_side"]
    fig = _figure(12, 2.4 * len(shown) + 0.6)
    axes = fig.subplots(len(shown), 5, squeeze=False)
    palette = colors(range(len(shown))) / 255
    for row, (index, color) in enumerate(zip(shown, palette)):
        roi = rois[index]
        name = names[roi["label"] - 1]
        mask = inp["masks"][roi["instance"]].numpy()
        ax = axes[row]
        _show(ax[0], inp["image"], f"RoI {index}: {name} #{roi['instance'] + 1}, IoU {roi['iou']:.2f}, "
                                   f"from P{roi['level']}")
        ax[0].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        _box(ax[0], roi["box"], color, linewidth=1.6)
        x0, y0, x1, y1 = roi["box"].tolist()
        left, top = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        right, bottom = min(int(np.ceil(x1)), mask.shape[1]), min(int(np.ceil(y1)), mask.shape[0])
        _show(ax[1], mask[top:bottom, left:right], f"mask in the RoI ({right - left}x{bottom - top} px)",
              cmap="gray", vmin=0, vmax=1)
        _box(ax[1], (x0 - left, y0 - top, x1 - left, y1 - top), color, linewidth=1.2)
        _show(ax[2], roi["target"].numpy(), f"{side}x{side} target (mask_targets)", cmap="gray", vmin=0, vmax=1)
        _show(ax[3], roi["probs"].numpy(), f"predicted p({name})", cmap="viridis", vmin=0, vmax=1)
        _show(ax[4], roi["bce"].numpy(), f"per-cell BCE, mean {roi['loss']:.4f}", cmap="magma", vmin=0)
    fig.suptitle(mask_caption(result), fontsize=9)
    return fig


def _draw_gradients(result: dict) -> Figure:
    gradients, rois, inp = result["gradients"], result["mask_rois"], result["input"]
    fig = _figure(3.0 * (len(gradients) + 1), 3.6)
    axes = fig.subplots(1, len(gradients) + 1)
    palette = colors(range(len(gradients))) / 255
    _show(axes[0], inp["image"], f"{len(rois)} positive RoIs, colour = pyramid level")
    for color, level in zip(palette, gradients):
        for i in level["rois"]:
            _box(axes[0], rois[i]["box"], color, linewidth=0.8)
        axes[0].plot([], [], color=color, label=level["name"])
    axes[0].legend(fontsize=7, loc="lower right")
    for ax, color, level in zip(axes[1:], palette, gradients):
        _show(ax, level["magnitude"], f"|d loss_mask / d {level['name']}| (stride {level['stride']})\n"
                                      f"{len(level['rois'])} RoIs read here, max {level['magnitude'].max():.2e}",
              cmap="inferno")
        for i in level["rois"]:
            _box(ax, rois[i]["box"], color, linewidth=0.8, scale=level["stride"])
    fig.suptitle("The mask loss reaches the pyramid only through RoIAlign: its gradient lands on the feature cells "
                 "each positive RoI sampled, on the level it was assigned to", fontsize=9)
    return fig


def _draw_paste(result: dict) -> Figure:
    inference, names = result["inference"], result["class_names"]
    instances, probs, image = inference["instances"], inference["mask_probs"], inference["image"]
    rows = min(3, len(instances))
    if rows == 0:
        fig = _figure(8, 2)
        _note(fig.subplots(), "no detection on this image")
        return fig
    height, width = image.shape[:2]
    side = probs.shape[-1]
    fig = _figure(12, 3.0 * rows + 0.5)
    axes = fig.subplots(rows, 4, squeeze=False)
    # The paste's own resize: the mask padded by one pixel, over the box scaled by (S + 2) / S (paste.py).
    regions = resized_mask_regions(probs[:rows], instances.boxes[:rows], (height, width))
    for row, (x0, y0, resized) in enumerate(regions):
        box = instances.boxes[row]
        canvas = np.zeros((height, width), dtype=np.float32)
        canvas[y0:y0 + resized.shape[0], x0:x0 + resized.shape[1]] = resized.numpy()
        label = f"{names[int(instances.labels[row]) - 1]} {float(instances.scores[row]):.2f}"
        ax = axes[row]
        _show(ax[0], probs[row].numpy(), f"{label}: {side}x{side} p(class)", cmap="viridis", vmin=0, vmax=1)
        _show(ax[1], resized.numpy(), f"padded to {side + 2}x{side + 2}, resized to the box + 1 px\n"
                                      f"({resized.shape[1]}x{resized.shape[0]} px inside the image)",
              cmap="viridis", vmin=0, vmax=1)
        _show(ax[2], canvas, f"placed in the {width}x{height} image", cmap="viridis", vmin=0, vmax=1)
        _box(ax[2], box, "white", linewidth=0.8)
        mask = instances.masks[row].numpy()
        _show(ax[3], image, f"pasted, p > {result['mask_threshold']:g}: {int(mask.sum())} pixels")
        ax[3].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
    fig.suptitle("From the mask head's 28x28 output to a full-resolution mask (the highest-scoring detections)",
                 fontsize=9)
    return fig


def _final_view(inference: dict, score_thresh: float) -> np.ndarray:
    return draw_instances(inference["image"], inference["instances"], score_thresh=score_thresh, class_colors=True)


def _draw_final(result: dict) -> Figure:
    inference, names, thresh = result["inference"], result["class_names"], result["score_thresh"]
    kept = inference["instances"].filter(thresh)
    fig = _figure(11, 4.8)
    axes = fig.subplots(1, 2)
    _show(axes[0], _final_view(inference, thresh), f"{len(kept)} detections scoring >= {thresh:g}")
    _show(axes[1], _class_map(kept.masks, kept.labels, names, scores=kept.scores, image_size=kept.image_size),
          "per-class label map")
    return fig


def _draw_generalisation(result: dict) -> Figure:
    thresh = result["score_thresh"]
    fig = _figure(11, 9)
    axes = fig.subplots(2, 2)
    heldout = result["heldout"]
    views = [(result["inference"], f"{result['image_label']} (id {result['image_id']})"),
             (heldout, f"held-out image (id {heldout['image_id']})" if heldout is not None else "")]
    for ax, (view, title) in zip(axes[0], views):
        if view is None:
            _note(ax, "no held-out image given")
            continue
        best = view["best_iou"]
        _show(ax, _final_view(view, thresh), f"{title}, white = ground truth\nmean best mask IoU per instance "
                                             f"{best.mean():.2f} ({len(best)} instances)")
        for mask in view["gt_masks"].numpy():
            ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    ax = axes[1][0]
    curve = result["curve"]
    if curve:
        iterations = [r["iteration"] for r in curve]
        for name in ("total_loss", "loss_mask"):
            ax.plot(iterations, [r.get(name, float("nan")) for r in curve], label=name)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("training loss (seen images)", fontsize=9)
    else:
        _note(ax, "no training log given")
    ax = axes[1][1]
    validation = result["validation"]
    if validation is not None:
        keys = [("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"), ("bbox", "AP"), ("bbox", "AP50")]
        values = [validation[kind][key] or 0.0 for kind, key in keys]
        bars = ax.bar([f"{'mask' if kind == 'segm' else 'box'} {key}" for kind, key in keys], values,
                      color=["tab:blue"] * 3 + ["tab:gray"] * 2)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("validation AP (held-out images; AP = mean over IoU 0.50:0.95)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    else:
        _note(ax, "no validation metrics given")
    return fig


def explanation_page(result: dict) -> str:
    """``explain.md``: the figures in pipeline order, each with the numbers of this run."""
    names = result["class_names"]
    inp, counts, anchors, proposals = result["input"], result["counts"], result["anchors"], result["proposals"]
    height, width = inp["size"]
    side = counts["mask_side"]
    labels = inp["labels"].tolist()
    lines = [f"# Mask R-CNN on image {result['image_id']}: from instance masks to a training signal and back",
             "",
             "Every number below comes from one run of the model on this image: a training-mode forward pass "
             "(recorded with forward hooks, weights unchanged) and an inference pass.",
             "",
             "## 1. The data", "", "![input and ground truth](input_gt.png)", "",
             f"The {result['image_label']} is {result['original_size'][1]}x{result['original_size'][0]} pixels; "
             f"training sees it resized to {width}x{height}. It holds {len(labels)} instances "
             f"({', '.join(f'#{i + 1} {names[c - 1]}' for i, c in enumerate(labels))}), each with a box, a class "
             "and its own mask.",
             "",
             "## 2. Backbone and feature pyramid", "", "![pyramid levels](fpn_levels.png)", "",
             "| level | stride (px per cell) | size (W x H cells) |", "|---|---|---|"]
    lines += [f"| {lv['name']} | {lv['stride']} | {lv['shape'][1]} x {lv['shape'][0]} |" for lv in result["fpn"]]
    location = anchors["location"]
    chosen = anchors["levels"][location["level"]]
    lines += ["", "## 3. Region proposals", "", "![anchors and their labels](rpn_anchors.png)", "",
              f"{anchors['total']} anchors ({len(location['anchors'])} aspect ratios per location, one size per "
              f"level). `rpn.label_anchors` marks {anchors['positive']} positive, {anchors['negative']} negative and "
              f"{anchors['ignored']} ignored; the RPN loss samples up to {anchors['sampled']} of the labelled ones, at "
              f"most {100 * anchors['positive_fraction']:g}% positive. The best anchor for "
              f"instance #{location['instance'] + 1} sits on {chosen['name']} (anchor size {chosen['anchor_size']} "
              f"px); the anchors at its location: "
              + ", ".join(f"h/w {r:g} IoU {iou:.2f} with #{j + 1}" for r, iou, j in
                          zip(location["aspect_ratios"], location["ious"].tolist(), location["instances"].tolist()))
              + ".", "",
              "![proposals before and after NMS](rpn_proposals.png)", "",
              f"Per-level top-k keeps {proposals['pre_nms']} decoded anchors; NMS at IoU {proposals['nms_thresh']:g} "
              f"leaves {proposals['post_nms']} proposals.", "",
              "## 4. Mask targets and the mask loss", "", "![mask targets](mask_targets.png)", "",
              "| RoI | class | instance | IoU | level | mask loss |", "|---|---|---|---|---|---|"]
    for i in result["shown_rois"]:
        roi = result["mask_rois"][i]
        lines.append(f"| {i} | {names[roi['label'] - 1]} | #{roi['instance'] + 1} | {roi['iou']:.2f} | P{roi['level']} "
                     f"| {roi['loss']:.4f} |")
    dense = counts["dense_cells"]
    share = f" ({100 * counts['mask_cells'] / dense:.1f}% of that)" if dense else ""
    lines += ["", f"The mask loss is per pixel, but only on the {side}x{side} grid of each positive RoI and only on "
              f"the channel of the RoI's ground-truth class: {counts['positive_rois']} RoIs x {side * side} cells = "
              f"{counts['mask_cells']} binary cross-entropy terms, against H x W x K = {height} x {width} x "
              f"{len(names)} = {dense} for a dense per-class mask{share}. Their mean is loss_mask = "
              f"{result['mask_loss']:.4f} (the model reported {result['losses']['loss_mask']:.4f}).", "",
              "![mask loss gradients](mask_gradients.png)", "",
              "Backpropagation: the gradient of the mask loss reaches the pyramid only through RoIAlign's bilinear "
              "sampling weights, so it lands on the cells under the positive RoIs, on the level each was assigned to "
              "(" + ", ".join(f"{g['name']}: {len(g['rois'])} RoIs" for g in result["gradients"]) + ").", "",
              "Training losses of this image:", "", "| loss | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in result["losses"].items()]
    inference = result["inference"]
    kept = inference["instances"].filter(result["score_thresh"])
    lines += ["", "## 5. From 28x28 to the image", "", "![paste](paste.png)", "", "![final result](final.png)", "",
              f"Inference gives {len(inference['instances'])} detections; {len(kept)} score at least "
              f"{result['score_thresh']:g}. Each {side}x{side} probability map is padded by one zero cell, resized "
              f"to its box grown by the same margin, placed in the {result['original_size'][1]}x"
              f"{result['original_size'][0]} image and thresholded (p > {result['mask_threshold']:g}).", "",
              "## 6. Seen and unseen images", "", "![generalisation](generalisation.png)", ""]
    views = [(result["image_label"], inference)]
    if result["heldout"] is not None:
        views.append(("held-out image", result["heldout"]))
    lines += [f"- {label} (id {view['image_id']}): mean best mask IoU per instance {view['best_iou'].mean():.3f} "
              f"over {len(view['best_iou'])} instances" for label, view in views]
    if result["curve"]:
        first, last = result["curve"][0], result["curve"][-1]
        lines.append(f"- training loss: {first['total_loss']:.4f} at iteration {first['iteration']}, "
                     f"{last['total_loss']:.4f} at iteration {last['iteration']}")
    validation = result["validation"]
    if validation is not None:
        segm, bbox = validation["segm"], validation["bbox"]
        lines.append(f"- validation: mask AP {_percent(segm['AP'])}, AP50 {_percent(segm['AP50'])}, "
                     f"AP75 {_percent(segm['AP75'])}; box AP {_percent(bbox['AP'])}")
    return "\n".join(lines) + "\n"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def explain_checkpoint(checkpoint: Union[str, Path], *, ann_file: Union[str, Path], image_dir: Union[str, Path],
                       output_dir: Union[str, Path], image_id: Optional[int] = None,
                       heldout_ann: Optional[Union[str, Path]] = None,
                       heldout_images: Optional[Union[str, Path]] = None, heldout_image_id: Optional[int] = None,
                       log: Optional[Union[str, Path]] = None, metrics: Optional[Union[str, Path]] = None,
                       device: str = "cpu", score_thresh: float = DISPLAY_SCORE_THRESH, num_rois: int = 4,
                       seed: int = 0, image_label: str = "explained image") -> dict:
    """Load a training checkpoint and an annotated image, :func:`explain` it, write the figures and page.

    ann_file, image_dir, image_id: the explained image (default: the first with two or more instances).
    heldout_ann, heldout_images, heldout_image_id: a held-out image (needs both paths; optional).
    log: training ``metrics.jsonl``; metrics: validation ``metrics.json`` (evaluator or training summary).
    device, score_thresh, num_rois, seed, image_label: as for :func:`explain`.
    Returns the :func:`explain` result, with ``files`` the paths written.
    """
    predictor = Predictor.from_checkpoint(checkpoint, device=device, score_thresh=None)
    dataset = CocoDetection(ann_file, image_dir)
    image, target = load_example(dataset, image_id)
    heldout = None
    if (heldout_ann is None) != (heldout_images is None):
        raise InputError("a held-out image needs both an annotation file and an image folder")
    if heldout_ann is not None:
        heldout = load_example(CocoDetection(heldout_ann, heldout_images), heldout_image_id)
    sizes = predictor.config.model.input
    result = explain(predictor.model, image, target, class_names=predictor.class_names,
                     train_size=(sizes.min_size[-1], sizes.max_size), heldout=heldout,
                     log_records=read_training_log(log) if log is not None else (),
                     eval_metrics=read_eval_metrics(metrics) if metrics is not None else None,
                     score_thresh=score_thresh, num_rois=num_rois, seed=seed, image_label=image_label)
    result["files"] = write_explanation(result, output_dir)
    return result
