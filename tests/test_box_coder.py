"""Box coder: encode/decode round trip, agreement with torchvision's BoxCoder, and the exp clamp."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from maskrcnn.modeling.box_coder import BoxCoder

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


def random_boxes(n, generator):
    """(n, 4) float64 xyxy boxes with sides in [8, 208): any two differ in scale by less than the clamp."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 400
    wh = 8 + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 200
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_inverts_encode(weights):
    g = torch.Generator().manual_seed(0)
    reference, target = random_boxes(500, g), random_boxes(500, g)
    coder = BoxCoder(weights)
    decoded = coder.decode(coder.encode(target, reference), reference)
    assert decoded.shape == (500, 1, 4)
    torch.testing.assert_close(decoded[:, 0], target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(weights):
    g = torch.Generator().manual_seed(1)
    reference, target = random_boxes(300, g).float(), random_boxes(300, g).float()
    expected = TVBoxCoder(weights).encode_single(target, reference)
    torch.testing.assert_close(BoxCoder(weights).encode(target, reference), expected)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_matches_torchvision_for_several_classes(weights):
    g = torch.Generator().manual_seed(2)
    reference = random_boxes(300, g).float()
    deltas = torch.randn(300, 4 * 3, generator=g) * 2  # 3 classes per box; unit weights: some past the clamp
    expected = TVBoxCoder(weights).decode_single(deltas, reference).view(300, 3, 4)
    torch.testing.assert_close(BoxCoder(weights).decode(deltas, reference), expected)


def test_scale_clamp_bounds_width_and_height():
    reference = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # 20 wide, 40 high, centre (20, 40)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0), scale_clamp=math.log(8.0))
    box = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 1e4]]), reference)[0, 0]
    assert torch.isfinite(box).all()
    torch.testing.assert_close(box, torch.tensor([20.0 - 80.0, 40.0 - 160.0, 20.0 + 80.0, 40.0 + 160.0]))


def test_default_clamp_is_torchvisions():
    assert BoxCoder((1.0, 1.0, 1.0, 1.0)).scale_clamp == TVBoxCoder((1.0, 1.0, 1.0, 1.0)).bbox_xform_clip


def test_decode_keeps_the_dtype_of_the_deltas():
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    out = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.zeros(1, 4, dtype=torch.float16), reference)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out[0, 0].double(), reference[0])
