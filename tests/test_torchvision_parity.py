"""Our Mask R-CNN against torchvision's, given the same weights: same detections, stage by stage, for both
of torchvision's architectures: ``maskrcnn_resnet50_fpn`` (v1, the default configuration) and
``maskrcnn_resnet50_fpn_v2`` (``configs/maskrcnn_R50_FPN_v2.yaml``: batch norm in the FPN and heads, a
two-convolution RPN head, a convolutional box head).

torchvision's model is built with seeded random weights (no download) whose scale is set so that the
network is well conditioned (``maskrcnn.reference.well_conditioned_torchvision_model``): batch-norm
statistics are calibrated on random images, pyramid outputs are scaled to unit spread and the prediction
layers get a spread of scores, so that ranking and NMS are decided by margins far above float round-off
rather than by ties. For v2 the FPN's and heads' batch norms are calibrated too (on the RoIs of the
model's own proposals), and the model is run as torchvision builds it: batch norm, not frozen, in the trunk.
"""

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from maskrcnn.reference import torchvision_model, well_conditioned_torchvision_model
from maskrcnn.config import Config, load_config
from maskrcnn.convert import config_for_torchvision_state, convert_torchvision_state_dict
from maskrcnn.modeling.maskrcnn import build_model

MIN_SIZE, MAX_SIZE = 320, 512
V2_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "maskrcnn_R50_FPN_v2.yaml"


def architecture_config(arch: str) -> Config:
    """The default (v1) configuration, or the v2 file's model with torchvision's 90 COCO label slots and no
    ImageNet download."""
    if arch == "v1":
        return Config()
    cfg = load_config(V2_CONFIG, ["model.backbone.pretrained=false", "model.roi_heads.num_classes=90"])
    cfg.model.input.min_size = [800]
    return cfg


def test_v2_reference_is_torchvisions_v2_architecture():
    """The oracle built at the v2 configuration has the modules, parameter names and shapes of
    torchvision's own ``maskrcnn_resnet50_fpn_v2`` builder, and the v2 configuration is what the converter
    reads from that builder's state dict."""
    cfg = architecture_config("v2").model
    ours = torchvision_model(cfg, norm_layer=nn.BatchNorm2d)
    builder = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in builder.state_dict().items()}
    for name in ("backbone", "rpn", "roi_heads"):
        assert repr(getattr(ours, name)) == repr(getattr(builder, name)), name
    assert repr(ours.transform) == repr(builder.transform)
    read = config_for_torchvision_state(builder.state_dict()).model
    for section in ("rpn", "roi_heads"):
        assert getattr(read, section) == getattr(cfg, section), section
    assert (read.backbone.norm, read.backbone.fpn_norm) == (cfg.backbone.norm, cfg.backbone.fpn_norm) == ("bn", "bn")


@pytest.fixture(scope="module", params=["v1", "v2"])
def models(request):
    cfg = architecture_config(request.param)
    cfg.model.input.min_size = [MIN_SIZE]
    cfg.model.input.max_size = MAX_SIZE
    cfg.model.roi_heads.score_thresh = 0.0
    tv = well_conditioned_torchvision_model(cfg.model)
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict()))
    return tv, ours


# Non-square, very small and very elongated images, run as one batch of mixed sizes; at these sizes
# torchvision's resize, which rounds the scaled sides down, and ours, which rounds them to the nearest pixel
# as the training resize does, agree.
IMAGE_SIZES = [(200, 300), (30, 50), (40, 400), (300, 125)]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(2)
    return [torch.rand(3, h, w, generator=g) for h, w in IMAGE_SIZES]


@pytest.fixture(scope="module")
def outputs(models, images):
    tv, ours = models
    with torch.no_grad():
        return tv(images), ours(images)


def test_backbone_features_match(models, images):
    tv, ours = models
    with torch.no_grad():
        tv_input, _ = tv.transform(images)
        batch = ours.preprocess(images, resize=True)
        assert [tuple(s) for s in tv_input.image_sizes] == batch.image_sizes
        torch.testing.assert_close(batch.tensor, tv_input.tensors, rtol=0, atol=1e-6)
        tv_features = list(tv.backbone(tv_input.tensors).values())
        our_features = ours.fpn(ours.backbone(batch.tensor))
    assert len(tv_features) == len(our_features) == 5
    for level, (a, b) in enumerate(zip(tv_features, our_features)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"pyramid level P{level + 2} differs")


