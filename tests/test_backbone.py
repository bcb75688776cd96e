"""ResNet trunk: equal to torchvision's ResNet (outputs and gradients), normalisation folding, frozen
stages, and the offline error of the ImageNet weights."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.modeling.backbone import ResNet, resnet_trunk
from maskrcnn.modeling import layers
from maskrcnn.modeling.layers import fold_batchnorm


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


@pytest.mark.parametrize("depth", [18, 50])
def test_trunk_of_any_width_is_laid_out_as_torchvision_resnet(depth):
    """At width 64 the trunk builder gives torchvision's modules and initialisation statistics; at width 32
    every convolution has half the input and output channels (a quarter of the multiply-adds)."""
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=nn.BatchNorm2d)
    tv_state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    full = resnet_trunk(depth, 64, nn.BatchNorm2d).state_dict()
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in tv_state.items()}
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        torch.testing.assert_close(full[name].std(), tv_state[name].std(), rtol=0.1, atol=0)
    narrow = ResNet(depth=depth, norm="bn", freeze_at=0, width=32)
    half = {k: v.shape for k, v in narrow.state_dict().items()}
    assert half.keys() == full.keys()
    for name, shape in half.items():
        if name.endswith("conv1.weight") and name.count(".") == 1:  # the stem sees the 3 image channels
            assert shape == (32, 3, 7, 7)
        elif "conv" in name or name.endswith("downsample.0.weight"):
            out_ch, in_ch, *kernel = full[name].shape
            assert shape == (out_ch // 2, in_ch // 2, *kernel), name
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        shapes = [tuple(c.shape) for c in narrow(x)]
    assert narrow.out_channels == [c // 2 for c in ResNet(depth=depth).out_channels]
    assert shapes == [(1, c, 64 // 2 ** k, 96 // 2 ** k) for c, k in zip(narrow.out_channels, range(2, 6))]


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


@pytest.mark.parametrize("freeze_at, frozen_parts", [
    (0, []),
    (1, ["conv1", "bn1"]),
    (2, ["conv1", "bn1", "layer1"]),
    (5, ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]),
])
def test_freeze_at_turns_off_gradients_of_the_leading_stages(freeze_at, frozen_parts):
    trunk = ResNet(depth=18, norm="bn", freeze_at=freeze_at)
    for name, param in trunk.named_parameters():
        assert param.requires_grad == (name.split(".")[0] not in frozen_parts), name


def test_pretrained_backbone_without_network_names_the_file(monkeypatch):
    import urllib.error

    import torchvision.models._api as weights_api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match=r"resnet18-.*\.pth.*set model\.backbone\.pretrained=false"):
        ResNet(depth=18, pretrained=True)


class _CountFused:
    """Wraps ``layers._runs_fused`` to count the convolutions that take oneDNN's fused operators."""

    def __init__(self, monkeypatch):
        self.count, self._orig = 0, layers._runs_fused
        monkeypatch.setattr(layers, "_runs_fused", self)

    def __call__(self, conv, x):
        fused = self._orig(conv, x)
        self.count += fused
        return fused


def _trunk_folded_and_input(depth):
    """A trunk with random statistics, its folded channels-last copy and a channels-last input batch."""
    torch.manual_seed(0)
    trunk = ResNet(depth=depth, norm="frozen_bn", freeze_at=0).eval()
    _random_statistics(trunk, seed=8)
    folded = fold_batchnorm(trunk).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(9)).to(memory_format=torch.channels_last)
    return trunk, folded, x


def _fusable_convs(trunk) -> int:
    """Every convolution but the downsample branches' (the only ones followed by neither ReLU nor sum)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in trunk.modules())
    return convs - sum(getattr(m, "downsample", None) is not None for m in trunk.modules())


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_inference_trunk_equals_the_plain_one(depth, monkeypatch):
    """The folded channels-last trunk runs its convolutions with the ReLU and the residual sum inside
    oneDNN (writing each block's sum into its input's memory): every stage output equals the plain
    convolution, addition and ReLU to float rounding (a few millionths of its largest value, where a lost
    ReLU or residual is off by the order of that value), so no block overwrote a stage output another
    stage reads."""
    _, folded, x = _trunk_folded_and_input(depth)
    with torch.no_grad():
        counter = _CountFused(monkeypatch)
        fused = folded(x)
        assert counter.count == _fusable_convs(folded)
        with layers.fused_convolutions(False):
            plain = folded(x)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_bfloat16_trunk_keeps_bfloat16_accuracy(depth, monkeypatch):
    """Under bfloat16 autocast the fused convolutions cast their operands as autocast does and round each
    block's sum once: every stage output stays within bfloat16's error of the float32 trunk (under 1.5% in
    norm; a lost residual or ReLU is off by the order of the output itself). Where oneDNN has no bfloat16
    kernels (an AVX2 CPU) the plain operators run instead, to the same accuracy."""
    trunk, folded, x = _trunk_folded_and_input(depth)
    with torch.no_grad():
        reference = trunk(x)  # float32, unfolded: no fused convolution
        counter = _CountFused(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = folded(x)
    assert counter.count == (_fusable_convs(folded) if layers._onednn_bf16() else 0)
    for a, b in zip(fused, reference):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).norm() < 0.015 * b.norm()


def test_bfloat16_without_onednn_bf16_kernels_takes_the_plain_operators(monkeypatch):
    """On a CPU whose oneDNN has no bfloat16 kernels (AVX2) the fused operators refuse bfloat16: the trunk
    runs the plain ones (which emulate it) and still returns bfloat16 stage outputs."""
    _, folded, x = _trunk_folded_and_input(18)
    monkeypatch.setattr(layers, "_onednn_bf16", lambda: False)
    counter = _CountFused(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = folded(x)
    assert counter.count == 0
    assert all(o.dtype == torch.bfloat16 for o in outputs)


def test_folded_trunk_backpropagates_to_its_input(monkeypatch):
    """The fused operators have no backward: an input that needs a gradient takes the plain path."""
    torch.manual_seed(0)
    trunk = ResNet(depth=18, norm="frozen_bn", freeze_at=0).eval()
    folded = fold_batchnorm(trunk).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last).requires_grad_()
    counter = _CountFused(monkeypatch)
    sum(f.sum() for f in folded(x)).backward()
    assert counter.count == 0 and x.grad is not None and x.grad.abs().sum() > 0
