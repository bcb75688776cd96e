"""The fast paths give the answers of the plain ones: the prepared (folded, channels-last) model detects as
the plain one, and bfloat16 autocast agrees with float32. Stage-level fast paths are tested with their
stage (test_backbone, test_fpn, test_mask_head, test_postprocess, test_roi_align)."""

import pytest
import torch
from torchvision.ops import box_iou

from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model
from maskrcnn.config import Config
from maskrcnn.modeling.maskrcnn import prepare_for_inference
from maskrcnn.modeling.postprocess import to_original_image

TOP = 10  # the most confident detections, compared between precisions


@pytest.fixture(scope="module")
def models():
    """A well-conditioned R18-FPN torchvision model's weights in ours: plain and prepared for inference."""
    cfg = Config().model
    cfg.backbone.depth = 18
    cfg.input.min_size, cfg.input.max_size = [320], 512
    cfg.roi_heads.score_thresh = 0.0
    plain = our_model_from(well_conditioned_torchvision_model(cfg), cfg).eval()
    return plain, prepare_for_inference(plain)


@pytest.fixture(scope="module")
def images():
    return sample_images(200, torch.device("cpu"), count=2, seed=7)


def _detect(model, images, bf16=False):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(images)


def _box_and_mask_stages(model, images, bf16, proposals=None, detections=None):
    """The model's inference stages, optionally on given proposals and detections (so that a bf16 run can
    be compared with an fp32 one on the same inputs, ranking and NMS left out). Returns the proposals,
    per-proposal class probabilities (R, K+1) and decoded boxes (R, K, 4), the detections and their
    masks pasted at the original resolution."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        batch = model.preprocess(images, resize=True)
        features = model.fpn(model.backbone(batch.tensor))
        if proposals is None:
            proposals, _ = model.rpn(features, batch.image_sizes, tuple(batch.tensor.shape[-2:]))
        heads = model.roi_heads
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_pooler(features, proposals)))
        if detections is None:
            detections = heads.detect_boxes(features, proposals, batch.image_sizes)
        with_masks = heads.predict_masks(features, detections)
    masks = [to_original_image(d, size, tuple(image.shape[-2:]))["masks"]
             for d, size, image in zip(with_masks, batch.image_sizes, images)]
    return (proposals, logits.float().softmax(-1), heads.box_coder.decode(deltas.float(), torch.cat(proposals)),
            detections, masks)


def _mask_iou(a, b):
    """(D, H, W) bool x 2 -> (D,) IoU of corresponding masks."""
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


def test_prepared_model_detects_as_the_plain_one(models, images):
    plain, fast = models
    reference, prepared = _detect(plain, images), _detect(fast, images)
    for i, (a, b) in enumerate(zip(reference, prepared)):
        assert len(a["boxes"]) == len(b["boxes"]) == 100
        assert b["masks"].dtype == torch.bool and b["masks"].shape == a["masks"].shape
        assert a["masks"].any(), "the oracle should produce non-empty masks"
        # Float rounding may swap near-tied detections: match each of the best 50 by label and box.
        ious = box_iou(a["boxes"][:50], b["boxes"])
        ious[a["labels"][:50, None] != b["labels"][None, :]] = 0
        best, match = ious.max(dim=1)
        assert best.min() >= 0.999, f"image {i}: box IoUs {best.tolist()}"
        torch.testing.assert_close(b["scores"][match], a["scores"][:50], rtol=0, atol=1e-4)
        assert _mask_iou(a["masks"][:50], b["masks"][match]).min() >= 0.99


def test_bf16_box_head_agrees_with_fp32_on_the_same_proposals(models, images):
    plain, fast = models
    proposals, probs32, boxes32, _, _ = _box_and_mask_stages(plain, images, bf16=False)
    _, probs16, boxes16, _, _ = _box_and_mask_stages(fast, images, bf16=True, proposals=proposals)
    assert (probs16 - probs32).abs().max() <= 0.06
    best = probs32[:, 1:].argmax(1)  # each proposal's most likely object class
    rows = torch.arange(len(best))
    assert box_iou(boxes32[rows, best], boxes16[rows, best]).diagonal().min() >= 0.97


def test_bf16_masks_agree_with_fp32_on_the_same_detections(models, images):
    plain, fast = models
    proposals, _, _, detections, masks32 = _box_and_mask_stages(plain, images, bf16=False)
    *_, masks16 = _box_and_mask_stages(fast, images, bf16=True, proposals=proposals, detections=detections)
    for a, b in zip(masks32, masks16):
        assert a[:TOP].any(), "the oracle should produce non-empty masks"
        assert _mask_iou(a[:TOP], b[:TOP]).min() >= 0.9


def test_bf16_detections_agree_with_fp32(models, images):
    """End to end, bf16 rounding may reorder near-tied overlapping candidates of one class, so that NMS
    keeps one where fp32 keeps the other (they overlap by more than the NMS threshold): each of the
    fp32 top detections has a bf16 detection of its label overlapping it by at least that much."""
    plain, fast = models
    reference, bf16 = _detect(plain, images), _detect(fast, images, bf16=True)
    for i, (a, b) in enumerate(zip(reference, bf16)):
        assert b["boxes"].dtype == torch.float32 and b["scores"].dtype == torch.float32
        ious = box_iou(a["boxes"][:TOP], b["boxes"])
        ious[a["labels"][:TOP, None] != b["labels"][None, :]] = 0
        assert ious.max(dim=1).values.min() >= 0.5, f"image {i}"
        assert abs(float(a["scores"][0] - b["scores"][0])) <= 0.06
