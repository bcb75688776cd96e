"""Pictures of detections: overlays on the image, colour-coded label maps with a legend, PNG files.

Images are ``(H, W, 3)`` uint8 RGB NumPy arrays. Colours come from one rule (:func:`colors`): index i gets
the hue ``i * golden ratio`` (mod 1), so neighbouring indices differ strongly and any number of classes or
instances gets distinct, stable colours. Label maps and ``class_colors=True`` overlays colour by label.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import torch

from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.check import ground_truth
from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write, read_image
from maskrcnn.structures import Instances

_GOLDEN = 0.618033988749895
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4


def colors(indices: Sequence[int]) -> np.ndarray:
    """``(n, 3)`` uint8 RGB colours, one per index (any non-negative int)."""
    rgb = [colorsys.hsv_to_rgb((int(i) * _GOLDEN) % 1.0, 0.65, 0.95) for i in indices]
    return np.round(np.array(rgb, dtype=np.float64).reshape(-1, 3) * 255).astype(np.uint8)


def _mask_array(masks: Union[torch.Tensor, np.ndarray, list, None], image_size) -> Optional[np.ndarray]:
    """Bitmap tensor/array, list of COCO RLE dicts, or None -> ``(N, H, W)`` bool array (or None)."""
    if masks is None:
        return None
    if isinstance(masks, list):
        if not masks:
            return np.zeros((0, *image_size), dtype=bool)
        return mask_utils.decode(masks).transpose(2, 0, 1).astype(bool)  # (H, W, N) -> (N, H, W)
    if isinstance(masks, torch.Tensor):
        masks = masks.cpu().numpy()
    return np.asarray(masks, dtype=bool)


def _check_image(image: np.ndarray, image_size) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an (H, W, 3) uint8 RGB image, got "
                         f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}")
    if tuple(image.shape[:2]) != tuple(image_size):
        raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but the detections are for a "
                         f"{image_size[1]}x{image_size[0]} image")


def draw_instances(image: np.ndarray, result: Instances, *, score_thresh: Optional[float] = DISPLAY_SCORE_THRESH,
                   class_colors: bool = False, alpha: float = 0.5) -> np.ndarray:
    """Overlay detections on an image: translucent mask fills with outlines, boxes, "name score" labels.

    image: ``(H, W, 3)`` uint8 RGB of the size the detections refer to (``result.image_size``).
    result: detections (masks as bitmaps, RLE or absent).
    score_thresh: detections scoring below this are not drawn; None draws every detection of ``result``.
    class_colors: colour by class label (stable across images) instead of by detection.
    alpha: opacity of the mask fill.
    Returns a new ``(H, W, 3)`` uint8 RGB array; the input is not modified.
    """
    _check_image(image, result.image_size)
    result = result if score_thresh is None else result.filter(score_thresh)
    out = image.copy()
    palette = colors(result.labels.tolist() if class_colors else range(len(result)))
    masks = _mask_array(result.masks, result.image_size)
    if masks is not None:
        for i in reversed(range(len(result))):  # highest score painted last, on top
            fill = masks[i]
            out[fill] = np.round((1 - alpha) * out[fill] + alpha * palette[i]).astype(np.uint8)
        for i in range(len(result)):
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, palette[i].tolist(), 1)
    texts = [f"{name} {score:.2f}" for name, score in zip(result.class_names, result.scores.tolist())]
    sizes = []
    for text in texts:
        (tw, th), baseline = cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)
        sizes.append((tw + 2, th + baseline + 2))
    boxes = [[int(round(v)) for v in box] for box in result.boxes.tolist()]
    corners = place_labels(boxes, sizes, image.shape[:2])
    for i, ((x0, y0, x1, y1), text, (w, h), (lx, ly)) in enumerate(zip(boxes, texts, sizes, corners)):
        color = palette[i].tolist()
        cv2.rectangle(out, (x0, y0), (x1, y1), color, 1)
        cv2.rectangle(out, (lx, ly), (lx + w - 1, ly + h - 1), color, -1)
        baseline = cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[1]
        cv2.putText(out, text, (lx + 1, ly + h - baseline - 1), _FONT, _FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def draw_ground_truth(image: np.ndarray, *, boxes, labels: Sequence[int], class_names: Sequence[str],
                      masks: list) -> np.ndarray:
    """Overlay annotations (not detections) on an image, coloured by class, labelled with the class name.

    image: ``(H, W, 3)`` uint8 RGB. boxes: ``(M, 4)`` xyxy pixels. labels: M class labels (any non-negative
    ints, used for the colours). class_names: M names. masks: M COCO RLE dicts of the image's size.
    Returns a new ``(H, W, 3)`` uint8 RGB array.
    """
    count = len(labels)
    result = Instances(boxes=torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4),
                       scores=torch.ones(count), labels=torch.as_tensor(list(labels), dtype=torch.int64),
                       class_names=list(class_names), masks=list(masks), image_size=image.shape[:2])
    return draw_instances(image, result, score_thresh=None, class_colors=True)


def write_ground_truth_overlays(ann_file: Union[str, Path], image_dir: Union[str, Path], out_dir: Union[str, Path],
                                *, count: int, skip_image_ids=()) -> List[Path]:
    """Write :func:`draw_ground_truth` overlays of the first ``count`` images of a COCO json (those in
    ``skip_image_ids`` left out) as ``out_dir/<stem>_<image id>.png``; returns the files written."""
    data = json.loads(Path(ann_file).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = []
    for image in [im for im in data["images"] if im.get("id") not in set(skip_image_ids)][:count]:
        boxes, category_ids, rles = ground_truth(data, image["id"])
        overlay = draw_ground_truth(read_image(Path(image_dir) / image["file_name"]), boxes=boxes,
                                    labels=category_ids, class_names=[names[c] for c in category_ids], masks=rles)
        files.append(Path(out_dir) / f"{Path(image['file_name']).stem}_{image['id']}.png")
        save_png(files[-1], overlay)
    return files


def place_labels(boxes: Sequence[Sequence[int]], sizes: Sequence[Tuple[int, int]],
                 image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """Top-left corners for the labels of boxes, so that labels do not cover each other.

    boxes: N ``(x0, y0, x1, y1)`` integer pixels, in drawing priority (highest score first);
    sizes: N label ``(width, height)`` in pixels; image_size: ``(H, W)``.
    Each label takes the first free spot of: above the box's top-left corner, inside it at the top, below
    the box, inside it at the bottom, then the same four at the box's right edge; "free" means inside the
    image and clear of the labels already placed. With no free spot, the spot overlapping them least.
    Returns N ``(x, y)`` corners.
    """
    height, width = image_size
    placed: List[Tuple[int, int, int, int]] = []
    corners = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes):
        spots = [(x, y) for x in (x0, x1 - w) for y in (y0 - h, y0 + 1, y1 + 1, y1 - h)]
        spots = [(min(max(x, 0), max(width - w, 0)), min(max(y, 0), max(height - h, 0))) for x, y in spots]

        def overlap(spot):
            x, y = spot
            return sum(max(0, min(x + w, px1) - max(x, px0)) * max(0, min(y + h, py1) - max(y, py0))
                       for px0, py0, px1, py1 in placed)

        best = min(spots, key=overlap)  # the first spot of least overlap, a free one when there is one
        corners.append(best)
        placed.append((best[0], best[1], best[0] + w, best[1] + h))
    return corners


def label_map(masks: Union[torch.Tensor, np.ndarray, list], labels: Sequence[int], num_classes: int, *,
              scores: Optional[Sequence[float]] = None, image_size=None) -> np.ndarray:
    """Colour-coded per-class label map: each pixel takes the colour of its instance's class.

    masks: ``(N, H, W)`` bool tensor/array, or a list of N COCO RLE dicts.
    labels: ``(N,)`` class labels in 1..num_classes.
    scores: ``(N,)``; where instances overlap the highest-scoring one wins. Without scores the earlier
        instance wins (detections come sorted by score).
    image_size: ``(H, W)``, needed only when ``masks`` is an empty list.
    Returns ``(H, W, 3)`` uint8 RGB; background is black, class ``c`` is ``colors([c])``.
    """
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    masks = _mask_array(masks, image_size)
    if len(masks) != len(labels):
        raise InputError(f"got {len(masks)} masks but {len(labels)} labels")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise InputError(f"labels must be in 1..{num_classes}, got {sorted(set(labels.tolist()))}")
    if scores is None:
        order = np.arange(len(labels))[::-1]
    else:
        order = np.argsort(np.asarray(torch.as_tensor(scores).cpu(), dtype=np.float64), kind="stable")
    class_image = np.zeros(masks.shape[1:], dtype=np.int64)
    for i in order:  # lowest priority first; later writes win
        class_image[masks[i]] = labels[i]
    palette = np.concatenate([np.zeros((1, 3), np.uint8), colors(range(1, num_classes + 1))])
    return palette[class_image]


def add_legend(image: np.ndarray, labels: Sequence[int], names: Sequence[str], *, row_height: int = 18) -> np.ndarray:
    """``image`` with a key to its colours on the right: one swatch (``colors([label])``) and name per row.

    image: ``(H, W, 3)`` uint8 RGB, e.g. a :func:`label_map`. labels: the class labels to list; names:
    their names (same order).
    Returns ``(max(H, rows * row_height), W + legend width, 3)`` uint8 RGB; new area is black.
    """
    if len(labels) != len(names):
        raise InputError(f"got {len(labels)} labels but {len(names)} names")
    text_width = max((cv2.getTextSize(n, _FONT, _FONT_SCALE, 1)[0][0] for n in names), default=0)
    height, width = image.shape[:2]
    out = np.zeros((max(height, len(labels) * row_height), width + row_height + text_width + 8, 3), np.uint8)
    out[:height, :width] = image
    for row, (color, name) in enumerate(zip(colors(labels), names)):
        top = row * row_height
        cv2.rectangle(out, (width + 2, top + 2), (width + row_height - 3, top + row_height - 3), color.tolist(), -1)
        cv2.putText(out, name, (width + row_height + 2, top + row_height - 5), _FONT, _FONT_SCALE, (255, 255, 255),
                    1, cv2.LINE_AA)
    return out


def save_png(path: Union[str, Path], image: np.ndarray) -> None:
    """Atomically write an ``(H, W, 3)`` uint8 RGB array as a PNG file (creating the folder)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"could not encode {path} as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data.tobytes()))
