import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from maskrcnn.rle import encode_mask_regions, encode_masks
from maskrcnn.modeling.paste import paste_mask_regions, paste_masks_in_image


def _reference(full: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def _full_mask(x0, y0, region, size):
    full = np.zeros(size, dtype=bool)
    full[y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
    return full


def _random_regions(rng, size, count):
    """Regions of random extent and fill density, many touching the image borders."""
    height, width = size
    for _ in range(count):
        x0 = int(rng.choice([0, rng.integers(0, width)]))
        y0 = int(rng.choice([0, rng.integers(0, height)]))
        w = int(rng.choice([width - x0, rng.integers(0, width - x0 + 1)]))
        h = int(rng.choice([height - y0, rng.integers(0, height - y0 + 1)]))
        density = rng.choice([0.0, 0.2, 0.8, 1.0])
        yield x0, y0, rng.random((h, w)) < density


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (9, 1), (13, 17), (32, 24)])
def test_region_encoding_equals_pycocotools_encoding_of_full_mask(size):
    rng = np.random.default_rng(sum(size))
    regions = list(_random_regions(rng, size, 300))
    encoded = encode_mask_regions(regions, size)
    for (x0, y0, region), rle in zip(regions, encoded):
        assert rle == _reference(_full_mask(x0, y0, region, size)), (x0, y0, region.shape)


def test_region_encoding_of_full_and_empty_masks():
    size = (6, 5)
    regions = [(0, 0, np.ones(size, bool)), (0, 0, np.zeros(size, bool)), (2, 3, np.zeros((0, 0), bool)),
               (4, 5, np.ones((1, 1), bool)), (0, 0, np.ones((1, 1), bool))]
    for (x0, y0, region), rle in zip(regions, encode_mask_regions(regions, size)):
        full = _full_mask(x0, y0, region, size)
        assert rle == _reference(full)
        assert np.array_equal(mask_utils.decode(rle).astype(bool), full)


def test_region_encoding_accepts_tensors():
    region = torch.tensor([[True, False], [True, True]])
    (rle,) = encode_mask_regions([(1, 2, region)], (5, 4))
    assert rle == _reference(_full_mask(1, 2, region.numpy(), (5, 4)))


def test_region_outside_image_is_rejected():
    with pytest.raises(ValueError, match="outside the 4x4 image"):
        encode_mask_regions([(3, 0, np.ones((2, 2), bool))], (4, 4))


def test_encode_masks_equals_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 11, 7)) < 0.4
    assert encode_masks(torch.from_numpy(masks)) == [_reference(m) for m in masks]
    assert encode_masks(np.zeros((0, 11, 7), bool)) == []


def test_pasted_regions_encode_like_pasted_bitmaps():
    torch.manual_seed(0)
    size = (50, 70)
    probs = torch.rand(12, 28, 28)
    xy = torch.rand(12, 2) * torch.tensor([90.0, 70.0]) - 10  # some boxes cross or leave the image
    boxes = torch.cat([xy, xy + torch.rand(12, 2) * 40 + 0.5], dim=1)
    bitmaps = paste_masks_in_image(probs, boxes, size)
    assert encode_mask_regions(paste_mask_regions(probs, boxes, size), size) == encode_masks(bitmaps)
