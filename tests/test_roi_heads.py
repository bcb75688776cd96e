"""RoI head stages: proposal sampling against the ground truth, and box detection."""

import torch
from torchvision.ops import box_iou

from tiny import tiny_config
from maskrcnn.modeling.maskrcnn import build_model


def _heads():
    torch.manual_seed(0)
    return build_model(tiny_config().model).roi_heads


def _target():
    return {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [60.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([2, 3])}


def test_sample_proposals_adds_the_ground_truth_and_labels_by_iou():
    heads = _heads()
    g = torch.Generator().manual_seed(1)
    corner = torch.rand(300, 2, generator=g) * 80
    proposals = torch.cat([corner, corner + 5 + torch.rand(300, 2, generator=g) * 40], 1)
    target = _target()
    boxes, classes, matched, deltas = (x[0] for x in heads.sample_proposals([proposals], [target]))
    assert len(boxes) <= heads.batch_size_per_image
    positive = classes > 0
    assert positive.sum() <= heads.batch_size_per_image * heads.positive_fraction
    iou = box_iou(boxes, target["boxes"])
    assert (iou[positive].max(1).values >= 0.5).all() and (iou[~positive].max(1).values < 0.5).all()
    assert torch.equal(classes[positive], target["labels"][matched[positive]])
    expected = heads.box_coder.encode(target["boxes"][matched[positive]], boxes[positive])
    torch.testing.assert_close(deltas[positive], expected)


def test_ground_truth_boxes_are_proposals_of_their_own_class():
    heads = _heads()
    far = torch.tensor([[100.0, 80.0, 120.0, 95.0], [0.0, 80.0, 8.0, 95.0]])  # overlapping no instance
    target = _target()
    boxes, classes, matched, deltas = (x[0] for x in heads.sample_proposals([far], [target]))
    positive = classes > 0
    assert positive.sum() == 2 and torch.equal(boxes[positive], target["boxes"][matched[positive]])
    assert torch.equal(classes[positive], target["labels"][matched[positive]])
    torch.testing.assert_close(deltas[positive], torch.zeros(2, 4), rtol=0, atol=1e-6)


def test_image_without_ground_truth_samples_background_only():
    heads = _heads()
    proposals = torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 40.0, 50.0]])
    boxes, classes, _, deltas = (x[0] for x in heads.sample_proposals(
        [proposals], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]))
    assert len(boxes) == 2 and (classes == 0).all() and (deltas == 0).all()


def test_detect_boxes_keeps_at_most_the_configured_detections_sorted_by_score():
    heads = _heads().eval()
    heads.score_thresh = 0.0
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 32, 96 // s, 128 // s, generator=g) for s in (4, 8, 16, 32, 64)]
    corner = torch.rand(200, 2, generator=g) * 80
    proposals = [torch.cat([corner, corner + 8 + torch.rand(200, 2, generator=g) * 30], 1)]
    with torch.no_grad():
        out = heads.detect_boxes(features, proposals, [(96, 128)])[0]
    assert len(out["boxes"]) == heads.detections_per_img
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
    assert (out["boxes"][:, 2] <= 128).all() and (out["boxes"][:, 3] <= 96).all()
