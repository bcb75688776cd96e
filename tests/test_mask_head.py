"""Mask head: logits of the detected class only, equal to the full forward's channel."""

import torch
from torch import nn

from maskrcnn.modeling.mask_head import MaskHead


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
