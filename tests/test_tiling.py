"""Tiled inference: the tile grid, merging across tile borders, and agreement with untiled inference.

Most tests run a colour-segmentation stand-in for a trained model (:class:`ColourDetector`): it finds the
objects of a synthetic image exactly, as connected components of their colour, and reports them through
the model's inference interface (boxes, scores, labels and 28 x 28 mask probabilities, pasted by the same
code as the model's). Like a trained model it sees only the pixels of its tile, so an object cut by a tile
border comes back as pieces from each tile. The real model's plumbing is checked on random weights.
"""

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from maskrcnn.inference import detect
from maskrcnn.modeling.postprocess import to_original_image
from maskrcnn.predictor import Predictor
from maskrcnn.structures import BitMasks
from maskrcnn.tiling import detect_tiled, merge_tile_detections, tile_grid
from tiny import tiny_config

COLOURS = {1: (1.0, 0.1, 0.1), 2: (0.1, 1.0, 0.1)}  # label -> RGB in 0-1 on a grey background
BACKGROUND = 0.3


class ColourDetector:
    """Detects each connected component of a label's colour: box, score (larger pieces score higher), label,
    and mask probabilities cropped and resized to 28 x 28 as training targets are."""

    num_classes = 2
    mask_threshold = 0.5
    paste_memory_mb = 64
    precision = "fp32"

    def __call__(self, images, mask_format="bitmap"):
        return [self._detect(image, mask_format) for image in images]

    def _detect(self, image, mask_format):
        pixels = image.permute(1, 2, 0).numpy()
        height, width = pixels.shape[:2]
        boxes, scores, labels, masks = [], [], [], []
        for label, colour in COLOURS.items():
            match = (np.abs(pixels - np.array(colour, dtype=np.float32)).max(axis=2) < 0.05).astype(np.uint8)
            count, components, stats, _ = cv2.connectedComponentsWithStats(match, connectivity=8)
            for k in range(1, count):
                x, y, w, h, area = stats[k]
                boxes.append([x, y, x + w, y + h])
                scores.append(0.5 + 0.5 * area / (height * width))
                labels.append(label)
                masks.append(components == k)
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        probs = BitMasks(torch.from_numpy(np.stack(masks) if masks else np.zeros((0, height, width), bool))
                         ).crop_and_resize(boxes, 28)
        result = {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32),
                  "labels": torch.tensor(labels, dtype=torch.int64), "mask_probs": probs}
        return to_original_image(result, (height, width), (height, width), mask_format=mask_format,
                                 mask_threshold=self.mask_threshold, memory_mb=self.paste_memory_mb)


def _scene(height, width, objects):
    """A grey image with filled ellipses ``(label, cx, cy, rx, ry)``; returns the image and each object's mask."""
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.float32)
    masks = []
    for label, cx, cy, rx, ry in objects:
        mask = np.zeros((height, width), np.uint8)
        cv2.ellipse(mask, (cx, cy), (rx, ry), 0, 0, 360, 1, -1)
        canvas[mask.astype(bool)] = COLOURS[label]
        masks.append(mask.astype(bool))
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), masks


def _mask_iou(rle, mask):
    truth = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return float(mask_utils.iou([dict(rle, counts=rle["counts"].encode())], [truth], [0])[0, 0])


def _match(instances, masks):
    """Per object, the mask IoU of its best detection, and how many detections each object drew."""
    ious = np.array([[_mask_iou(rle, mask) for mask in masks] for rle in instances.masks]).reshape(-1, len(masks))
    best = ious.argmax(axis=1)
    return ious.max(axis=0), np.bincount(best[ious.max(axis=1) > 0.1], minlength=len(masks))


# ---------------------------------------------------------------- the grid and the merge


