"""The assembled model on a tiny configuration: training losses and gradients, images without objects,
inference outputs at the original resolution, input validation, and backbone freezing."""

import numpy as np
import pytest
import torch

from tiny import tiny_config
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.modeling.paste import paste_masks_in_image
from maskrcnn.structures import BitMasks, PolygonMasks

NUM_CLASSES = 3
LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def tiny_model_config():
    cfg = tiny_config().model
    cfg.roi_heads.num_classes = NUM_CLASSES
    cfg.rpn.pre_nms_topk_train = cfg.rpn.pre_nms_topk_test = 100
    cfg.rpn.post_nms_topk_train = cfg.rpn.post_nms_topk_test = 30
    return cfg


def tiny_model(cfg=None):
    torch.manual_seed(0)
    return build_model(cfg or tiny_model_config())


def rectangle_target(size, boxes, labels, polygons=False):
    """Target dict for an image of ``size`` (h, w) whose instances fill their boxes."""
    h, w = size
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if polygons:
        masks = PolygonMasks([[np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]
                              for x0, y0, x1, y1 in boxes.tolist()], (h, w))
    else:
        bits = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            bits[i, y0:y1, x0:x1] = True
        masks = BitMasks(bits)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


def images_of(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def test_training_losses_are_named_finite_and_reach_every_trainable_parameter():
    model = tiny_model().train()
    images = images_of((64, 96), (72, 80))
    targets = [rectangle_target((64, 96), [[10, 8, 50, 40], [55, 20, 90, 60]], [1, 3]),
               rectangle_target((72, 80), [[5, 5, 40, 70]], [2], polygons=True)]
    targets[0]["crowd_boxes"] = torch.tensor([[0.0, 40.0, 30.0, 64.0]])
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    groups = ["backbone.layer2", "backbone.layer3", "backbone.layer4", "fpn.lateral_convs", "fpn.output_convs",
              "rpn.head.conv", "rpn.head.objectness_logits", "rpn.head.anchor_deltas", "roi_heads.box_head",
              "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred", "roi_heads.mask_head"]
    for group in groups:
        grads = [p.grad.abs().sum() for n, p in trainable.items() if n.startswith(group + ".")]
        assert grads and sum(grads) > 0, group
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1")) for n in frozen)


def empty_target(size):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": BitMasks(torch.zeros(0, *size, dtype=torch.bool))}


def test_image_without_objects_is_valid_training_input():
    model = tiny_model().train()
    images = images_of((64, 96), (64, 64))
    targets = [rectangle_target((64, 96), [[10, 8, 50, 40]], [2]), empty_target((64, 64))]
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_batch_without_objects_gives_zero_mask_loss_and_backward_works():
    model = tiny_model().train()
    images = images_of((64, 96), (70, 60))
    losses = model(images, [empty_target((64, 96)), empty_target((70, 60))])
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_rpn_box_reg"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert losses["loss_objectness"].item() > 0 and losses["loss_classifier"].item() > 0
    sum(losses.values()).backward()
    mask_grads = [p.grad for p in model.roi_heads.mask_head.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in mask_grads)


@pytest.fixture(scope="module")
def eval_model():
    cfg = tiny_model_config()
    cfg.roi_heads.score_thresh = 0.0  # random weights: keep every candidate so that detections exist
    return tiny_model(cfg).eval()


EVAL_SIZES = [(50, 70), (80, 40), (33, 120)]


def test_inference_outputs_at_the_original_resolution(eval_model):
    images = images_of(*EVAL_SIZES, seed=1)
    with torch.no_grad():
        results = eval_model(images)
    assert len(results) == len(images)
    for (h, w), result in zip(EVAL_SIZES, results):
        assert set(result) == {"boxes", "scores", "labels", "masks"}
        d = len(result["boxes"])
        assert 0 < d <= eval_model.roi_heads.detections_per_img
        assert result["boxes"].shape == (d, 4) and result["boxes"].dtype == torch.float32
        assert result["scores"].shape == (d,) and result["scores"].dtype == torch.float32
        assert result["labels"].shape == (d,) and result["labels"].dtype == torch.int64
        assert result["masks"].shape == (d, h, w) and result["masks"].dtype == torch.bool
        assert ((result["labels"] >= 1) & (result["labels"] <= NUM_CLASSES)).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        boxes = result["boxes"]
        assert (boxes[:, 0] >= -1e-3).all() and (boxes[:, 1] >= -1e-3).all()
        assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()


def test_mask_format_probs_gives_the_probabilities_that_paste_into_the_masks(eval_model):
    images = images_of(*EVAL_SIZES, seed=1)
    with torch.no_grad():
        pasted = eval_model(images)
        results = eval_model(images, mask_format="probs")
    for (h, w), result, reference in zip(EVAL_SIZES, results, pasted):
        assert "masks" not in result
        probs = result["mask_probs"]
        assert probs.shape == (len(result["boxes"]), 28, 28) and probs.dtype == torch.float32
        assert len(probs) > 0 and ((probs >= 0) & (probs <= 1)).all()
        assert torch.equal(result["boxes"], reference["boxes"])
        masks = paste_masks_in_image(probs, result["boxes"], (h, w), threshold=eval_model.mask_threshold)
        assert torch.equal(masks, reference["masks"])


@pytest.mark.parametrize("image, message", [
    (torch.rand(1, 32, 32), r"image 0: expected shape \(3, H, W\)"),
    (torch.rand(32, 32), r"image 0: expected shape \(3, H, W\)"),
    (torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), "image 0: expected a float tensor"),
    (torch.rand(3, 0, 32), "image 0: empty image"),
])
def test_bad_images_are_refused(eval_model, image, message):
    with pytest.raises(ValueError, match=message):
        eval_model([image])


