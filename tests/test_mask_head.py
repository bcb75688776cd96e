"""Mask head: logits of the detected class only, equal to the full forward's channel."""

import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.modeling.mask_head import MaskHead, logits_of_class, mask_loss, outline_cells


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


def test_training_loss_on_class_logits_has_the_full_predictors_gradients():
    """Training evaluates only each RoI's ground-truth channel; the loss and every gradient equal those of
    the full K-channel predictor followed by the selection, and absent classes' predictor rows get none."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, 14, 14)
    classes = torch.tensor([1, 5, 3, 3, 1, 4])
    targets = torch.rand(6, 28, 28).round()
    grads = []
    for select in (lambda head, x: head.class_logits(x, classes),
                   lambda head, x: logits_of_class(head(x), classes)):
        torch.manual_seed(1)
        head = MaskHead(in_channels=8, conv_dim=16, num_convs=2, num_classes=5)
        nn.init.normal_(head.predictor.weight, std=0.5)
        x_ = x.clone().requires_grad_()
        loss = mask_loss(select(head, x_), targets)
        loss.backward()
        grads.append((loss.detach(), x_.grad, {n: p.grad for n, p in head.named_parameters()}))
    (loss, x_grad, params), (full_loss, full_x_grad, full_params) = grads
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(x_grad, full_x_grad, rtol=1e-4, atol=1e-4 * full_x_grad.abs().max().item())
    for name, grad in full_params.items():
        torch.testing.assert_close(params[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)
    assert params["predictor.weight"][1].abs().sum() == 0  # class 2 is absent
    assert params["predictor.weight"][[0, 2, 3, 4]].abs().sum(dim=(1, 2, 3)).min() > 0


def test_fused_inference_equals_the_plain_convolutions(monkeypatch):
    """Without autograd, channels-last float32 RoI features run each convolution and the deconvolution with
    its ReLU inside oneDNN; the masks equal the plain convolution followed by a ReLU to float rounding."""
    from maskrcnn.modeling import layers

    torch.manual_seed(0)
    head = MaskHead(in_channels=8, conv_dim=16, num_convs=2, num_classes=5).to(memory_format=torch.channels_last)
    head.requires_grad_(False)
    x = torch.randn(6, 8, 14, 14).to(memory_format=torch.channels_last)
    runs_fused, fused_convs = layers._runs_fused, []
    monkeypatch.setattr(layers, "_runs_fused", lambda conv, x: runs_fused(conv, x) and not fused_convs.append(conv))
    fused = head(x)
    assert [type(c) for c in fused_convs] == [nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d]
    with layers.fused_convolutions(False):
        plain = head(x)
    assert len(fused_convs) == 3
    torch.testing.assert_close(fused, plain, rtol=0, atol=2e-5 * plain.abs().max().item())


def test_outline_cells_are_the_band_where_the_target_changes():
    """A 10 x 10 square in a 28 x 28 grid: its outline band is the square's own border ring and the ring
    just outside it; the grid's edge is not an outline, and a full or an empty target has none."""
    targets = torch.zeros(3, 28, 28)
    targets[0, 9:19, 9:19] = 1
    targets[1] = 1  # all foreground: nothing to outline, not even at the grid's edge
    band = outline_cells(targets)
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[8:20, 8:20] = True
    expected[10:18, 10:18] = False  # the square's inside, two cells in, sees no background
    assert torch.equal(band[0], expected)
    assert band[0].sum() == 12 * 12 - 8 * 8
    assert not band[1].any() and not band[2].any()


def test_outline_weight_weighs_the_outline_cells_and_keeps_the_plain_loss_at_zero():
    torch.manual_seed(0)
    logits = torch.randn(4, 28, 28)
    targets = torch.zeros(4, 28, 28)
    targets[:, 6:20, 5:22] = 1
    per_cell = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    band = outline_cells(targets)
    assert torch.equal(mask_loss(logits, targets, 0.0), F.binary_cross_entropy_with_logits(logits, targets))
    weights = torch.where(band, 5.0, 1.0)
    expected = (per_cell * weights).sum() / weights.sum()
    torch.testing.assert_close(mask_loss(logits, targets, 4.0), expected, rtol=1e-6, atol=0)
    # Only the outline gains weight: a loss that errs on the outline alone rises above the plain mean.
    wrong_outline = torch.where(band, -3.0, torch.where(targets > 0.5, 6.0, -6.0))
    assert mask_loss(wrong_outline, targets, 4.0) > 2 * mask_loss(wrong_outline, targets, 0.0)
