import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads as tv_roi_heads

from maskrcnn.modeling.paste import paste_mask_regions, paste_masks_in_image, resized_mask_regions
from maskrcnn.structures import BitMasks


def _torchvision_paste(mask_probs, boxes, image_size, threshold=0.5):
    """torchvision's paste, mask by mask; its slicing fails for boxes that miss the image, which are empty."""
    height, width = image_size
    padded, scale = tv_roi_heads.expand_masks(mask_probs[:, None], padding=1)
    int_boxes = tv_roi_heads.expand_boxes(boxes, scale).to(torch.int64)
    out = torch.zeros((len(mask_probs), height, width), dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(int_boxes.tolist()):
        if min(x2 + 1, width) > max(x1, 0) and min(y2 + 1, height) > max(y1, 0):
            out[i] = tv_roi_heads.paste_mask_in_image(padded[i, 0], int_boxes[i], height, width) > threshold
    return out


def _smooth_probs(n, side=28, seed=0):
    """(n, side, side) probabilities with blob-like structure, like a mask head's output."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((n, 1, side, side), generator=generator)
    return F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)[:, 0].clamp(0, 1) * 1.6 - 0.3


def _random_boxes(n, image_size, seed=0):
    """Boxes from sub-pixel to larger than the image, many crossing the image border; x2, y2 >= 0."""
    height, width = image_size
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand((n, 2), generator=generator) * torch.tensor([1.3 * width, 1.3 * height])
    centers -= torch.tensor([0.15 * width, 0.15 * height])
    sizes = torch.exp(torch.rand((n, 2), generator=generator) * 7.0 - 1.5)  # 0.2 to 250 pixels
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)
    boxes[:, 2:] = boxes[:, 2:].clamp_min(0.0)
    return boxes


def _assert_agrees(masks, expected):
    """The same pixels, mask by mask: the paste is exact, so a single differing pixel is a defect."""
    assert masks.shape == expected.shape
    differing = (masks != expected).flatten(1).sum(1)
    bad = torch.nonzero(differing)[:, 0].tolist()
    assert not bad, (f"{len(bad)} masks differ from torchvision's paste, e.g. mask {bad[0]}: {int(differing[bad[0]])} "
                     f"of its {int(expected[bad[0]].sum())} pixels")


@pytest.mark.parametrize("image_size", [(97, 143), (160, 60)])
def test_matches_torchvision_paste_on_random_boxes(image_size):
    probs, boxes = _smooth_probs(80), _random_boxes(80, image_size)
    masks = paste_masks_in_image(probs, boxes, image_size)
    assert masks.dtype == torch.bool and masks.shape == (80, *image_size)
    _assert_agrees(masks, _torchvision_paste(probs, boxes, image_size))


def test_matches_torchvision_paste_at_another_threshold_and_mask_size():
    probs, boxes = _smooth_probs(40, side=14, seed=1), _random_boxes(40, (70, 90), seed=1)
    masks = paste_masks_in_image(probs, boxes, (70, 90), threshold=0.3)
    _assert_agrees(masks, _torchvision_paste(probs, boxes, (70, 90), threshold=0.3))


def test_bfloat16_probabilities_paste_like_their_float32_values():
    probs, boxes = _smooth_probs(30, seed=2).bfloat16(), _random_boxes(30, (64, 80), seed=2)
    masks = paste_masks_in_image(probs, boxes, (64, 80))
    _assert_agrees(masks, _torchvision_paste(probs.float(), boxes, (64, 80)))


def test_a_bf16_autocast_forward_pastes_in_float32():
    """The model pastes inside its bf16 autocast forward (precision "auto" on a CPU with native bf16): the
    masks and regions are still torchvision's float32 paste, not one sampled in bfloat16."""
    probs, boxes = _smooth_probs(60, seed=4), _random_boxes(60, (120, 150), seed=4)
    expected = _torchvision_paste(probs, boxes, (120, 150))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masks = paste_masks_in_image(probs, boxes, (120, 150))
        regions = list(paste_mask_regions(probs, boxes, (120, 150)))
    _assert_agrees(masks, expected)
    from_regions = torch.zeros_like(expected)
    for i, (x0, y0, region) in enumerate(regions):
        from_regions[i, y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
    _assert_agrees(from_regions, expected)


def test_small_memory_budget_gives_the_same_masks():
    probs, boxes = _smooth_probs(50, seed=3), _random_boxes(50, (90, 120), seed=3)
    one_chunk = paste_masks_in_image(probs, boxes, (90, 120), memory_mb=256)
    many_chunks = paste_masks_in_image(probs, boxes, (90, 120), memory_mb=0.001)
    assert torch.equal(one_chunk, many_chunks)


def test_no_detections_give_an_empty_bool_tensor():
    masks = paste_masks_in_image(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), (30, 40))
    assert masks.dtype == torch.bool and masks.shape == (0, 30, 40)
    assert list(paste_mask_regions(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), (30, 40))) == []


