"""The mask-upsampling comparison pastes with the package's geometry: its bilinear way is the package's paste."""

import torch

from benchmarks.mask_upsampling import WAYS, paste
from maskrcnn.modeling.paste import paste_masks_in_image


def random_detections(count: int, size=(90, 120)):
    torch.manual_seed(0)
    probs = torch.rand(count, 28, 28) ** 2
    corner = torch.rand(count, 2) * torch.tensor([140.0, 110.0]) - 20  # some boxes reach past the image
    boxes = torch.cat([corner, corner + 4 + torch.rand(count, 2) * 70], dim=1)
    return probs, boxes, size


def test_the_bilinear_way_is_the_packages_paste():
    probs, boxes, size = random_detections(40)
    ours = paste(probs, boxes, size, WAYS["probabilities, bilinear"])
    assert torch.equal(ours, paste_masks_in_image(probs, boxes, size))


def test_a_higher_threshold_keeps_a_subset_and_every_way_pastes_inside_the_grown_box():
    probs, boxes, size = random_detections(20)
    low, mid, high = (paste(probs, boxes, size, WAYS[name]) for name in (
        "probabilities, bilinear, above 0.4", "probabilities, bilinear", "probabilities, bilinear, above 0.6"))
    assert (high <= mid).all() and (mid <= low).all() and (high != low).any()
    extent = paste(torch.ones_like(probs), boxes, size, WAYS["probabilities, bilinear, above 0.4"])
    for name in ("probabilities, bicubic", "logits, bilinear"):
        masks = paste(probs, boxes, size, WAYS[name])
        assert masks.any() and not (masks & ~extent).any(), name
