"""Detection selection (score threshold, per-class NMS, top-k, over a batch) and the map back to the original
image, against torchvision's RoIHeads.postprocess_detections and its nms class by class."""

import pycocotools.mask as mask_utils
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.ops import nms

from maskrcnn.modeling.box_coder import BoxCoder
from maskrcnn.modeling.postprocess import rescale_boxes, select_detections, to_original_image


def _near_threshold_pairs(seed: int, pairs: int = 750, classes: int = 80, iou: float = 0.5):
    """Pairs of equal boxes of one class shifted sideways so that their IoU lies within ~1e-5 of ``iou``,
    at coordinates up to 1,200 px."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(pairs, 2, generator=g) * 1000
    size = 20 + torch.rand(pairs, 2, generator=g) * 200
    first = torch.cat([corner, corner + size], 1)
    shift = size[:, 0] * (1 - iou) / (1 + iou) * (1 + (torch.rand(pairs, generator=g) - 0.5) * 6e-5)
    second = first + torch.stack([shift, torch.zeros_like(shift), shift, torch.zeros_like(shift)], 1)
    labels = torch.randint(1, classes + 1, (pairs,), generator=g).repeat(2)
    return torch.cat([first, second]), torch.rand(2 * pairs, generator=g), labels


def _as_candidates(boxes, scores, labels, classes):
    """Candidates (C, 4), (C,), (C,) labels -> select_detections' inputs for one image: one proposal per
    candidate, its class scoring ``score`` and the others 0."""
    probs = torch.zeros(len(boxes), classes + 1)
    probs[torch.arange(len(boxes)), labels] = scores
    return boxes[:, None].expand(-1, classes, 4), probs


def _class_by_class(boxes, scores, labels, iou, topk):
    """The oracle: torchvision's nms on each class alone, the ``topk`` best survivors (indices)."""
    kept = torch.cat([torch.nonzero(labels == c)[:, 0][nms(boxes[labels == c], scores[labels == c], iou)]
                      for c in labels.unique()])
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices][:topk]


@pytest.mark.parametrize("topk", [1, 5, 40, 100, 2000])
@pytest.mark.parametrize("seed", range(3))
def test_select_detections_equals_nms_class_by_class(topk, seed):
    """NMS on the best candidates first, grown fourfold until enough survive, keeps exactly what NMS over
    every candidate keeps, also for pairs whose IoU lies within 1e-5 of the threshold."""
    boxes, scores, labels = _near_threshold_pairs(seed)
    expected = _class_by_class(boxes, scores, labels, 0.5, topk)
    per_class, probs = _as_candidates(boxes, scores, labels, 80)
    out = select_detections(per_class, probs, torch.zeros(len(boxes), dtype=torch.int64), torch.tensor([[1300, 1300]]),
                            score_thresh=1e-9, nms_thresh=0.5, topk=topk)
    assert torch.equal(out["scores"], scores[expected]) and torch.equal(out["labels"], labels[expected])
    assert torch.equal(out["boxes"], boxes[expected])


def test_detections_of_an_image_do_not_depend_on_its_batch_neighbours():
    """An image's detections are the same, to the bit, alone and at every position of a batch: images are
    kept apart on the NMS operator's class axis, not by shifting their coordinates apart (whose float
    rounding decides pairs near the IoU threshold by the image's place in the batch)."""
    images = [_as_candidates(*_near_threshold_pairs(seed, pairs=300, classes=20), 20) for seed in range(3)]

    def detect(order):
        boxes = torch.cat([images[i][0] for i in order])
        probs = torch.cat([images[i][1] for i in order])
        image_index = torch.arange(len(order)).repeat_interleave(torch.tensor([len(images[i][0]) for i in order]))
        out = select_detections(boxes, probs, image_index, torch.tensor([[1300, 1300]] * len(order)),
                                score_thresh=0.05, nms_thresh=0.5, topk=100)
        return [{k: v[out["image_index"] == p] for k, v in out.items() if k != "image_index"}
                for p in range(len(order))]

    alone = [detect([i])[0] for i in range(3)]
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [1, 1]):
        for position, image in enumerate(order):
            got = detect(order)[position]
            assert all(torch.equal(got[k], alone[image][k]) for k in got), (order, position)


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
                             logits.softmax(-1), torch.zeros(500, dtype=torch.int64), torch.tensor([image_size]),
                             score_thresh=0.05, nms_thresh=0.5, topk=100)
    assert len(ours["boxes"]) == 100 and (ours["image_index"] == 0).all()
    assert torch.equal(ours["labels"], tv_labels[0])
    torch.testing.assert_close(ours["scores"], tv_scores[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["boxes"], tv_boxes[0], rtol=0, atol=1e-4)


def test_select_detections_keeps_a_score_equal_to_the_threshold():
    """The threshold keeps what scores at least it, as Instances.filter does."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])[:, None].expand(1, 2, 4)
    out = select_detections(boxes, torch.tensor([[0.5, 0.25, 0.25]]), torch.zeros(1, dtype=torch.int64),
                            torch.tensor([[20, 20]]), score_thresh=0.25, nms_thresh=0.5, topk=100)
    assert out["scores"].tolist() == [0.25, 0.25] and out["labels"].tolist() == [1, 2]


def test_select_detections_of_nothing_above_the_threshold_is_empty():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([[0.99, 0.005, 0.005]])
    out = select_detections(proposals[:, None].expand(1, 2, 4), scores, torch.zeros(1, dtype=torch.int64),
                            torch.tensor([[20, 20]]), score_thresh=0.05, nms_thresh=0.5, topk=100)
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


def test_equal_scores_rank_as_torchvision_ranks_each_image_alone():
    """Saturated scores tie exactly (sigmoid 1.0 in float32); which of them survive a top-k cut must be the
    ones torchvision keeps (it sorts each image's survivors with ``torch.sort``), whatever else the batch holds."""
    from maskrcnn.modeling.selection import descending_order
    scores = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.7, 1.0] * 300)
    group = torch.zeros(len(scores), dtype=torch.int64)
    alone = descending_order(scores, group)
    assert torch.equal(alone, torch.sort(scores, descending=True).indices)
    batch = descending_order(torch.cat([scores.flip(0), scores]), torch.cat([group, group + 1]))
    assert torch.equal(batch[len(scores):] - len(scores), alone)