def test_tile_grid_covers_the_image_with_the_overlap():
    tiles = tile_grid((520, 700), 200, 60)
    xs = sorted({(x0, x1) for x0, _, x1, _ in tiles})
    ys = sorted({(y0, y1) for _, y0, _, y1 in tiles})
    assert xs == [(0, 200), (140, 340), (280, 480), (420, 620), (500, 700)]
    assert ys == [(0, 200), (140, 340), (280, 480), (320, 520)]
    assert len(tiles) == 20
    covered = np.zeros((520, 700), bool)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_grid((50, 80), 100, 30) == [(0, 0, 80, 50)]  # smaller than a tile: one tile, the image
    with pytest.raises(ValueError, match="tile_overlap"):
        tile_grid((50, 80), 100, 100)


def test_merge_joins_pieces_from_different_tiles_only():
    boxes = torch.tensor([[120., 10., 200., 60.],  # tile 0: left piece of an object cut at x = 200
                          [140., 12., 260., 58.],  # tile 1: its right piece (overlap strip 140-200)
                          [150., 20., 190., 50.],  # tile 0: a second object inside the first's box, same label
                          [300., 10., 340., 40.],  # tile 1: elsewhere
                          [130., 10., 200., 60.]])  # tile 2: another label over the first object
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    labels = torch.tensor([1, 1, 1, 1, 2])
    tiles = torch.tensor([0, 1, 0, 1, 2])
    tile_boxes = torch.tensor([[0., 0., 200., 200.], [140., 0., 340., 200.], [0., 0., 200., 200.]])
    groups = merge_tile_detections(boxes, scores, labels, tiles, tile_boxes)
    assert groups == [[4], [0, 1], [2], [3]]


def test_merge_follows_an_object_across_three_tiles():
    # pieces A | B | C of one long object: A and C do not overlap, each overlaps B
    boxes = torch.tensor([[10., 0., 200., 40.], [140., 0., 340., 40.], [280., 0., 400., 40.]])
    tile_boxes = torch.tensor([[0., 0., 200., 200.], [140., 0., 340., 200.], [280., 0., 480., 200.]])
    labels, tiles = torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2])
    assert merge_tile_detections(boxes, torch.tensor([0.9, 0.5, 0.8]), labels, tiles, tile_boxes) == [[0, 1, 2]]
    # a box that disagrees inside the shared strip (another object) stays apart
    apart = torch.tensor([[10., 0., 200., 40.], [140., 60., 340., 100.]])
    assert merge_tile_detections(apart, torch.tensor([0.9, 0.5]), labels[:2], tiles[:2], tile_boxes) == [[0], [1]]


# ---------------------------------------------------------------- detection, tiled


STRADDLING = [  # (label, cx, cy, rx, ry): wider than the 60 px overlap, each cut by a border in every tile
    (1, 200, 100, 70, 30),   # across the x = 140 / 200 borders
    (2, 340, 300, 45, 65),   # across a corner of four tiles
    (1, 480, 160, 60, 40),   # across x = 420 / 480 and y = 140 / 200
    (2, 620, 420, 50, 50),   # across x = 500 / 620 and y = 320 / 480
]
INSIDE = [(2, 60, 60, 25, 20), (1, 80, 420, 30, 25), (2, 600, 60, 20, 30)]  # each inside one tile


def test_objects_straddling_tile_borders_are_found_once_with_full_masks():
    image, masks = _scene(520, 700, STRADDLING + INSIDE)
    detector = ColourDetector()
    tiled = detect_tiled(detector, image, class_names=["red", "green"], tile_size=200, tile_overlap=60)
    whole = detect(detector, [image], class_names=["red", "green"], mask_format="rle")[0]
    assert len(whole) == len(masks)  # the stand-in finds every object when it sees the whole image
    best_tiled, hits = _match(tiled, masks)
    best_whole, _ = _match(whole, masks)
    assert len(tiled) == len(masks) and hits.tolist() == [1] * len(masks)
    assert (best_whole > 0.9).all()
    # straddling objects come back as good as when the detector sees them whole
    assert (best_tiled >= best_whole - 0.02).all(), (best_tiled, best_whole)
    for mask in masks[:len(STRADDLING)]:
        ys, xs = mask.nonzero()
        truth = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (tiled.boxes - truth).abs().amax(1).min() <= 1.0  # the merged box is the whole object's


