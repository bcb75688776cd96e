"""The mask-outline studies: the upsampling comparison pastes with the package's geometry (its bilinear way is
the package's paste), and the training comparison pairs every variant with the plain head by seed."""

import pytest
import torch

from benchmarks.mask_outlines import outlines_table, summarize
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


def metrics(mask_ap: float, boundary_ap: float) -> dict:
    return {"segm": {"AP": mask_ap, "AP75": mask_ap}, "boundary": {"AP": boundary_ap, "APl": boundary_ap},
            "bbox": {"AP": 0.5}}


def test_the_outline_study_pairs_each_variant_with_plain_by_seed():
    runs = {"plain": {0: metrics(0.70, 0.50), 1: metrics(0.74, 0.54)},
            "outline4": {0: metrics(0.72, 0.56), 1: metrics(0.75, 0.58)},
            "refined": {1: metrics(0.80, 0.64)}}
    rows = {row["variant"]: row for row in summarize(runs)}
    assert rows["plain"]["mask AP"]["mean"] == pytest.approx(0.72) and "change" not in rows["plain"]["mask AP"]
    assert rows["plain"]["Boundary AP"]["half_range"] == pytest.approx(0.02)
    assert rows["outline4"]["Boundary AP"]["change"] == pytest.approx(0.05)  # +0.06 and +0.04
    assert rows["refined"]["mask AP"]["change"] == pytest.approx(0.06)  # seed 1 only: 0.80 - 0.74
    table = outlines_table(summarize(runs)).splitlines()
    assert table[3].startswith("| outline4 | 0, 1 | 73.5 ± 1.5 (+1.5) |") and len(table) == 5
