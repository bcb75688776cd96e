"""The learner's view of mask refinement: where a 28 x 28 mask loses an object's edge, and which points the point
head (``model.roi_heads.mask_refine``) recomputes to recover it, for one detection of a trained refined model.

Shorthand: H x W the image at its file size; S = 28 the mask head's side; M = S * 2**steps the refined side;
P points a subdivision step recomputes.

Nothing here re-implements the model: the detections are ``model.infer``'s, the 28 x 28 logits the mask head's
(``mask_head.class_logits`` on ``mask_pooler.pool``), the steps and their points ``point_head.subdivide``'s (what
``point_head.refine`` returns is its last step), the points are placed in the image by ``image_points``, and both
masks are ``paste_masks_in_image``'s, their probabilities ``resized_mask_regions``'.

    refinement.png   one object: the image and its ground truth; the 28 x 28 mask pasted; the refined mask
                     pasted with the points of each step; where the two masks differ from the ground truth
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.coco import CocoDetection
from maskrcnn.diagnostics.trace import bitmaps, load_example, to_uint8
from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write
from maskrcnn.modeling.maskrcnn import MaskRCNN
from maskrcnn.modeling.paste import paste_masks_in_image, resized_mask_regions
from maskrcnn.modeling.point_head import image_points
from maskrcnn.modeling.postprocess import rescale_boxes
from maskrcnn.precision import autocast
from maskrcnn.predictor import Predictor

FIGURE = "refinement.png"
_STEP_COLOURS = ("#ff3fd2", "#ffe019", "#39d9ff", "#ff7f0e")  # the points of steps 1, 2, ...


def refinement_view(model: MaskRCNN, image: Tensor, target: dict, *, score_thresh: float = DISPLAY_SCORE_THRESH
                    ) -> dict:
    """The numbers of :data:`FIGURE` for the largest detection of ``image`` scoring at least ``score_thresh``.

    model: a model with a point head (left in the mode it came in); image: (3, H, W) float 0-1 RGB at its file
    size, on the model's device; target: its dataset target (file pixels).
    Returns ``image`` (H, W, 3) uint8, ``image_id``, ``detection`` (its index among the model's detections, highest
    score first), ``box`` (4,) xyxy file pixels, ``label``, ``score``; ``coarse`` and ``refined``: each ``side``
    (S, M), ``probs`` (H, W) float32 (the pasted probabilities, 0 outside the box's paste extent), ``mask`` (H, W)
    bool (the paste), ``iou`` and ``wrong`` (pixels differing from the ground truth); ``gt_mask`` (H, W) bool, the
    ground-truth instance of the highest mask IoU with the refined mask; ``steps``, per subdivision step: ``side``
    (its grid) and ``points`` (P, 2) float ``(x, y)`` file pixels of the cells it recomputed (none when the box is
    no longer than the grid before it, in input pixels); ``mask_threshold``.
    """
    heads = model.roi_heads
    if heads.point_head is None:
        raise InputError("the model has no point head (model.roi_heads.mask_refine is off): nothing is refined")
    device = image.device
    height, width = (int(s) for s in image.shape[-2:])
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), autocast(model.precision, device):
            batch = model.preprocess([image], resize=True)
            sizes = torch.tensor(batch.image_sizes, dtype=torch.int64, device=device)
            boxes, scores, labels, _, _ = model.infer(batch.tensor, sizes)
            kept = torch.nonzero(scores >= score_thresh)[:, 0]
            if not len(kept):
                raise InputError(f"image {target.get('image_id')}: no detection scores at least {score_thresh:g}")
            areas = (boxes[kept, 2] - boxes[kept, 0]) * (boxes[kept, 3] - boxes[kept, 1])
            detection = int(kept[areas.argmax()])
            rois = torch.cat([boxes.new_zeros(1, 1), boxes[detection: detection + 1]], dim=1)  # (1, 5), image 0
            label = labels[detection: detection + 1]
            features = model.extract_features(batch)
            coarse = heads.mask_head.class_logits(heads.mask_pooler.pool(features, rois), label)  # (1, S, S)
            steps = list(heads.point_head.subdivide(features, rois, coarse, label))
    finally:
        model.train(was_training)
    box = rescale_boxes(boxes[detection: detection + 1].float(), batch.image_sizes[0], (height, width))  # (1, 4)
    gt_masks = bitmaps(target["masks"])
    views = {}
    for name, logits in (("coarse", coarse.float()), ("refined", steps[-1][0] if steps else coarse.float())):
        probs = logits.sigmoid().cpu()
        mask = paste_masks_in_image(probs, box.cpu(), (height, width), threshold=model.mask_threshold)[0]
        canvas = np.zeros((height, width), dtype=np.float32)
        for x0, y0, region in resized_mask_regions(probs, box.cpu(), (height, width)):
            canvas[y0: y0 + region.shape[0], x0: x0 + region.shape[1]] = region.numpy()
        views[name] = {"side": int(probs.shape[-1]), "probs": canvas, "mask": mask.numpy()}
    refined = views["refined"]["mask"]
    ious = [_iou(refined, gt) for gt in gt_masks.numpy()]
    gt_mask = gt_masks[int(np.argmax(ious))].numpy() if ious else np.zeros((height, width), dtype=bool)
    for view in views.values():
        view["iou"], view["wrong"] = _iou(view["mask"], gt_mask), int((view["mask"] != gt_mask).sum())
    step_views = []
    for logits, refined_rows, points in steps:
        placed = image_points(box.cpu(), points.cpu())[0] if len(refined_rows) else torch.zeros(0, 2)
        step_views.append({"side": int(logits.shape[-1]), "points": placed.numpy()})
    return {"image": to_uint8(image), "image_id": target.get("image_id"), "detection": detection,
            "box": box[0].cpu(), "label": int(label), "score": float(scores[detection]), **views, "gt_mask": gt_mask,
            "steps": step_views, "mask_threshold": float(model.mask_threshold)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def refinement_caption(view: dict, class_names) -> str:
    """One line: the object, and each mask's IoU and wrong pixels against the ground truth."""
    coarse, refined = view["coarse"], view["refined"]
    points = " + ".join(str(len(step["points"])) for step in view["steps"])
    return (f"image {view['image_id']}, {class_names[view['label'] - 1]} {view['score']:.2f}: "
            f"{coarse['side']}x{coarse['side']} mask IoU {coarse['iou']:.3f} ({coarse['wrong']} px wrong), "
            f"refined {refined['side']}x{refined['side']} IoU {refined['iou']:.3f} ({refined['wrong']} px wrong), "
            f"{points} points recomputed")


def draw_refinement(view: dict, class_names) -> Figure:
    """:data:`FIGURE`: four panels cropped to the object's box and a margin."""
    height, width = view["gt_mask"].shape
    x0, y0, x1, y1 = view["box"].tolist()
    margin = 0.08 * max(x1 - x0, y1 - y0)
    left, top = max(int(x0 - margin), 0), max(int(y0 - margin), 0)
    right, bottom = min(int(np.ceil(x1 + margin)), width), min(int(np.ceil(y1 + margin)), height)
    crop = (slice(top, bottom), slice(left, right))
    gt = view["gt_mask"][crop]
    fig = Figure(figsize=(16, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    name = class_names[view["label"] - 1]
    axes[0].imshow(view["image"][crop])
    axes[0].contour(gt, levels=[0.5], colors="white", linewidths=1.0)
    axes[0].set_title(f"{name} {view['score']:.2f}, ground truth in white\n({right - left}x{bottom - top} px of the "
                      f"{width}x{height} image)", fontsize=9)
    for ax, key, colour, title in ((axes[1], "coarse", "tab:orange", "mask head"),
                                   (axes[2], "refined", "tab:cyan", "point-refined")):
        part = view[key]
        ax.imshow(part["probs"][crop], cmap="gray", vmin=0, vmax=1)
        ax.contour(gt, levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed")
        ax.contour(part["mask"][crop], levels=[0.5], colors=colour, linewidths=1.2)
        cell = (x1 - x0) / part["side"]
        ax.set_title(f"{title} {part['side']}x{part['side']} (a cell {cell:.1f} px), pasted, p > "
                     f"{view['mask_threshold']:g}\nIoU {part['iou']:.3f}, {part['wrong']} pixels differ from the "
                     f"ground truth", fontsize=9)
    for step, colour in zip(view["steps"], _STEP_COLOURS):
        points = step["points"]
        axes[2].scatter(points[:, 0] - left - 0.5, points[:, 1] - top - 0.5, s=2, color=colour, linewidths=0,
                        label=f"{len(points)} cells of the {step['side']}x{step['side']} grid")
    if any(len(step["points"]) for step in view["steps"]):
        axes[2].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, markerscale=4,
                       title="cells recomputed", title_fontsize=8)
    coarse_wrong, refined_wrong = view["coarse"]["mask"] != view["gt_mask"], view["refined"]["mask"] != view["gt_mask"]
    errors = np.zeros((*gt.shape, 3))
    errors[(coarse_wrong & ~refined_wrong)[crop]] = (0.85, 0.15, 0.1)
    errors[(refined_wrong & ~coarse_wrong)[crop]] = (0.15, 0.35, 0.95)
    errors[(coarse_wrong & refined_wrong)[crop]] = (0.6, 0.6, 0.6)
    axes[3].imshow(errors)
    axes[3].contour(gt, levels=[0.5], colors="white", linewidths=0.6)
    axes[3].set_title("pixels the refined mask set right (red), set wrong (blue),\nwrong in both (grey)", fontsize=9)
    axes[3].legend(handles=[Patch(color=(0.85, 0.15, 0.1), label=f"{int((coarse_wrong & ~refined_wrong).sum())} fixed"),
                            Patch(color=(0.15, 0.35, 0.95), label=f"{int((refined_wrong & ~coarse_wrong).sum())} "
                                                                   f"broken"),
                            Patch(color=(0.6, 0.6, 0.6), label=f"{int((coarse_wrong & refined_wrong).sum())} both")],
                   fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3)
    fig.suptitle("Where a 28x28 mask loses the edge, and the points that recover it: " + refinement_caption(
        view, class_names), fontsize=9)
    return fig


def explain_refinement(checkpoint: Union[str, Path], *, ann_file: Union[str, Path], image_dir: Union[str, Path],
                       output_dir: Union[str, Path], image_id: Optional[int] = None, device: str = "cpu",
                       score_thresh: float = DISPLAY_SCORE_THRESH) -> dict:
    """Load a checkpoint of a refined model and an annotated image (``image_id``; default the first with two or more
    instances), and write :data:`FIGURE` to ``output_dir``. Returns the :func:`refinement_view`, with
    ``class_names`` and ``file`` (the path written)."""
    predictor = Predictor.from_checkpoint(checkpoint, device=device, score_thresh=None)
    image, target = load_example(CocoDetection(ann_file, image_dir), image_id)
    view = refinement_view(predictor.model, image.to(predictor.device), target, score_thresh=score_thresh)
    fig = draw_refinement(view, predictor.class_names)
    path = Path(output_dir) / FIGURE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return {**view, "class_names": list(predictor.class_names), "file": path}
