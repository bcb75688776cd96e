"""Checkpoint save/load: full round trip (with a weight average too), atomic replacement, latest-checkpoint
pointer, DDP unwrapping."""

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maskrcnn.config import Config, config_from_dict
from maskrcnn.engine.checkpoint import find_last_checkpoint, load_checkpoint, load_ema, save_checkpoint
from maskrcnn.engine.ema import ModelEMA
from maskrcnn.engine.optim import build_lr_scheduler, build_optimizer


def _training_state(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    cfg = Config()
    cfg.solver.warmup_iters = 3
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver)
    return cfg, model, optimizer, scheduler


def _step(model, optimizer, scheduler, n):
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()


def _random_draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_round_trip_continues_training_exactly(tmp_path):
    cfg, model, optimizer, scheduler = _training_state(0)
    _step(model, optimizer, scheduler, 2)
    path = save_checkpoint(tmp_path / "model_0000002.pth", model=model, optimizer=optimizer, scheduler=scheduler,
                           iteration=2, config=cfg, class_names=["a", "b"], note="kept")
    draws = _random_draws()
    _step(model, optimizer, scheduler, 3)  # momentum, warmup lr and the RNG all shape these steps

    _, model2, optimizer2, scheduler2 = _training_state(1)
    checkpoint = load_checkpoint(path, model2, optimizer2, scheduler2)
    replay = _random_draws()
    _step(model2, optimizer2, scheduler2, 3)
    assert replay[:2] == draws[:2] and torch.equal(replay[2], draws[2])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert checkpoint["iteration"] == 2 and checkpoint["class_names"] == ["a", "b"] and checkpoint["note"] == "kept"
    assert config_from_dict(checkpoint["config"]) == cfg


def _step_with_average(model, optimizer, scheduler, ema, n):
    for _ in range(n):
        _step(model, optimizer, scheduler, 1)
        ema.update(model)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_average_is_the_model_entry_and_round_trips_exactly(tmp_path):
    cfg, model, optimizer, scheduler = _training_state(0)
    ema = ModelEMA(model, 0.5)
    _step_with_average(model, optimizer, scheduler, ema, 2)
    path = save_checkpoint(tmp_path / "model_0000002.pth", model=model, ema=ema, optimizer=optimizer,
                           scheduler=scheduler, iteration=2, config=cfg, class_names=["a"])
    saved = torch.load(path, weights_only=True)
    _assert_same_state(saved["model"], ema.module.state_dict())  # what inference loads: the average
    _assert_same_state(saved["raw_model"], model.state_dict())
    assert saved["ema_updates"] == 2
    draws = _random_draws()
    _step_with_average(model, optimizer, scheduler, ema, 3)

    _, model2, optimizer2, scheduler2 = _training_state(1)
    ema2 = ModelEMA(model2, 0.5)
    checkpoint = load_checkpoint(path, model2, optimizer2, scheduler2)
    _assert_same_state(model2.state_dict(), saved["raw_model"])  # training continues from the trained weights
    assert load_ema(checkpoint, ema2) and ema2.updates == 2
    assert _random_draws()[:2] == draws[:2]
    _step_with_average(model2, optimizer2, scheduler2, ema2, 3)
    _assert_same_state(model2.state_dict(), model.state_dict())
    _assert_same_state(ema2.module.state_dict(), ema.module.state_dict())
    assert ema2.updates == ema.updates == 5


def test_average_starts_from_the_weights_of_a_checkpoint_without_one(tmp_path):
    cfg, model, _, _ = _training_state(0)
    path = save_checkpoint(tmp_path / "plain.pth", model=model, iteration=0, config=cfg, class_names=[])
    assert "raw_model" not in torch.load(path, weights_only=True)
    _, model2, _, _ = _training_state(1)
    checkpoint = load_checkpoint(path, model2)
    ema = ModelEMA(model2, 0.5)
    assert not load_ema(checkpoint, ema) and ema.updates == 0
    _assert_same_state(ema.module.state_dict(), model.state_dict())


class _FailsMidWrite:
    """An entry whose serialisation fails after the model tensors have been written."""

    def __reduce__(self):
        raise OSError("disk full")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    cfg, model, optimizer, scheduler = _training_state(0)
    save_checkpoint(tmp_path / "model.pth", model=model, iteration=1, config=cfg, class_names=["a"])
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "model.pth", model=model, iteration=2, config=cfg, class_names=["a"],
                        failing=_FailsMidWrite())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "other.pth", model=model, iteration=3, config=cfg, class_names=["a"],
                        failing=_FailsMidWrite())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model.pth"]
    assert find_last_checkpoint(tmp_path) == tmp_path / "model.pth"
    assert load_checkpoint(tmp_path / "model.pth", model)["iteration"] == 1


def test_last_checkpoint_pointer(tmp_path):
    cfg, model, _, _ = _training_state(0)
    assert find_last_checkpoint(tmp_path) is None
    for it in (5, 10):
        save_checkpoint(tmp_path / f"model_{it:07d}.pth", model=model, iteration=it, config=cfg, class_names=[])
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000010.pth"
    (tmp_path / "model_0000010.pth").unlink()
    with pytest.raises(FileNotFoundError, match="model_0000010.pth"):
        find_last_checkpoint(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    cfg, model, optimizer, _ = _training_state(0)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth", model)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(tmp_path / "junk.pth", model)
    save_checkpoint(tmp_path / "weights.pth", model=model, iteration=0, config=cfg, class_names=[])
    with pytest.raises(ValueError, match="weights.pth.*'optimizer'"):
        load_checkpoint(tmp_path / "weights.pth", model, optimizer)


def test_ddp_wrapper_is_unwrapped(tmp_path):
    cfg, model, _, _ = _training_state(0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        path = save_checkpoint(tmp_path / "ddp.pth", model=wrapped, iteration=0, config=cfg, class_names=[])
        load_checkpoint(path, wrapped)
    finally:
        dist.destroy_process_group()
    state = torch.load(path, weights_only=True)["model"]
    assert set(state) == set(model.state_dict())
