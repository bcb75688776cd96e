"""Feature pyramid: the fused upsample-and-add equals lateral + nearest upsampling."""

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.modeling.fpn import add_upsampled


@pytest.mark.parametrize("channels_last", [False, True])
def test_add_upsampled_is_lateral_plus_nearest_upsampling(channels_last):
    g = torch.Generator().manual_seed(5)
    lateral = torch.randn(2, 3, 8, 12, dtype=torch.float64, generator=g)
    top_down = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    if channels_last:
        lateral = lateral.contiguous(memory_format=torch.channels_last)
    lateral.requires_grad_()
    expected = lateral + F.interpolate(top_down, size=(8, 12), mode="nearest")
    # The in-place sum needs a non-leaf lateral, as the lateral convolution's output is.
    assert torch.equal(add_upsampled(lateral * 1, top_down), expected)
    assert torch.autograd.gradcheck(lambda a, b: add_upsampled(a * 1, b), (lateral, top_down))


def test_add_upsampled_handles_odd_sizes():
    lateral, top_down = torch.randn(1, 2, 7, 9), torch.randn(1, 2, 4, 5)
    expected = lateral + F.interpolate(top_down, size=(7, 9), mode="nearest")
    assert torch.equal(add_upsampled(lateral.clone(), top_down), expected)