def test_empty_image_list_is_refused(eval_model):
    with pytest.raises(ValueError, match="non-empty list"):
        eval_model([])


def corrupt(target, field, value):
    target = dict(target)
    if value is None:
        del target[field]
    else:
        target[field] = value
    return target


GOOD = rectangle_target((64, 96), [[10, 8, 50, 40], [55, 20, 90, 60]], [1, 3])
BAD_TARGETS = [
    (corrupt(GOOD, "boxes", torch.tensor([[10.0, 8.0, 10.0, 40.0], [55.0, 20.0, 90.0, 60.0]])), "box 0 is degenerate"),
    (corrupt(GOOD, "boxes", torch.tensor([[10.0, 8.0, 50.0, 40.0], [55.0, 60.0, 90.0, 20.0]])), "box 1 is degenerate"),
    (corrupt(GOOD, "boxes", torch.tensor([[10.0, 8.0, 50.0, 40.0], [55.0, 20.0, 130.0, 60.0]])), "box 1 .* outside"),
    (corrupt(GOOD, "boxes", torch.tensor([[-8.0, 8.0, 50.0, 40.0], [55.0, 20.0, 90.0, 60.0]])), "box 0 .* outside"),
    (corrupt(GOOD, "labels", torch.tensor([0, 1])), r"labels must be in 1\.\.3"),
    (corrupt(GOOD, "labels", torch.tensor([1, 4])), r"labels must be in 1\.\.3"),
    (corrupt(GOOD, "labels", torch.tensor([1])), "2 boxes, 1 labels and 2 masks"),
    (corrupt(GOOD, "masks", BitMasks(torch.zeros(2, 64, 95, dtype=torch.bool))), "masks are 95x64 but the image is 96x64"),
    (corrupt(GOOD, "masks", torch.zeros(2, 64, 96, dtype=torch.bool)), "BitMasks or PolygonMasks"),
    (corrupt(GOOD, "boxes", None), "missing 'boxes'"),
    (corrupt(GOOD, "labels", None), "missing 'labels'"),
    (corrupt(GOOD, "masks", None), "missing 'masks'"),
]


@pytest.mark.parametrize("target, message", BAD_TARGETS)
def test_bad_targets_are_refused_naming_the_image(target, message):
    model = tiny_model().train()
    images = images_of((64, 96), (64, 96))
    with pytest.raises(ValueError, match="target of image 1: .*" + message):
        model(images, [GOOD, target])


def test_training_without_targets_is_refused():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="one target dict per image"):
        model(images_of((64, 96)))


