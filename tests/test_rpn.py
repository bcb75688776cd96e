"""RPN stages: anchor labelling and proposal selection, against torchvision's RegionProposalNetwork on the
same anchors, objectness and deltas."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead as TVRPNHead

from tiny import tiny_config
from maskrcnn.modeling.maskrcnn import build_model

SIZES = [(96, 128), (80, 112)]
PADDED = (96, 128)


def _models():
    cfg = tiny_config().model
    ours = build_model(cfg).rpn
    a, r = cfg.anchors, cfg.rpn
    tv = RegionProposalNetwork(
        TVAnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes)),
        TVRPNHead(cfg.backbone.fpn_channels, len(a.aspect_ratios)), r.fg_iou_thresh, r.bg_iou_thresh,
        r.batch_size_per_image, r.positive_fraction, {"training": r.pre_nms_topk_train, "testing": r.pre_nms_topk_test},
        {"training": r.post_nms_topk_train, "testing": r.post_nms_topk_test}, r.nms_thresh, r.score_thresh)
    return ours, tv


def _features():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 32, (PADDED[0] + s - 1) // s, (PADDED[1] + s - 1) // s, generator=g)
            for s in (4, 8, 16, 32, 64)]


def _anchors(ours, features):
    return torch.cat(ours.anchor_generator([tuple(f.shape[-2:]) for f in features], PADDED, features[0].device))


def test_anchors_equal_torchvision():
    ours, tv = _models()
    features = _features()
    expected = tv.anchor_generator(TVImageList(torch.zeros(2, 3, *PADDED), SIZES), features)
    assert torch.equal(_anchors(ours, features), expected[0])


def test_label_anchors_equals_torchvision():
    ours, tv = _models()
    anchors = _anchors(ours, _features())
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 5.0, 120.0, 40.0], [2.0, 2.0, 9.0, 11.0]])},
               {"boxes": torch.zeros(0, 4)}]
    labels, deltas = ours.label_anchors(anchors, targets)
    tv_labels, tv_matched = tv.assign_targets_to_anchors([anchors, anchors], targets)
    assert torch.equal(labels.float(), torch.stack(tv_labels))
    assert (labels[0] == 1).sum() >= 3 and (labels[1] == 1).sum() == 0  # every box gets its best anchor
    positive = labels[0] == 1
    expected = tv.box_coder.encode_single(tv_matched[0], anchors)
    torch.testing.assert_close(deltas[0][positive], expected[positive], rtol=0, atol=1e-5)


def test_select_proposals_equals_torchvision_filter_proposals():
    ours, tv = _models()
    ours.eval(), tv.eval()
    features = _features()
    levels = ours.anchor_generator([tuple(f.shape[-2:]) for f in features], PADDED, features[0].device)
    anchors = torch.cat(levels)
    num_per_level = [len(a) for a in levels]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, len(anchors), generator=g) * 2
    deltas = torch.randn(2, len(anchors), 4, generator=g) * 0.2
    with torch.no_grad():
        rois = ours.select_proposals(list(logits.split(num_per_level, dim=1)), list(deltas.split(num_per_level, dim=1)),
                                     levels, torch.tensor(SIZES))
        decoded = tv.box_coder.decode(deltas.reshape(-1, 4), [anchors, anchors]).view(2, -1, 4)
        expected, _ = tv.filter_proposals(decoded, logits, SIZES, num_per_level)
    assert torch.equal(rois[:, 0], torch.sort(rois[:, 0]).values), "grouped by image"
    for image, b in enumerate(expected):
        a = rois[rois[:, 0] == image, 1:]
        assert a.shape == b.shape and len(a) > 10, image
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_proposals_of_an_image_do_not_depend_on_its_batch_neighbours():
    """Each image's proposals are the same alone and at either position of a batch, to the bit: NMS keeps
    images and levels apart on the operator's axes, not by shifting coordinates."""
    ours, _ = _models()
    ours.eval()
    features = _features()
    with torch.no_grad():
        logits, deltas, anchors = ours.predict(features, PADDED)
        sizes = torch.tensor(SIZES)

        def proposals(order):
            rois = ours.select_proposals([x[order] for x in logits], [d[order] for d in deltas], anchors, sizes[order])
            return [rois[rois[:, 0] == position, 1:] for position in range(len(order))]

        alone = [proposals([i])[0] for i in range(2)]
        for order in ([0, 1], [1, 0], [1, 1]):
            for position, image in enumerate(order):
                assert torch.equal(proposals(order)[position], alone[image]), (order, position)