def test_proposals_match(models, images):
    tv, ours = models
    with torch.no_grad():
        tv_input, _ = tv.transform(images)
        tv_proposals, _ = tv.rpn(tv_input, tv.backbone(tv_input.tensors))
        batch = ours.preprocess(images, resize=True)
        features = ours.fpn(ours.backbone(batch.tensor))
        our_proposals, _ = ours.rpn(features, batch.image_sizes, tuple(batch.tensor.shape[-2:]))
    for i, (a, b) in enumerate(zip(tv_proposals, our_proposals)):
        assert a.shape == b.shape, f"image {i}: {len(b)} proposals, torchvision has {len(a)}"
        # Many objectness probabilities round to 1.0 in float32, and neither implementation fixes the order
        # of equal scores (torchvision's sort is not stable): the same proposals, compared in one order.
        torch.testing.assert_close(_by_coordinates(b), _by_coordinates(a), rtol=0, atol=1e-4,
                                   msg=f"image {i}: proposals differ")


def _by_coordinates(boxes):
    """(R, 4) boxes sorted by x1, then y1, x2, y2."""
    for column in (3, 2, 1, 0):
        boxes = boxes[torch.sort(boxes[:, column], stable=True).indices]
    return boxes


def test_detections_match(outputs):
    tv_out, our_out = outputs
    for i, (a, b) in enumerate(zip(tv_out, our_out)):
        assert len(a["boxes"]) == len(b["boxes"]) == 100, f"image {i}"
        assert torch.equal(a["labels"], b["labels"]), f"image {i}: labels differ"
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4, msg=f"image {i}: boxes differ")
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4, msg=f"image {i}: scores differ")


def assert_masks_match(ours, theirs, where: str, tolerance: float = 1e-3):
    """Per mask, the pixels that differ are at most ``tolerance`` of the mask's own pixels (the union of both
    masks), rounded down: mask probabilities agree to float rounding, so a pixel whose probability sits on
    the threshold may flip in a large mask, while a small mask must match exactly and no mask may vanish."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.bool
    differing = (ours != theirs).flatten(1).sum(1)
    allowed = ((ours | theirs).flatten(1).sum(1) * tolerance).floor()
    bad = torch.nonzero(differing > allowed)[:, 0].tolist()
    assert not bad, (f"{where}: {len(bad)} masks differ, e.g. mask {bad[0]}: {int(differing[bad[0]])} pixels of "
                     f"{int((ours | theirs)[bad[0]].sum())}")


def test_masks_match_at_original_resolution(outputs, images):
    tv_out, our_out = outputs
    for i, (a, b, image) in enumerate(zip(tv_out, our_out, images)):
        h, w = image.shape[-2:]
        assert b["masks"].shape == (100, h, w) and b["masks"].dtype == torch.bool
        tv_masks = a["masks"][:, 0] > 0.5
        assert tv_masks.any(), "the oracle should produce non-empty masks"
        assert_masks_match(b["masks"], tv_masks, f"image {i}")


def test_default_800px_input(models):
    tv, ours = models
    # 480 x 720 scales to 800 x 1200 exactly: no side for torchvision to round down and ours to the nearest pixel.
    image = torch.rand(3, 480, 720, generator=torch.Generator().manual_seed(3))
    tv.transform.min_size, tv.transform.max_size = (800,), 1333
    ours.min_size, ours.max_size = 800, 1333
    try:
        with torch.no_grad():
            a, b = tv([image])[0], ours([image])[0]
    finally:
        tv.transform.min_size, tv.transform.max_size = (MIN_SIZE,), MAX_SIZE
        ours.min_size, ours.max_size = MIN_SIZE, MAX_SIZE
    assert torch.equal(a["labels"], b["labels"])
    # Coordinates reach 1200 px, where one float32 step is 1.2e-4: a few steps of rounding, relative.
    torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4)
    assert_masks_match(b["masks"], a["masks"][:, 0] > 0.5, "800 px image")


def test_narrow_trunk_equals_torchvision_blocks_at_that_width():
    """The demo's architecture at backbone width 32: torchvision's detection model around a trunk of
    torchvision's ResNet blocks at that width gives our detections, and the converter reads the width back."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "maskrcnn_R18_FPN_small.yaml",
                      ["model.backbone.width=32", "model.input.min_size_test=128", "model.input.max_size_test=256",
                       "model.roi_heads.score_thresh=0.0"])
    tv = well_conditioned_torchvision_model(cfg.model)
    assert config_for_torchvision_state(tv.state_dict()).model.backbone.width == 32
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict()))
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 128, 192, generator=g), torch.rand(3, 150, 120, generator=g)]
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(tv(images), ours(images))):
            assert len(a["boxes"]) == len(b["boxes"]) == 50, f"image {i}"
            assert torch.equal(a["labels"], b["labels"]), f"image {i}: labels differ"
            torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-4, msg=f"image {i}: boxes differ")
            torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-4, msg=f"image {i}: scores differ")
