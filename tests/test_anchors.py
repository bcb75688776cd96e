"""Anchors: equal to torchvision's AnchorGenerator, including its integer-stride rule, and ordered
location-major."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.fpn import FPN


def pyramid_shapes(padded_size):
    """(Hi, Wi) of P2..P6 for a padded input: each level halves with ceil rounding."""
    return [(math.ceil(padded_size[0] / s), math.ceil(padded_size[1] / s)) for s in FPN.strides]


def torchvision_anchors(sizes, ratios, padded_size, shapes):
    tv = TVAnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=(tuple(ratios),) * len(sizes))
    features = [torch.zeros(1, 1, h, w) for h, w in shapes]
    return tv(TVImageList(torch.zeros(1, 3, *padded_size), [tuple(padded_size)]), features)[0]


# 96 x 160 and 800 x 1216 are multiples of 32 but not 64: P6 is ceil-sized and its stride is the integer
# ratio (96 // 2 = 48, 160 // 3 = 53); 100 x 150 is not even a multiple of the P2 stride.
@pytest.mark.parametrize("padded_size", [(64, 64), (96, 160), (800, 1216), (100, 150)])
def test_anchors_match_torchvision(padded_size):
    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    shapes = pyramid_shapes(padded_size)
    ours = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)(shapes, padded_size, torch.device("cpu"))
    assert [len(a) for a in ours] == [h * w * len(ratios) for h, w in shapes]
    torch.testing.assert_close(torch.cat(ours), torchvision_anchors(sizes, ratios, padded_size, shapes), rtol=0, atol=0)


def test_unusual_sizes_and_ratios_match_torchvision():
    sizes, ratios = (20, 45, 90, 181, 363), (0.25, 0.7, 1.0, 3.0)
    padded_size = (160, 224)
    shapes = pyramid_shapes(padded_size)
    ours = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)(shapes, padded_size, torch.device("cpu"))
    torch.testing.assert_close(torch.cat(ours), torchvision_anchors(sizes, ratios, padded_size, shapes), rtol=0, atol=0)


def test_order_is_location_major():
    ratios = (0.5, 1.0, 2.0)
    generator = AnchorGenerator(sizes=(32, 64, 128, 256, 512), aspect_ratios=ratios)
    padded_size = (96, 160)
    shapes = pyramid_shapes(padded_size)
    anchors = generator(shapes, padded_size, torch.device("cpu"))
    for (hi, wi), level, size in zip(shapes, anchors, generator.sizes):
        stride_y, stride_x = padded_size[0] // hi, padded_size[1] // wi
        cell = generator.cell_anchors(size, torch.float32, torch.device("cpu"))
        for y, x, a in [(0, 0, 0), (0, 1, 2), (hi - 1, 0, 1), (hi - 1, wi - 1, 2)]:
            expected = cell[a] + torch.tensor([x * stride_x, y * stride_y] * 2, dtype=torch.float32)
            torch.testing.assert_close(level[(y * wi + x) * len(ratios) + a], expected, rtol=0, atol=0)


def test_cell_anchor_aspect_ratio_is_height_over_width():
    cell = AnchorGenerator(sizes=(64,), aspect_ratios=(0.5, 1.0, 2.0)).cell_anchors(64, torch.float32,
                                                                                     torch.device("cpu"))
    widths, heights = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]), rtol=0.03, atol=0)
    torch.testing.assert_close(widths * heights, torch.full((3,), 64.0 ** 2), rtol=0.02, atol=0)


def test_level_count_must_match_sizes():
    generator = AnchorGenerator(sizes=(32, 64, 128, 256, 512), aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match="4 feature levels but 5 anchor sizes"):
        generator(pyramid_shapes((64, 64))[:4], (64, 64), torch.device("cpu"))