def test_head_outputs_and_gradients_equal_torchvision():
    """Our head runs its two 1x1 convolutions as one; logits, deltas and every gradient are torchvision's."""
    ours, tv = _models()
    head, tv_head = ours.head, tv.head
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mine, theirs in ((head.conv, tv_head.conv[0][0]), (head.objectness_logits, tv_head.cls_logits),
                             (head.anchor_deltas, tv_head.bbox_pred)):
            for name in ("weight", "bias"):
                getattr(theirs, name).copy_(torch.randn(getattr(theirs, name).shape, generator=g) * 0.1)
                getattr(mine, name).copy_(getattr(theirs, name))
    features = _features()
    results = []
    for module in (head, tv_head):
        module.zero_grad()
        inputs = [f.clone().requires_grad_() for f in features]
        logits, deltas = module(inputs)
        g = torch.Generator().manual_seed(2)  # the same loss weights for both
        loss = sum((x * torch.randn(x.shape, generator=g)).sum() for x in [*logits, *deltas])
        loss.backward()
        results.append((logits, deltas, [x.grad for x in inputs], [p.grad for p in module.parameters()]))
    (logits, deltas, input_grads, param_grads), (tv_logits, tv_deltas, tv_input_grads, tv_param_grads) = results
    for mine, theirs in zip([*logits, *deltas, *input_grads], [*tv_logits, *tv_deltas, *tv_input_grads]):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    by_shape = {tuple(p.shape): p for p in tv_param_grads}
    assert len(by_shape) == len(param_grads) == 6
    for grad in param_grads:  # conv, objectness, deltas: weights and biases, shapes all distinct
        theirs = by_shape[tuple(grad.shape)]
        torch.testing.assert_close(grad, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def _training_pair(num_convs):
    """Our RPN and torchvision's in training mode, with the same random head weights."""
    cfg = tiny_config().model
    cfg.rpn.head_convs = num_convs
    cfg.rpn.batch_size_per_image = 1024  # of about 3000 anchors per image: every level takes part
    ours = build_model(cfg).rpn
    a, r = cfg.anchors, cfg.rpn
    tv_head = TVRPNHead(cfg.backbone.fpn_channels, len(a.aspect_ratios), conv_depth=num_convs)
    tv = RegionProposalNetwork(
        TVAnchorGenerator(tuple((s,) for s in a.sizes), (tuple(a.aspect_ratios),) * len(a.sizes)), tv_head,
        r.fg_iou_thresh, r.bg_iou_thresh, r.batch_size_per_image, r.positive_fraction,
        {"training": r.pre_nms_topk_train, "testing": r.pre_nms_topk_test},
        {"training": r.post_nms_topk_train, "testing": r.post_nms_topk_test}, r.nms_thresh, r.score_thresh)
    g = torch.Generator().manual_seed(3)
    pairs = [(ours.head.conv, tv_head.conv[0][0]), *zip(ours.head.extra_convs, (c[0] for c in tv_head.conv[1:])),
             (ours.head.objectness_logits, tv_head.cls_logits), (ours.head.anchor_deltas, tv_head.bbox_pred)]
    with torch.no_grad():
        for mine, theirs in pairs:
            for name in ("weight", "bias"):
                getattr(theirs, name).copy_(torch.randn(getattr(theirs, name).shape, generator=g) * 0.1)
                getattr(mine, name).copy_(getattr(theirs, name))
    return ours.train(), tv.train()


@pytest.mark.parametrize("num_convs,layout", [(1, torch.contiguous_format), (2, torch.contiguous_format),
                                               (1, torch.channels_last), (2, torch.channels_last)])
def test_training_losses_and_gradients_equal_torchvision(num_convs, layout):
    """Training evaluates the head at the sampled anchors only; the losses and every gradient (head weights
    and each pyramid level) are those of torchvision's RPN, which runs the head over every level. Boxes
    reach the borders, so anchors whose neighbourhoods cross the padding are sampled too. Both layouts:
    channels-last levels are gathered by rows."""
    ours, tv = _training_pair(num_convs)
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 52.0], [70.0, 5.0, 127.0, 40.0], [30.0, 60.0, 90.0, 95.0]])},
               {"boxes": torch.tensor([[3.0, 50.0, 110.0, 79.0]])}]
    results = []
    for model in (ours, tv):
        model.zero_grad()
        features = [f.contiguous(memory_format=layout).requires_grad_() for f in _features()]
        torch.manual_seed(7)  # the same anchor sample: both draw it with randperm, image by image
        if model is ours:
            _, losses = model(features, SIZES, PADDED, targets)
        else:
            image_list = TVImageList(torch.zeros(2, 3, *PADDED), SIZES)
            _, losses = model(image_list, {str(i): f for i, f in enumerate(features)}, targets)
        sum(losses.values()).backward()
        results.append((losses, [f.grad for f in features], [p.grad for p in model.head.parameters()]))
    (losses, grads, param_grads), (tv_losses, tv_grads, tv_param_grads) = results
    assert losses.keys() == tv_losses.keys()
    for name, value in losses.items():
        torch.testing.assert_close(value, tv_losses[name], rtol=1e-5, atol=0)
    for mine, theirs in zip(grads, tv_grads):
        assert theirs.abs().max() > 0, "every level has sampled anchors"
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    theirs_by_shape = {}
    for grad in tv_param_grads:
        theirs_by_shape.setdefault(tuple(grad.shape), []).append(grad)
    for grad in param_grads:  # the 3x3 convolutions in order, then the two output convolutions
        theirs = theirs_by_shape[tuple(grad.shape)].pop(0)
        torch.testing.assert_close(grad, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_training_with_nothing_sampled_gives_zero_losses_and_gradients(layout):
    """Every anchor ignored (a crowd region over the whole image): zero losses, and the head's parameters
    still get a gradient, of zeros, so that distributed training finds them used."""
    ours, _ = _training_pair(1)
    features = [f.contiguous(memory_format=layout).requires_grad_() for f in _features()]
    whole = torch.tensor([[-1000.0, -1000.0, 1000.0, 1000.0]])
    targets = [{"boxes": torch.zeros(0, 4), "crowd_boxes": whole}] * 2
    _, losses = ours(features, SIZES, PADDED, targets)
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    for p in ours.head.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
