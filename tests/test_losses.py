"""RPN, box-head and mask losses on hand-built cases whose values follow from the loss formulas."""

import math

import torch

from maskrcnn.modeling.mask_head import logits_of_class, mask_loss
from maskrcnn.modeling.roi_heads import box_losses
from maskrcnn.modeling.rpn import rpn_losses, sample_anchors

BETA = 1 / 9


def smooth_l1(x):
    """Smooth-L1 of one float with beta 1/9, from its definition."""
    x = abs(x)
    return 0.5 * x * x / BETA if x < BETA else x - 0.5 * BETA


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def rpn(logits, deltas, labels, gt_deltas, batch_size=256):
    """The RPN losses over a balanced sample of (N, T) anchors, as training takes them."""
    sampled = sample_anchors(labels, batch_size_per_image=batch_size, positive_fraction=0.5)
    return rpn_losses(logits.reshape(-1)[sampled], deltas.reshape(-1, 4)[sampled], labels.reshape(-1)[sampled],
                      gt_deltas.reshape(-1, 4)[sampled])


def test_rpn_perfect_prediction():
    labels = torch.tensor([[1, 0, 0, 1, -1, 0]])
    gt_deltas = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    logits = torch.where(labels == 1, 20.0, -20.0)
    losses = rpn(logits, gt_deltas.clone(), labels, gt_deltas)
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert 0 <= losses["loss_objectness"].item() < 1e-8


def test_rpn_known_offsets_and_logits():
    # Image 0 holds only background; image 1 one positive, one negative and one ignored anchor.
    labels = torch.tensor([[0, 0, -1], [1, 0, -1]])
    logits = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.25, -4.0]])
    gt_deltas = torch.zeros(2, 3, 4)
    gt_deltas[1, 0] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    offset = [0.05, -0.5, 0.0, 2.0]  # inside and outside the quadratic zone, both signs
    deltas = gt_deltas.clone()
    deltas[1, 0] += torch.tensor(offset)
    deltas[0] += 7.0  # background anchors' deltas do not count
    losses = rpn(logits, deltas, labels, gt_deltas)
    sampled = 4  # every labelled anchor fits in the batch
    assert math.isclose(losses["loss_rpn_box_reg"].item(), sum(smooth_l1(d) for d in offset) / sampled,
                        rel_tol=1e-5)
    bce = [-log_sigmoid(2.0), -log_sigmoid(-0.5), -log_sigmoid(1.0), -log_sigmoid(-0.25)]  # 1 - sigmoid(x) = sigmoid(-x)
    assert math.isclose(losses["loss_objectness"].item(), sum(bce) / sampled, rel_tol=1e-5)


def test_rpn_losses_count_the_sampled_anchors_only():
    labels = torch.zeros(1, 1000, dtype=torch.int64)
    labels[0, :10] = 1
    logits = torch.zeros(1, 1000)
    gt_deltas = torch.zeros(1, 1000, 4)
    deltas = torch.full((1, 1000, 4), 0.5)
    losses = rpn(logits, deltas, labels, gt_deltas, batch_size=64)
    # All 10 positives are sampled among 64 anchors: box loss 10 * 4 * smooth_l1(0.5) / 64; BCE of logit 0 is log 2.
    assert math.isclose(losses["loss_rpn_box_reg"].item(), 40 * smooth_l1(0.5) / 64, rel_tol=1e-5)
    assert math.isclose(losses["loss_objectness"].item(), math.log(2), rel_tol=1e-5)