def test_tiled_and_untiled_detections_agree():
    objects = [(1, 70, 60, 40, 30), (2, 200, 150, 50, 35), (1, 330, 90, 30, 60), (2, 120, 240, 45, 30)]
    image, masks = _scene(300, 420, objects)
    detector = ColourDetector()
    whole = detect(detector, [image], class_names=["red", "green"], mask_format="rle")[0]
    tiled = detect_tiled(detector, image, class_names=["red", "green"], tile_size=160, tile_overlap=64,
                         tiles_per_batch=3)
    assert len(tiled) == len(whole) == len(objects)
    for i in range(len(whole)):
        j = int(((tiled.boxes - whole.boxes[i]).abs().sum(1)).argmin())
        assert tiled.labels[j] == whole.labels[i]
        assert torch.allclose(tiled.boxes[j], whole.boxes[i], atol=1.0)
        truth = mask_utils.decode(dict(whole.masks[i], counts=whole.masks[i]["counts"].encode()))
        assert _mask_iou(tiled.masks[j], truth.astype(bool)) > 0.9


def test_tiled_detection_returns_rle_or_no_masks_and_handles_no_detections():
    image, _ = _scene(100, 100, [(1, 50, 50, 20, 20)])
    with pytest.raises(ValueError, match="full-size bitmap"):
        detect_tiled(ColourDetector(), image, class_names=["red", "green"], tile_size=64, tile_overlap=16,
                     mask_format="bitmap")
    none = detect_tiled(ColourDetector(), image, class_names=["red", "green"], tile_size=64, tile_overlap=16,
                        mask_format="none")
    assert len(none) == 1 and none.masks is None
    blank, _ = _scene(100, 100, [])
    empty = detect_tiled(ColourDetector(), blank, class_names=["red", "green"], tile_size=64, tile_overlap=16)
    assert len(empty) == 0 and empty.masks == [] and empty.boxes.shape == (0, 4)


# ---------------------------------------------------------------- the real model, random weights


def _predictor(**kwargs):
    torch.manual_seed(0)
    cfg = tiny_config()
    return Predictor(cfg, None, class_names=["a", "b", "c"], score_thresh=0.0, precision="fp32", **kwargs)


def test_one_tile_predictor_equals_untiled():
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1))
    untiled = _predictor(mask_format="rle")(image)
    tiled = _predictor(tile_size=128, tile_overlap=32)(image)
    assert len(untiled) > 0
    order_u = untiled.scores.argsort(descending=True, stable=True)
    order_t = tiled.scores.argsort(descending=True, stable=True)
    assert torch.equal(untiled.boxes[order_u], tiled.boxes[order_t])
    assert torch.equal(untiled.labels[order_u], tiled.labels[order_t])
    assert [untiled.masks[i] for i in order_u.tolist()] == [tiled.masks[i] for i in order_t.tolist()]


def test_tiled_predictor_returns_full_image_detections():
    image = torch.rand(3, 150, 230, generator=torch.Generator().manual_seed(2))
    result = _predictor(tile_size=96, tile_overlap=32, tiles_per_batch=2)(image)
    assert len(result) > 0 and result.image_size == (150, 230)
    assert (result.boxes[:, :2] >= 0).all() and (result.boxes[:, 2] <= 230).all() and (result.boxes[:, 3] <= 150).all()
    assert all(m["size"] == [150, 230] for m in result.masks)
    assert (result.scores[:-1] >= result.scores[1:]).all()
    with pytest.raises(ValueError, match="full-size bitmap"):
        _predictor(tile_size=96, mask_format="bitmap")
