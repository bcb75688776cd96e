"""Mask targets: 28x28 crops of ground-truth masks (BitMasks and PolygonMasks), and agreement between
the training crop and the inference paste."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from maskrcnn.modeling.mask_head import mask_targets
from maskrcnn.modeling.paste import paste_masks_in_image
from maskrcnn.structures import BitMasks, PolygonMasks

H, W = 96, 128
S = 28


def rectangle_polygon(x0, y0, x1, y1):
    return PolygonMasks([[np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]], (H, W))


def circle_polygon(cx, cy, r, points=96):
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return PolygonMasks([[np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).reshape(-1)]], (H, W))


def tight_box(mask):
    """(1, 4) float xyxy box enclosing the True pixels of an (H, W) bool mask (pixel i spans [i, i + 1))."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


# A 40 x 20 rectangle; and one of 12 x 8 pixels, where half a pixel is almost half a target cell.
RECTANGLES = [(20, 10, 60, 30), (30, 40, 42, 48)]


def test_polygon_rectangle_cropped_by_itself_is_all_ones():
    target = rectangle_polygon(20, 10, 60, 30).crop_and_resize(torch.tensor([[20.0, 10.0, 60.0, 30.0]]), S)
    assert torch.equal(target, torch.ones(1, S, S))


def test_bitmask_rectangle_cropped_by_itself_is_all_ones():
    bits = rectangle_polygon(20, 10, 60, 30).to_bitmasks()
    assert bits.tensor.sum() == 40 * 20
    target = bits.crop_and_resize(torch.tensor([[20.0, 10.0, 60.0, 30.0]]), S)
    assert torch.equal(target > 0.5, torch.ones(1, S, S, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["bit", "polygon"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_box_twice_as_wide_gives_a_half(kind, side):
    masks = rectangle_polygon(20, 10, 60, 30)
    if kind == "bit":
        masks = masks.to_bitmasks()
    # Twice the rectangle's width, extending right (or left) of it; rows strictly inside the rectangle.
    box = [20.0, 12.0, 100.0, 28.0] if side == "left" else [-20.0, 12.0, 60.0, 28.0]
    target = masks.crop_and_resize(torch.tensor([box]), S)[0] > 0.5
    expected = torch.zeros(S, S, dtype=torch.bool)
    expected[:, : S // 2] = True
    assert torch.equal(target, expected if side == "left" else expected.flip(1))


@pytest.mark.parametrize("rect", RECTANGLES)
def test_polygon_and_bitmask_rectangle_targets_agree(rect):
    polygon = rectangle_polygon(*rect)
    box = torch.tensor([rect], dtype=torch.float32)
    agree = (polygon.crop_and_resize(box, S) > 0.5) == (polygon.to_bitmasks().crop_and_resize(box, S) > 0.5)
    assert agree.float().mean() >= 0.95


def test_polygon_and_bitmask_circle_targets_agree():
    polygon = circle_polygon(64, 48, 30)
    bits = polygon.to_bitmasks()
    box = tight_box(bits.tensor[0])
    agree = (polygon.crop_and_resize(box, S) > 0.5) == (bits.crop_and_resize(box, S) > 0.5)
    assert agree.float().mean() >= 0.95


@pytest.mark.parametrize("kind", ["bit", "polygon"])
@pytest.mark.parametrize("shape", ["rectangle", "circle"])
def test_crop_then_paste_reproduces_the_mask(shape, kind):
    polygon = rectangle_polygon(20, 10, 60, 30) if shape == "rectangle" else circle_polygon(64, 48, 30)
    original = polygon.to_bitmasks().tensor[0]
    box = tight_box(original)
    masks = polygon.to_bitmasks() if kind == "bit" else polygon
    pasted = paste_masks_in_image(masks.crop_and_resize(box, S), box, (H, W))
    assert pasted.shape == (1, H, W) and pasted.dtype == torch.bool
    assert iou(pasted[0], original) > 0.9


def test_targets_follow_matched_instances_across_images():
    first = BitMasks(torch.stack([rectangle_polygon(0, 0, 40, 40).to_bitmasks().tensor[0],
                                  rectangle_polygon(60, 20, 120, 90).to_bitmasks().tensor[0]]))
    second = circle_polygon(64, 48, 20)
    boxes = [torch.tensor([[60.0, 20.0, 120.0, 90.0], [0.0, 0.0, 40.0, 40.0], [50.0, 10.0, 110.0, 80.0]]),
             torch.zeros(0, 4),
             torch.tensor([[44.0, 28.0, 84.0, 68.0]])]
    matched = [torch.tensor([1, 0, 1]), torch.zeros(0, dtype=torch.int64), torch.tensor([0])]
    empty = BitMasks(torch.zeros(0, H, W, dtype=torch.bool))
    targets = mask_targets([first, empty, second], boxes, matched, S)
    assert targets.shape == (4, S, S) and targets.dtype == torch.float32
    assert targets.min() >= 0 and targets.max() <= 1
    assert torch.equal(targets[:3], first.crop_and_resize(boxes[0], S, indices=matched[0]))
    assert torch.equal(targets[3:], second.crop_and_resize(boxes[2], S))
    assert targets[0].mean() > 0.9 and targets[1].mean() > 0.9  # each box is its own instance's rectangle
    assert 0.4 < targets[2].mean() < 0.9  # a shifted box sees part of instance 1


def test_no_positive_boxes_give_an_empty_target():
    masks = BitMasks(torch.zeros(2, H, W, dtype=torch.bool))
    targets = mask_targets([masks], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], S)
    assert targets.shape == (0, S, S)



def test_one_shape_stored_as_polygon_or_as_rle_gets_the_same_hard_target():
    """A 60-pixel circle as a COCO polygon and as the RLE pycocotools rasterises from it: both targets are
    0/1 (no soft cells from RoIAlign), and they differ in at most 1 % of the cells, all on the outline."""
    polygon = circle_polygon(64, 48, 30)
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon.polygons[0][0].tolist()], H, W))
    bits = BitMasks(torch.from_numpy(mask_utils.decode(rle)).bool()[None])
    box = tight_box(bits.tensor[0])
    from_polygon, from_rle = polygon.crop_and_resize(box, S)[0], bits.crop_and_resize(box, S)[0]
    for target in (from_polygon, from_rle):
        assert set(target.unique().tolist()) == {0.0, 1.0}
    differing = torch.nonzero(from_polygon != from_rle)
    assert len(differing) <= 0.01 * S * S
    for y, x in differing.tolist():  # a differing cell has a neighbour of the other value: it is on the outline
        window = from_polygon[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
        assert window.min() == 0 and window.max() == 1


def test_a_cell_half_covered_is_background_as_the_paste_decides():
    """Targets and the paste split at one half the same way: a target cell whose coverage is exactly one
    half is background, as a pasted pixel whose probability is exactly the mask threshold is (the paste keeps
    ``p > threshold``, see tests/test_paste.py)."""
    bits = torch.zeros(1, S, 40, dtype=torch.bool)
    bits[0, :, :10] = True  # pixel columns 0..9
    # A box shifted by half a pixel: cell column 9 samples halfway between pixel columns 9 and 10.
    target = BitMasks(bits).crop_and_resize(torch.tensor([[0.5, 0.0, S + 0.5, float(S)]]), S)[0]
    assert target[:, :9].eq(1).all() and target[:, 10:].eq(0).all()
    assert target[:, 9].eq(0).all()
