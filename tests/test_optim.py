"""Optimizer parameter groups and the learning-rate schedule."""

import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR

from maskrcnn.config import SolverConfig
from maskrcnn.engine.optim import build_lr_scheduler, build_optimizer, parameter_groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Conv2d(3, 4, 3)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)
        self.tied = nn.Linear(8, 5)
        self.tied.weight = self.fc.weight


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_groups_separate_norm_and_bias_and_skip_frozen():
    model = _Net()
    cfg = SolverConfig(weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=2e-5)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert _names(model, groups["weights"]) == {"conv.weight", "fc.weight"}
    assert _names(model, groups["norm"]) == {"bn.weight", "bn.bias", "gn.weight", "gn.bias"}
    assert _names(model, groups["bias"]) == {"conv.bias", "fc.bias", "tied.bias"}
    assert [groups[k]["weight_decay"] for k in ("weights", "norm", "bias")] == [1e-4, 0.0, 2e-5]
    assert sum(len(g["params"]) for g in groups.values()) == len({id(p) for p in model.parameters() if p.requires_grad})


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_reaches_only_weights(name):
    model = _Net()
    cfg = SolverConfig(optimizer=name, lr=0.5, weight_decay=0.1, weight_decay_norm=0.0, weight_decay_bias=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    expected_type = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    assert type(optimizer) is expected_type
    assert optimizer.defaults["fused"]  # parameters on the CPU: one fused kernel per step
    assert (model.conv.weight < 1).all() and (model.fc.weight < 1).all()
    for p in (model.conv.bias, model.bn.weight, model.bn.bias, model.gn.bias, model.fc.bias, model.frozen.weight):
        assert torch.equal(p, torch.ones_like(p))


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="solver.optimizer"):
        build_optimizer(_Net(), SolverConfig(optimizer="lamb"))


def _lrs(scheduler, n):
    values = []
    for _ in range(n):
        values.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_warmup_multistep_matches_torch_schedulers():
    cfg = SolverConfig(lr=0.02, warmup_iters=10, warmup_factor=0.001, schedule="multistep", steps=[30, 45],
                       gamma=0.1, max_iter=60)
    ours = build_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr), cfg)
    reference_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    reference = ChainedScheduler([LinearLR(reference_opt, start_factor=0.001, total_iters=10),
                                  MultiStepLR(reference_opt, milestones=[30, 45], gamma=0.1)])
    reference.optimizer = reference_opt
    got, want = _lrs(ours, 60), _lrs(reference, 60)
    assert got == pytest.approx(want, rel=1e-9)
    assert got[0] == pytest.approx(0.02 * 0.001)
    assert got[10] == pytest.approx(0.02) and got[29] == pytest.approx(0.02)
    assert got[30] == pytest.approx(0.002) and got[59] == pytest.approx(0.0002)


def test_cosine_goes_from_lr_to_min_factor():
    cfg = SolverConfig(lr=0.1, warmup_iters=5, warmup_factor=0.5, schedule="cosine", min_lr_factor=0.1, max_iter=100)
    lrs = _lrs(build_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr), cfg), 101)
    cosine = [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 100))) for i in range(101)]
    assert lrs[0] == pytest.approx(0.5 * cosine[0])
    assert lrs[2] == pytest.approx((0.5 + 0.5 * 2 / 5) * cosine[2])
    assert lrs[5:] == pytest.approx(cosine[5:])
    assert lrs[50] == pytest.approx(0.1 * 0.55) and lrs[100] == pytest.approx(0.01)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="solver.schedule"):
        build_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), SolverConfig(schedule="poly"))
