"""Detection selection (score threshold, per-class NMS, top-k) and the map back to the original image,
against torchvision's RoIHeads.postprocess_detections and batched_nms."""

import pycocotools.mask as mask_utils
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.ops import batched_nms

from maskrcnn.modeling.box_coder import BoxCoder
from maskrcnn.modeling.postprocess import rescale_boxes, select_detections, to_original_image, top_class_nms


@pytest.mark.parametrize("topk", [1, 5, 40, 500])
def test_top_class_nms_equals_batched_nms(topk):
    g = torch.Generator().manual_seed(topk)
    # Clustered boxes over few classes: most candidates are suppressed, so the search must grow.
    centres = torch.rand(30, 2, generator=g) * 200
    boxes = centres.repeat(40, 1) + torch.randn(1200, 2, generator=g) * 4
    sizes = 20 + torch.rand(1200, 2, generator=g) * 10
    boxes = torch.cat([boxes - sizes / 2, boxes + sizes / 2], dim=1)
    scores = torch.rand(1200, generator=g)
    labels = torch.randint(1, 4, (1200,), generator=g)
    expected = batched_nms(boxes, scores, labels, 0.5)[:topk]
    assert torch.equal(top_class_nms(boxes, scores, labels, 0.5, topk), expected)


def _near_threshold_pairs(seed: int, pairs: int = 750, classes: int = 80, iou: float = 0.5):
    """Pairs of equal boxes of one class shifted sideways so that their IoU lies within ~1e-5 of ``iou``,
    at coordinates up to 1,200 px: enough candidates for batched_nms's class-by-class route."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(pairs, 2, generator=g) * 1000
    size = 20 + torch.rand(pairs, 2, generator=g) * 200
    first = torch.cat([corner, corner + size], 1)
    shift = size[:, 0] * (1 - iou) / (1 + iou) * (1 + (torch.rand(pairs, generator=g) - 0.5) * 6e-5)
    second = first + torch.stack([shift, torch.zeros_like(shift), shift, torch.zeros_like(shift)], 1)
    labels = torch.randint(1, classes + 1, (pairs,), generator=g).repeat(2)
    return torch.cat([first, second]), torch.rand(2 * pairs, generator=g), labels


@pytest.mark.parametrize("seed", range(8))
def test_top_class_nms_equals_batched_nms_for_pairs_at_the_threshold(seed):
    """batched_nms runs a 1,500-candidate set class by class; NMS over a subset of a few hundred must take
    the same route, or float32 rounding of class-shifted coordinates flips pairs at the threshold."""
    boxes, scores, labels = _near_threshold_pairs(seed)
    expected = batched_nms(boxes, scores, labels, 0.5)[:100]
    assert torch.equal(top_class_nms(boxes, scores, labels, 0.5, 100), expected)


def test_top_class_nms_on_a_small_set_is_batched_nms_itself():
    boxes, scores, labels = _near_threshold_pairs(0, pairs=200)
    assert torch.equal(top_class_nms(boxes, scores, labels, 0.5, 30), batched_nms(boxes, scores, labels, 0.5)[:30])


def test_select_detections_equals_torchvision_postprocess():
    g = torch.Generator().manual_seed(0)
    num_classes, image_size = 6, (300, 400)
    corner = torch.rand(500, 2, generator=g) * torch.tensor([350.0, 250.0])
    proposals = torch.cat([corner, corner + 10 + torch.rand(500, 2, generator=g) * 80], 1)
    logits = torch.randn(500, num_classes + 1, generator=g) * 3
    deltas = torch.randn(500, 4 * (num_classes + 1), generator=g) * 0.3
    tv = TVRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100)
    tv_boxes, tv_scores, tv_labels = tv.postprocess_detections(logits, deltas, [proposals], [image_size])
    ours = select_detections(BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas[:, 4:], proposals),
                             logits.softmax(-1), image_size, score_thresh=0.05, nms_thresh=0.5, topk=100)
    assert len(ours["boxes"]) == 100
    assert torch.equal(ours["labels"], tv_labels[0])
    torch.testing.assert_close(ours["scores"], tv_scores[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["boxes"], tv_boxes[0], rtol=0, atol=1e-4)


def test_select_detections_of_nothing_above_the_threshold_is_empty():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([[0.99, 0.005, 0.005]])
    out = select_detections(proposals[:, None].expand(1, 2, 4), scores, (20, 20), score_thresh=0.05, nms_thresh=0.5,
                            topk=100)
    assert out["boxes"].shape == (0, 4) and out["labels"].dtype == torch.int64 and len(out["scores"]) == 0


def test_rescale_boxes_maps_resized_pixels_to_the_original_image():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert torch.equal(rescale_boxes(boxes, (100, 200), (50, 400)), torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


@pytest.mark.parametrize("mask_format", ["bitmap", "rle", "probs", "none"])
def test_to_original_image_mask_formats_agree(mask_format):
    g = torch.Generator().manual_seed(1)
    result = {"boxes": torch.tensor([[2.0, 3.0, 30.0, 20.0], [10.0, 10.0, 12.5, 11.0]]),
              "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]),
              "mask_probs": torch.rand(2, 28, 28, generator=g)}
    bitmap = to_original_image(result, (32, 48), (64, 96))["masks"]
    out = to_original_image(result, (32, 48), (64, 96), mask_format=mask_format)
    assert torch.equal(out["boxes"], result["boxes"] * 2)
    if mask_format == "rle":
        decoded = torch.from_numpy(mask_utils.decode(out["masks"])).permute(2, 0, 1).bool()
        assert torch.equal(decoded, bitmap)
    elif mask_format == "probs":
        assert torch.equal(out["mask_probs"], result["mask_probs"]) and "masks" not in out
    elif mask_format == "none":
        assert "masks" not in out and "mask_probs" not in out
    else:
        assert bitmap.shape == (2, 64, 96) and bitmap[0].any()


def test_unknown_mask_format_is_refused():
    with pytest.raises(ValueError, match="mask_format must be one of"):
        to_original_image({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0),
                           "mask_probs": torch.zeros(0, 28, 28)}, (1, 1), (1, 1), mask_format="png")