def test_boxes_outside_the_image_paste_nothing():
    boxes = torch.tensor(
        [[-60.0, 5, -20, 25], [5, -60, 25, -20], [130, 5, 170, 25], [5, 130, 25, 170], [-50, -50, -30, -30]]
    )
    probs = torch.ones((5, 28, 28))
    assert not paste_masks_in_image(probs, boxes, (100, 120)).any()
    for x0, y0, region in paste_mask_regions(probs, boxes, (100, 120)):
        assert region.numel() == 0 and 0 <= x0 <= 120 and 0 <= y0 <= 100


def test_regions_reproduce_the_full_paste():
    image_size = (97, 143)
    probs, boxes = _smooth_probs(60, seed=4), _random_boxes(60, image_size, seed=4)
    full = paste_masks_in_image(probs, boxes, image_size)
    rebuilt = torch.zeros_like(full)
    regions = list(paste_mask_regions(probs, boxes, image_size))
    assert len(regions) == len(probs)
    for i, (x0, y0, region) in enumerate(regions):
        assert region.dtype == torch.bool
        assert x0 + region.shape[1] <= image_size[1] and y0 + region.shape[0] <= image_size[0]
        rebuilt[i, y0 : y0 + region.shape[0], x0 : x0 + region.shape[1]] = region
    assert torch.equal(rebuilt, full)


def test_resized_regions_are_torchvisions_pasted_probabilities():
    """The probabilities before the threshold (what the learner's figure shows) are torchvision's canvas."""
    image_size = (97, 143)
    probs, boxes = _smooth_probs(40, seed=6), _random_boxes(40, image_size, seed=6)
    padded, scale = tv_roi_heads.expand_masks(probs[:, None], padding=1)
    int_boxes = tv_roi_heads.expand_boxes(boxes, scale).to(torch.int64)
    regions = list(resized_mask_regions(probs, boxes, image_size))
    assert len(regions) == len(probs)
    for i, (x0, y0, region) in enumerate(regions):
        canvas = torch.zeros(image_size)
        canvas[y0 : y0 + region.shape[0], x0 : x0 + region.shape[1]] = region
        x1, y1, x2, y2 = int_boxes[i].tolist()
        if min(x2 + 1, image_size[1]) > max(x1, 0) and min(y2 + 1, image_size[0]) > max(y1, 0):
            expected = tv_roi_heads.paste_mask_in_image(padded[i, 0], int_boxes[i], *image_size)
        else:  # torchvision's slicing fails for a box that misses the image: nothing is pasted
            expected = torch.zeros(image_size)
        assert torch.allclose(canvas, expected, rtol=0, atol=1e-6), i


def test_a_probability_equal_to_the_threshold_is_background():
    """The comparison is strict (``p > threshold``): the zero border a mask is padded with stays background
    at threshold 0, where ``>=`` would fill the whole pasted extent."""
    probs, boxes = torch.zeros((1, 28, 28)), torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    assert not paste_masks_in_image(probs, boxes, (60, 70), threshold=0.0).any()
    assert not any(region.any() for _, _, region in paste_mask_regions(probs, boxes, (60, 70), threshold=0.0))
    assert paste_masks_in_image(probs + 0.25, boxes, (60, 70), threshold=0.0)[0, 15:35, 15:45].all()


def test_crop_to_28x28_then_paste_recovers_the_mask():
    yy, xx = torch.meshgrid(torch.arange(120.0), torch.arange(160.0), indexing="ij")
    ellipse = ((xx - 70) / 45) ** 2 + ((yy - 60) / 30) ** 2 <= 1
    box = torch.tensor([[25.0, 30.0, 116.0, 91.0]])  # the ellipse's pixel extent, xyxy
    crop = BitMasks(ellipse[None]).crop_and_resize(box, 28)
    pasted = paste_masks_in_image(crop, box, (120, 160))[0]
    iou = (pasted & ellipse).sum() / (pasted | ellipse).sum()
    # The 0/1 target quantises the outline to the 28 x 28 grid (a cell is 3.3 x 2.2 pixels here), so the
    # round trip loses up to about half a cell along the outline: IoU 0.94 for this ellipse. A shifted or
    # transposed paste, or a target cropped from the wrong box, falls far below.
    assert iou.item() > 0.93


def test_rejects_boxes_that_do_not_match_the_masks():
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(torch.zeros((3, 28, 28)), torch.zeros((2, 4)), (10, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paste_matches_torchvision():
    image_size = (97, 143)
    probs, boxes = _smooth_probs(80, seed=5), _random_boxes(80, image_size, seed=5)
    masks = paste_masks_in_image(probs.cuda(), boxes.cuda(), image_size)
    assert masks.is_cuda and masks.dtype == torch.bool
    _assert_agrees(masks.cpu(), _torchvision_paste(probs, boxes, image_size))
