"""Large-scale jitter: the output is always the square, boxes and masks follow the image, what the crop cuts
away is dropped, crowd boxes are cut the same way; the polygon clip and the mask box helper on their own."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import Config
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.transforms import (LargeScaleJitter, RandomHorizontalFlip, ResizeShortestEdge, _clip_polygon,
                                      build_transforms, mask_boxes)
from maskrcnn.errors import InputError
from maskrcnn.modeling.maskrcnn import check_targets
from maskrcnn.structures import BitMasks, PolygonMasks
from test_coco_dataset import _bits, _tight_boxes
from test_copy_paste import _blocks

PAD = (10.0, 20.0, 30.0)


def _coordinate_image(height, width):
    """(H, W, 3) uint8: red is the column, green the row (sides up to 256)."""
    ys, xs = np.mgrid[:height, :width]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)


def _target(bits, crowd_boxes=()):
    bits = torch.as_tensor(bits, dtype=torch.bool)
    return {"boxes": _tight_boxes(bits), "labels": torch.arange(1, len(bits) + 1), "masks": BitMasks(bits),
            "crowd_boxes": torch.tensor(crowd_boxes, dtype=torch.float32).reshape(-1, 4), "image_id": 1,
            "orig_size": tuple(bits.shape[1:])}


def _polygon_target(polygons, height, width):
    masks = PolygonMasks([[np.array(p, dtype=np.float64)] for p in polygons], (height, width))
    rles = [mask_utils.merge(mask_utils.frPyObjects([list(p)], height, width)) for p in polygons]
    boxes = torch.tensor(np.array([mask_utils.toBbox(r) for r in rles]), dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]
    return {"boxes": boxes, "labels": torch.arange(1, len(polygons) + 1), "masks": masks,
            "crowd_boxes": torch.zeros((0, 4)), "image_id": 1, "orig_size": (height, width)}


# Three instances of an 80 x 100 image: top left corner, bottom right corner, centre.
CORNERS = [(0, 10, 0, 10), (70, 80, 90, 100), (35, 45, 45, 55)]
CROWD = [[60.0, 0.0, 100.0, 20.0]]


@pytest.mark.parametrize("factor", [0.2, 1.0, 3.0])
@pytest.mark.parametrize("shape", [(80, 100), (100, 60)])
@pytest.mark.parametrize("polygons", [False, True], ids=["bitmasks", "polygons"])
def test_output_is_the_square_whatever_the_factor(factor, shape, polygons):
    height, width = shape
    blocks = [(5, 40, 5, 40), (height - 30, height - 2, width - 30, width - 2)]
    if polygons:
        target = _polygon_target([[x0, y0, x1, y0, x1, y1, x0, y1] for y0, y1, x0, x1 in blocks], height, width)
    else:
        target = _target(_blocks(blocks, height, width))
    jitter = LargeScaleJitter(64, [factor, factor], PAD)
    for seed in range(5):
        image, out = jitter(_coordinate_image(height, width), target, np.random.default_rng(seed))
        assert image.shape == (64, 64, 3) and image.dtype == np.float32
        assert out["masks"].image_size == (64, 64)
        assert isinstance(out["masks"], type(target["masks"]))
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])


@pytest.mark.parametrize("polygons", [False, True], ids=["bitmasks", "polygons"])
def test_boxes_are_the_tight_boxes_of_the_masks(polygons):
    if polygons:
        target = _polygon_target([[3, 4, 60, 10, 30, 70], [50.5, 40.2, 95.7, 45.1, 97.3, 79.9, 55, 70]], 80, 100)
    else:
        disk = np.hypot(*np.mgrid[-40:40, -50:50]) < 25
        target = _target(torch.stack([torch.from_numpy(disk), _blocks([(60, 80, 10, 90)], 80, 100)[0]]))
    jitter = LargeScaleJitter(48, [0.3, 2.5], PAD)
    kept = 0
    for seed in range(30):
        _, out = jitter(_coordinate_image(80, 100), target, np.random.default_rng(seed))
        bits = _bits(out["masks"])
        assert bits.flatten(1).any(1).all(), "an instance without a pixel was kept"
        assert torch.equal(out["boxes"], _tight_boxes(bits))
        kept += len(bits)
    assert kept > 30


def test_crop_at_scale_one_cuts_a_window_and_drops_what_it_cuts_away():
    """Factor 2 on a 100-px-wide image and a 50-px square: no resampling, so every output is a window."""
    height, width, size = 80, 100, 50
    bits = _blocks(CORNERS, height, width)
    target = _target(bits, CROWD)
    image = _coordinate_image(height, width)
    jitter = LargeScaleJitter(size, [2.0, 2.0], PAD)
    seen = set()
    for seed in range(40):
        out_image, out = jitter(image, target, np.random.default_rng(seed))
        left, top = int(out_image[0, 0, 0]), int(out_image[0, 0, 1])  # the window, read off the image
        assert np.array_equal(out_image, image[top:top + size, left:left + size].astype(np.float32))
        window = bits[:, top:top + size, left:left + size]
        inside = window.flatten(1).any(1)
        assert torch.equal(out["labels"], target["labels"][inside])
        assert torch.equal(out["masks"].tensor, window[inside])
        crowd = (torch.tensor(CROWD) - torch.tensor([left, top] * 2)).clamp(0, size)
        crowd = crowd[(crowd[:, 2] > crowd[:, 0]) & (crowd[:, 3] > crowd[:, 1])]
        assert torch.equal(out["crowd_boxes"], crowd)
        seen.add((tuple(inside.tolist()), len(crowd)))
    assert {kept[:2] for kept, _ in seen} >= {(True, False), (False, True)}  # each corner cut away at times
    assert {crowd for _, crowd in seen} == {0, 1}


def test_padding_keeps_the_whole_image_at_the_top_left():
    height, width, size = 80, 100, 50
    bits = _blocks(CORNERS, height, width)
    image = _coordinate_image(height, width)
    out_image, out = LargeScaleJitter(size, [0.5, 0.5], PAD)(image, _target(bits, CROWD), np.random.default_rng(0))
    new_h, new_w = 20, 25  # the longer side is 0.5 * 50
    resized, _ = ResizeShortestEdge([new_h], 10_000)(image, _target(bits), np.random.default_rng(0))
    assert np.array_equal(out_image[:new_h, :new_w], resized)
    assert (out_image[new_h:] == PAD).all() and (out_image[:, new_w:] == PAD).all()
    # nearest neighbour of each pixel centre, as torch's "nearest-exact"
    expected = F.interpolate(bits[None].float(), size=(new_h, new_w), mode="nearest-exact")[0] > 0
    assert torch.equal(out["masks"].tensor[:, :new_h, :new_w], expected)
    assert not out["masks"].tensor[:, new_h:].any() and not out["masks"].tensor[:, :, new_w:].any()
    assert torch.equal(out["crowd_boxes"], torch.tensor(CROWD) / 4)


@pytest.mark.parametrize("polygons", [False, True], ids=["bitmasks", "polygons"])
def test_masks_stay_on_their_pixels(polygons):
    """Each instance is painted in a colour channel of its own: after any jitter, the pixels brighter than
    half in that channel and the mask coincide."""
    height, width = 90, 120
    blocks = [(5, 45, 10, 60), (50, 85, 30, 110), (10, 40, 75, 115)]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for k, (y0, y1, x0, x1) in enumerate(blocks):
        image[y0:y1, x0:x1, k] = 200
    if polygons:
        target = _polygon_target([[x0, y0, x1, y0, x1, y1, x0, y1] for y0, y1, x0, x1 in blocks], height, width)
    else:
        target = _target(_blocks(blocks, height, width))
    jitter = LargeScaleJitter(64, [0.4, 3.0], (0.0, 0.0, 0.0))
    checked = 0
    for seed in range(20):
        out_image, out = jitter(image, target, np.random.default_rng(seed))
        for mask, label, box in zip(_bits(out["masks"]), out["labels"].tolist(), out["boxes"]):
            painted = torch.from_numpy(out_image[..., label - 1] > 100)
            if min(box[2] - box[0], box[3] - box[1]) >= 8:  # thinner: the rasterisations' edge conventions weigh
                iou = (mask & painted).sum() / (mask | painted).sum()
                assert iou > 0.85, (seed, label, float(iou))
                checked += 1
    assert checked > 20


def test_polygons_and_their_bitmaps_jitter_alike():
    height, width = 80, 100
    polygons = [[3, 4, 60, 10, 30, 70], [50.5, 40.2, 95.7, 45.1, 97.3, 79.9, 55, 70]]
    as_polygons = _polygon_target(polygons, height, width)
    as_bits = _target(as_polygons["masks"].to_bitmasks().tensor)
    jitter = LargeScaleJitter(48, [0.5, 2.5], PAD)
    for seed in range(20):
        _, a = jitter(_coordinate_image(height, width), as_polygons, np.random.default_rng(seed))
        _, b = jitter(_coordinate_image(height, width), as_bits, np.random.default_rng(seed))
        for label in set(a["labels"].tolist()) & set(b["labels"].tolist()):
            x, y = _bits(a["masks"])[a["labels"] == label][0], b["masks"].tensor[b["labels"] == label][0]
            if x.sum() >= 50:
                assert (x & y).sum() / (x | y).sum() > 0.8


def test_polygon_left_as_a_line_on_the_window_edge_is_dropped():
    """A rectangle that ends exactly where the crop starts keeps a zero-area polygon: dropped."""
    target = _polygon_target([[0, 0, 20, 0, 20, 80, 0, 80], [20, 0, 100, 0, 100, 80, 20, 80]], 80, 100)
    jitter = LargeScaleJitter(50, [2.0, 2.0], PAD)
    for seed in range(40):
        image, out = jitter(_coordinate_image(80, 100), target, np.random.default_rng(seed))
        if image[0, 0, 0] == 20:  # the window starts at column 20
            assert out["labels"].tolist() == [2]
            return
    pytest.fail("no window started at column 20")


def test_flip_after_jitter_keeps_boxes_tight():
    target = _target(_blocks(CORNERS, 80, 100), CROWD)
    image, out = LargeScaleJitter(64, [0.3, 0.6], PAD)(_coordinate_image(80, 100), target, np.random.default_rng(1))
    _, flipped = RandomHorizontalFlip(1.0)(image, out, np.random.default_rng(0))
    assert torch.equal(flipped["boxes"], _tight_boxes(flipped["masks"].tensor))


def test_clip_polygon_keeps_the_part_inside():
    square = np.array([[-10, -10], [10, -10], [10, 10], [-10, 10]], dtype=np.float64)
    clipped = _clip_polygon(square, 50, 50)
    assert sorted(map(tuple, clipped.tolist())) == [(0, 0), (0, 10), (10, 0), (10, 10)]
    assert len(_clip_polygon(square - 30, 50, 50)) == 0
    assert np.array_equal(_clip_polygon(square + 20, 50, 50), square + 20)  # inside: unchanged


def test_clip_polygon_of_a_concave_shape_keeps_its_area():
    # A "U": two 10-wide legs joined at the bottom (y 30..40); the window cuts off the bottom.
    u_shape = np.array([[0, 0], [10, 0], [10, 30], [20, 30], [20, 0], [30, 0], [30, 40], [0, 40]], dtype=np.float64)
    clipped = _clip_polygon(u_shape, 100, 20)
    x, y = clipped[:, 0], clipped[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert area == pytest.approx(2 * 10 * 20)
    assert clipped[:, 1].max() == 20


def test_mask_boxes_are_the_tight_boxes():
    rng = np.random.default_rng(0)
    bits = torch.from_numpy(rng.random((6, 30, 40)) < 0.01)
    bits[0] = False
    bits[1, 29, 39] = True
    boxes = mask_boxes(bits)
    assert boxes[0].tolist() == [0, 0, 0, 0]
    assert torch.equal(boxes[1:], _tight_boxes(bits[1:]))


def test_build_transforms_jitters_to_the_largest_training_size():
    cfg = Config()
    cfg.model.input.min_size = [64, 96, 80]
    cfg.model.input.pixel_mean = [0.5, 0.25, 0.0]
    cfg.data.scale_jitter = [0.1, 2.0]
    cfg.data.flip_prob = 0.3
    jitter, flip = build_transforms(cfg, train=True).transforms
    assert isinstance(jitter, LargeScaleJitter) and jitter.size == 96 and jitter.scale_range == (0.1, 2.0)
    assert jitter.pad_value.tolist() == [127.5, 63.75, 0.0]
    assert isinstance(flip, RandomHorizontalFlip) and flip.prob == 0.3


@pytest.mark.parametrize("bad", [[1.0], [0.0, 1.0], [2.0, 1.0], [0.5, float("inf")]])
def test_bad_scale_jitter_is_rejected(bad):
    cfg = Config()
    cfg.data.scale_jitter = bad
    with pytest.raises(InputError, match="data.scale_jitter"):
        build_transforms(cfg, train=True)


def test_dataset_samples_are_model_inputs_fixed_by_their_seed(tmp_path):
    generate_shapes(tmp_path, num_train=8, num_val=1, seed=0, min_size=48, max_size=96)
    cfg = Config()
    cfg.model.input.min_size = [64]
    cfg.data.scale_jitter = [0.2, 2.0]
    ds = CocoDetection(tmp_path / "annotations" / "instances_train.json", tmp_path / "train",
                       transforms=build_transforms(cfg, train=True))
    ds.drop_empty()
    images, targets = [], []
    for index in range(len(ds)):
        for seed in range(3):
            image, target = ds[(index, seed)]
            assert image.shape == (3, 64, 64)
            images.append(image)
            targets.append(target)
    check_targets(images, targets, num_classes=3)
    again = ds[(2, 1)]
    assert torch.equal(again[0], images[2 * 3 + 1]) and torch.equal(again[1]["boxes"], targets[2 * 3 + 1]["boxes"])
