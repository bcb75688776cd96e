"""RoI -> pyramid level assignment and multi-level RoIAlign, against torchvision's LevelMapper and
MultiScaleRoIAlign."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

from maskrcnn.modeling.poolers import MultiLevelRoIAlign, assign_levels


def _boxes(n, seed=0, extent=800.0):
    """Boxes from 1 to 700 px on a side, including sides exactly at level boundaries (112, 224, 448)."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g) * extent
    side = torch.exp(torch.rand(n, 1, generator=g) * 6.5).expand(n, 2).clone()
    side[:3] = torch.tensor([[112.0, 112.0], [224.0, 224.0], [448.0, 448.0]])
    return torch.cat([corner, corner + side], dim=1)


def test_assign_levels_equals_torchvision_level_mapper():
    boxes = _boxes(500)
    expected = LevelMapper(k_min=2, k_max=5, canonical_scale=224, canonical_level=4)([boxes])
    ours = assign_levels(boxes, min_level=2, max_level=5, canonical_scale=224, canonical_level=4)
    assert torch.equal(ours, expected.to(torch.int64))
    assert set(ours.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("fast", [False, True])
def test_multi_level_roi_align_equals_torchvision(fast):
    g = torch.Generator().manual_seed(1)
    image_sizes = [(256, 320), (200, 288)]
    features = [torch.randn(2, 8, 256 // s, 320 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [_boxes(40, seed=2, extent=200.0).clamp(max=250.0), _boxes(25, seed=3, extent=180.0).clamp(max=190.0)]
    ours = MultiLevelRoIAlign(output_size=7, strides=(4, 8, 16, 32), sampling_ratio=2, fast=fast)(features, boxes)
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = tv({str(i): f for i, f in enumerate(features)}, boxes, image_sizes)
    assert ours.shape == (65, 8, 7, 7)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_multi_level_roi_align_gradients_equal_torchvision(fast):
    """Training backpropagates through the pooled RoIs into every level's feature map."""
    g = torch.Generator().manual_seed(4)
    image_sizes = [(640, 640)]
    features = [torch.randn(1, 8, 640 // s, 640 // s, generator=g) for s in (4, 8, 16, 32)]
    boxes = [_boxes(60, seed=5, extent=100.0).clamp(max=630.0)]
    grad = torch.randn(60, 8, 7, 7, generator=g)
    ours_in = [f.clone().requires_grad_() for f in features]
    tv_in = [f.clone().requires_grad_() for f in features]
    MultiLevelRoIAlign(output_size=7, strides=(4, 8, 16, 32), sampling_ratio=2, fast=fast)(ours_in, boxes).backward(grad)
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    tv({str(i): f for i, f in enumerate(tv_in)}, boxes, image_sizes).backward(grad)
    for level, (ours, expected) in enumerate(zip(ours_in, tv_in)):
        assert expected.grad.abs().sum() > 0, f"level {level} pooled no RoI"
        torch.testing.assert_close(ours.grad, expected.grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fast", [False, True])
def test_features_in_read_layout_pool_the_same_values(fast):
    """The fast RoIAlign reads channels-last rows: converted once, its levels are channels-last (a view for
    every pooler after) and pool exactly as before; torchvision's kernel keeps them as they are."""
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, 8, 256 // s, 320 // s, generator=g) for s in (4, 8, 16, 32, 64)]
    boxes = [_boxes(30, seed=5, extent=200.0).clamp(max=250.0), _boxes(20, seed=6, extent=180.0).clamp(max=190.0)]
    pooler = MultiLevelRoIAlign(output_size=7, strides=(4, 8, 16, 32), sampling_ratio=2, fast=fast)
    converted = pooler.in_read_layout(features)
    assert [f.is_contiguous(memory_format=torch.channels_last) for f in converted[:4]] == [fast] * 4
    assert converted[4] is features[4]  # not pooled, left alone
    assert torch.equal(pooler(converted, boxes), pooler(features, boxes))
