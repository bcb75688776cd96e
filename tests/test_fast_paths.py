"""The fast paths give the answers of the plain ones: folded normalisation, channels-last inference,
bfloat16 autocast, class-selected mask logits, the in-place pyramid sum and top-k-first class NMS."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, box_iou

from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model
from maskrcnn.config import Config
from maskrcnn.modeling.backbone import ResNet, fold_batchnorm
from maskrcnn.modeling.fpn import add_upsampled
from maskrcnn.modeling.mask_head import MaskHead
from maskrcnn.modeling.maskrcnn import prepare_for_inference
from maskrcnn.modeling.postprocess import to_original_image

TOP = 10  # the most confident detections, compared between precisions


def _random_statistics(trunk: nn.Module, seed: int) -> None:
    """Give every normalisation non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                c = m.running_mean.shape[0]
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.mark.parametrize("depth", [18, 50])
def test_trunk_equals_torchvision_resnet(depth):
    """conv_norm applies FrozenBatchNorm2d with its own arithmetic: float32 results are identical."""
    torch.manual_seed(0)
    ours = ResNet(depth=depth, norm="frozen_bn", freeze_at=0)
    _random_statistics(ours, seed=1)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    missing, unexpected = tv.load_state_dict(ours.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    body = torchvision.models._utils.IntermediateLayerGetter(tv, {f"layer{k}": str(k) for k in range(1, 5)})
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(ours(x), body(x).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_trunk_gradients_equal_torchvision_resnet(norm):
    """Training through the in-place normalisation (and BatchNorm with batch statistics) gives torchvision's
    gradients."""
    torch.manual_seed(0)
    ours = ResNet(depth=18, norm=norm, freeze_at=0)
    _random_statistics(ours, seed=6)
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    tv = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    tv.load_state_dict(ours.state_dict(), strict=False)
    body = torchvision.models._utils.IntermediateLayerGetter(tv, {f"layer{k}": str(k) for k in range(1, 5)})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    sum(f.square().mean() for f in ours(x)).backward()
    sum(f.square().mean() for f in body(x).values()).backward()
    grads = dict(tv.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_folded_trunk_matches_unfolded(norm):
    torch.manual_seed(0)
    trunk = ResNet(depth=18, norm=norm, freeze_at=0).eval()
    _random_statistics(trunk, seed=3)
    folded = fold_batchnorm(trunk)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for a, b in zip(folded(x), trunk(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert any(k.endswith("bn1.running_mean") for k in trunk.state_dict()), "the original keeps its norms"


def test_folding_needs_fixed_statistics():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(ResNet(depth=18, norm="bn", freeze_at=0).train())


def test_class_logits_are_the_forward_channel_of_each_class():
    torch.manual_seed(0)
    head = MaskHead(in_channels=8, conv_dim=16, num_convs=2, num_classes=5)
    nn.init.normal_(head.predictor.weight, std=0.5)
    nn.init.normal_(head.predictor.bias, std=0.5)
    x = torch.randn(6, 8, 14, 14)
    classes = torch.tensor([1, 5, 3, 3, 2, 4])
    with torch.no_grad():
        expected = head(x)[torch.arange(6), classes - 1]
        torch.testing.assert_close(head.class_logits(x, classes), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_add_upsampled_is_lateral_plus_nearest_upsampling(channels_last):
    g = torch.Generator().manual_seed(5)
    lateral = torch.randn(2, 3, 8, 12, dtype=torch.float64, generator=g)
    top_down = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    if channels_last:
        lateral = lateral.contiguous(memory_format=torch.channels_last)
    lateral.requires_grad_()
    expected = lateral + F.interpolate(top_down, size=(8, 12), mode="nearest")
    # The in-place sum needs a non-leaf lateral, as the lateral convolution's output is.
    assert torch.equal(add_upsampled(lateral * 1, top_down), expected)
    assert torch.autograd.gradcheck(lambda a, b: add_upsampled(a * 1, b), (lateral, top_down))


def test_add_upsampled_handles_odd_sizes():
    lateral, top_down = torch.randn(1, 2, 7, 9), torch.randn(1, 2, 4, 5)
    expected = lateral + F.interpolate(top_down, size=(7, 9), mode="nearest")
    assert torch.equal(add_upsampled(lateral.clone(), top_down), expected)


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