def test_rpn_without_positives_keeps_the_graph():
    labels = torch.tensor([[0, 0, -1, 0]])
    logits = torch.randn(1, 4, requires_grad=True)
    deltas = torch.randn(1, 4, 4, requires_grad=True)
    losses = rpn(logits, deltas, labels, torch.zeros(1, 4, 4))
    assert losses["loss_rpn_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.equal(deltas.grad, torch.zeros_like(deltas))
    assert logits.grad[0, 2] == 0 and logits.grad[0, :2].abs().min() > 0


def test_rpn_with_nothing_sampled_keeps_the_graph():
    logits = torch.randn(1, 3, requires_grad=True)
    deltas = torch.randn(1, 3, 4, requires_grad=True)
    losses = rpn(logits, deltas, torch.full((1, 3), -1), torch.zeros(1, 3, 4))
    assert all(v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and torch.equal(deltas.grad, torch.zeros_like(deltas))


def test_box_losses_known_values():
    # Three RoIs over K = 2 classes: one of class 2, one of class 1, one background.
    logits = torch.tensor([[0.1, -1.0, 2.0], [0.5, 1.5, -0.5], [3.0, 0.0, 1.0]])
    gt_classes = torch.tensor([2, 1, 0])
    gt_deltas = torch.tensor([[0.2, 0.1, -0.3, 0.4], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    deltas = torch.zeros(3, 8)
    deltas[0, 4:] = gt_deltas[0] + torch.tensor([0.05, 0.3, 0.0, -1.0])  # class 2 slot of RoI 0
    deltas[0, :4] = 100.0  # the other class's slot does not count
    deltas[1, :4] = torch.tensor([0.0, 0.0, -0.1, 0.0])  # class 1 slot of RoI 1
    deltas[2] = 50.0  # background RoI: no box loss
    losses = box_losses(logits, deltas, gt_classes, gt_deltas)
    expected_box = (smooth_l1(0.05) + smooth_l1(0.3) + smooth_l1(-1.0) + smooth_l1(-0.1)) / 3
    assert math.isclose(losses["loss_box_reg"].item(), expected_box, rel_tol=1e-5)
    ce = [math.log(sum(math.exp(v) for v in row)) - row[c]
          for row, c in zip(logits.tolist(), gt_classes.tolist())]
    assert math.isclose(losses["loss_classifier"].item(), sum(ce) / 3, rel_tol=1e-5)


def test_box_losses_perfect_prediction():
    gt_classes = torch.tensor([1, 3, 0])
    gt_deltas = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    deltas = torch.zeros(3, 12)
    deltas[0, 0:4] = gt_deltas[0]
    deltas[1, 8:12] = gt_deltas[1]
    logits = torch.full((3, 4), -15.0)
    logits[torch.arange(3), gt_classes] = 15.0
    losses = box_losses(logits, deltas, gt_classes, gt_deltas)
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_classifier"].item() < 1e-8


def test_box_losses_without_foreground_keep_the_graph():
    logits = torch.randn(4, 3, requires_grad=True)
    deltas = torch.randn(4, 8, requires_grad=True)
    losses = box_losses(logits, deltas, torch.zeros(4, dtype=torch.int64), torch.zeros(4, 4))
    assert losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.equal(deltas.grad, torch.zeros_like(deltas))
    assert logits.grad.abs().sum() > 0


def test_mask_loss_is_mean_bce_of_the_ground_truth_channel():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 28, 28, generator=g) * 3
    classes = torch.tensor([2, 4, 1])
    targets = torch.rand(3, 28, 28, generator=g).round()
    targets[0, :5] = 0.3  # soft targets (bilinear crop borders) count as they are
    loss = mask_loss(logits_of_class(logits, classes), targets)
    x = logits[torch.arange(3), classes - 1].double()
    bce = -(targets * torch.nn.functional.logsigmoid(x) + (1 - targets) * torch.nn.functional.logsigmoid(-x))
    assert math.isclose(loss.item(), bce.mean().item(), rel_tol=1e-5)


def test_mask_loss_ignores_other_class_channels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 28, 28, generator=g)
    classes = torch.tensor([3, 1])
    targets = torch.rand(2, 28, 28, generator=g).round()
    changed = logits.clone()
    changed[0, :2] = torch.randn(2, 28, 28, generator=g) * 10
    changed[1, 1:] = -50.0

    def loss(x):
        return mask_loss(logits_of_class(x, classes), targets)

    assert loss(changed).item() == loss(logits).item()
    changed.requires_grad_(True)
    loss(changed).backward()
    assert changed.grad[0, :2].abs().sum() == 0 and changed.grad[1, 1:].abs().sum() == 0
    assert changed.grad[0, 2].abs().sum() > 0 and changed.grad[1, 0].abs().sum() > 0


def test_mask_loss_without_positives_keeps_the_graph():
    logits = torch.randn(0, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, 28, 28))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