def mask_head_batch_sizes(model, images, targets):
    """Rows of the RoI feature batch the mask head received in one training forward (the mask pooler's output)."""
    sizes = []
    hook = model.roi_heads.mask_pooler.register_forward_hook(lambda m, args, out: sizes.append(len(out)))
    try:
        model(images, targets)
    finally:
        hook.remove()
    return sizes


def test_mask_rois_per_image_caps_the_mask_loss_batch():
    images = images_of((64, 96), (72, 80))
    targets = [rectangle_target((64, 96), [[10, 8, 50, 40], [55, 20, 90, 60]], [1, 3]),
               rectangle_target((72, 80), [[5, 5, 40, 70], [42, 10, 78, 50]], [2, 1])]
    cfg = tiny_model_config()
    torch.manual_seed(1)
    [all_fg] = mask_head_batch_sizes(tiny_model(cfg).train(), images, targets)
    cfg.roi_heads.mask_rois_per_image = 2
    torch.manual_seed(1)
    [capped] = mask_head_batch_sizes(tiny_model(cfg).train(), images, targets)
    # Each image has at least its two ground-truth boxes among the proposals, so at least 2 positives.
    assert all_fg > 4 and capped == 4


@pytest.mark.parametrize("fpn_norm, mask_head_norm", [("gn", "bn"), ("bn", "gn")])
def test_normalised_fpn_and_mask_head_train_and_infer(fpn_norm, mask_head_norm):
    cfg = tiny_model_config()
    cfg.backbone.fpn_norm, cfg.roi_heads.mask_head_norm = fpn_norm, mask_head_norm
    model = tiny_model(cfg).train()
    images = images_of((64, 96), (72, 80))
    targets = [rectangle_target((64, 96), [[10, 8, 50, 40]], [1]), rectangle_target((72, 80), [[5, 5, 40, 70]], [2])]
    losses = model(images, targets)
    sum(losses.values()).backward()
    for group in ("fpn.lateral_norms", "fpn.output_norms", "roi_heads.mask_head.norms"):
        grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(group + ".")]
        assert grads and sum(grads) > 0, group
    assert model.fpn.output_convs[0].bias is None and model.roi_heads.mask_head.convs[0].bias is None
    cfg.roi_heads.score_thresh = 0.0
    model.eval()
    with torch.no_grad():
        out = model(images_of((50, 70)))
    assert out[0]["masks"].shape[-2:] == (50, 70)


@pytest.mark.parametrize("key", ["backbone.fpn_norm", "roi_heads.box_head_norm", "roi_heads.mask_head_norm"])
def test_unknown_norm_is_refused_naming_the_key(key):
    cfg = tiny_model_config()
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, "layer")
    with pytest.raises(ValueError, match=f'{key}: norm must be "", "bn" or "gn"'):
        build_model(cfg)


@pytest.mark.parametrize("key, value, message", [("rpn.head_convs", 0, "rpn.head_convs must be at least 1"),
                                                  ("roi_heads.box_head_fcs", 0, "roi_heads.box_head_fcs >= 1")])
def test_head_depths_out_of_range_are_refused(key, value, message):
    cfg = tiny_model_config()
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_negative_mask_rois_per_image_is_refused():
    cfg = tiny_model_config()
    cfg.roi_heads.mask_rois_per_image = -1
    with pytest.raises(ValueError, match="roi_heads.mask_rois_per_image must be >= 0"):
        build_model(cfg)


def test_mask_outline_weight_reaches_the_mask_loss_and_nothing_else():
    images = images_of((64, 96))
    targets = [rectangle_target((64, 96), [[10, 8, 50, 40], [55, 20, 90, 60]], [1, 3])]
    losses = {}
    for weight in (0.0, 4.0):
        cfg = tiny_model_config()
        cfg.roi_heads.mask_outline_weight = weight
        torch.manual_seed(1)
        model = tiny_model(cfg).train()
        torch.manual_seed(2)
        losses[weight] = model(images, targets)
    assert losses[4.0]["loss_mask"] != losses[0.0]["loss_mask"]
    for name in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert torch.equal(losses[4.0][name], losses[0.0][name]), name


def test_negative_mask_outline_weight_is_refused():
    cfg = tiny_model_config()
    cfg.roi_heads.mask_outline_weight = -0.5
    with pytest.raises(ValueError, match="roi_heads.mask_outline_weight must be >= 0"):
        build_model(cfg)
