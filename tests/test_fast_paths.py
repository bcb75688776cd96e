"""The fast paths give the answers of the plain ones: the prepared (folded, channels-last) model detects as
the plain one (every batch norm folded: trunk, FPN and heads), and bfloat16 autocast agrees with float32. Stage-level fast paths are tested with their
stage (test_backbone, test_fpn, test_mask_head, test_postprocess, test_roi_align)."""

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from test_backbone import _random_statistics
from tiny import tiny_config
from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model
from maskrcnn.config import Config
from maskrcnn.modeling.maskrcnn import build_model, prepare_for_inference
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


def _normalised_tiny_model(norm: str) -> nn.Module:
    """A tiny model whose trunk, FPN, box head and mask head all carry normalisations (batch norm in the
    trunk; ``norm`` elsewhere), with a two-convolution RPN head, in eval mode with non-trivial statistics."""
    cfg = tiny_config().model
    cfg.backbone.norm, cfg.backbone.freeze_at, cfg.backbone.fpn_norm = "bn", 0, norm
    cfg.rpn.head_convs = 2
    h = cfg.roi_heads
    h.box_head_convs, h.box_head_conv_dim, h.box_head_norm, h.box_head_fcs = 2, 16, norm, 1
    h.mask_head_convs, h.mask_head_norm = 2, norm
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _random_statistics(model, seed=8)
    return model


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_prepared_model_folds_every_batchnorm_and_computes_the_same(norm):
    """prepare_for_inference folds the batch norms of the trunk, the FPN and both heads (GroupNorm, which
    normalises each input by its own statistics, stays), and every stage's output is unchanged: pyramid
    levels, RPN logits and deltas, box head features on the same RoIs and mask logits."""
    plain = _normalised_tiny_model(norm)
    fast = prepare_for_inference(plain)
    head_norms = 8 + 2 + 2  # FPN lateral and output, box head, mask head
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in fast.modules()) == (0 if norm == "bn" else head_norms)
    trunk_norms = 20  # ResNet-18: stem, two per block, three downsamples
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == \
        trunk_norms + (head_norms if norm == "bn" else 0), "the original keeps its norms"
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 64, 96, generator=g)
    rois = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]), torch.tensor([[0.0, 0.0, 96.0, 64.0]])]
    with torch.no_grad():
        outputs = []
        for model in (plain, fast):
            features = model.fpn(model.backbone(x.contiguous(memory_format=torch.channels_last)))
            logits, deltas = model.rpn.head(features)
            heads = model.roi_heads
            box = heads.box_head(heads.box_pooler(features, rois))
            mask = heads.mask_head(heads.mask_pooler(features, rois))
            outputs.append([*features, *logits, *deltas, box, mask])
    for i, (a, b) in enumerate(zip(*outputs)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item(), msg=f"output {i}")
