"""The weight average: its update against the formula, and in training: what evaluation scores, what the
checkpoint and the predictor hold."""

import copy

import pytest
import torch
from torch import nn

from maskrcnn.config import SolverConfig
from maskrcnn.distributed import unwrap_model
from maskrcnn.engine import trainer as trainer_module
from maskrcnn.engine.ema import ModelEMA, build_ema
from maskrcnn.engine.trainer import train
from maskrcnn.errors import InputError
from maskrcnn.modeling.maskrcnn import build_model
from test_trainer import one_thread, shapes8, tiny_config  # noqa: F401 (fixtures)


def _expected_decay(decay: float, t: int) -> float:
    return min(decay, (1 + t) / (10 + t))


def _small_model() -> nn.Module:
    """Linear layers around a BatchNorm (float running statistics, an integer counter) and a frozen layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2), nn.Linear(2, 2))
    model[3].requires_grad_(False)
    return model


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(6, 4)).square().mean().backward()  # also moves the BatchNorm statistics
    optimizer.step()


def test_update_follows_the_formula_exactly():
    model = _small_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    decay = 0.2  # reached at the third update: d = 0.1, 2/11, then min(0.2, 3/12)
    ema = ModelEMA(model, decay)
    for t in range(4):
        before = copy.deepcopy(ema.module.state_dict())
        _train_step(model, optimizer)
        ema.update(model)
        d = _expected_decay(decay, t)
        assert ema.decay_at(t) == d and ema.updates == t + 1
        for name, w in model.state_dict().items():
            e, new = before[name], ema.module.state_dict()[name]
            if not w.is_floating_point():  # num_batches_tracked
                assert torch.equal(new, w), name
                continue
            assert new.dtype == torch.float32
            assert torch.equal(new, e + (w - e) * (1 - d)), name  # the fp32 operations the docstring names
            torch.testing.assert_close(new.double(), d * e.double() + (1 - d) * w.double(), rtol=0, atol=1e-6)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert not torch.equal(ema.module[1].running_var, model[1].running_var)
    assert torch.equal(ema.module[3].weight, model[3].weight)  # never trained: stays exactly the same


def test_average_is_fp32_beside_a_bf16_model():
    model = _small_model().to(torch.bfloat16)
    ema = ModelEMA(model, 0.9)
    assert all(t.dtype == torch.float32 for t in ema.module.state_dict().values() if t.is_floating_point())
    start = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    w = model[0].weight.float()
    assert torch.equal(ema.module[0].weight, start["0.weight"] + (w - start["0.weight"]) * (1 - 0.1))
    assert model[0].weight.dtype == torch.bfloat16  # the model itself is left as it is


def test_decay_setting_is_checked():
    model = _small_model()
    assert build_ema(model, SolverConfig(ema_decay=0.0)) is None
    assert build_ema(model, SolverConfig(ema_decay=0.999)).decay == 0.999
    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match=f"solver.ema_decay must be in \\[0, 1\\).*got {bad}"):
            build_ema(model, SolverConfig(ema_decay=bad))
    with pytest.raises(InputError, match="EMA decay must be in \\(0, 1\\), got 0"):
        ModelEMA(model, 0.0)


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}


@pytest.fixture(scope="module")
def ema_run(shapes8, tmp_path_factory):
    """Two iterations with the average on, a checkpoint and an evaluation after each; returns the output
    folder, the initial weights and the weights each evaluation was handed."""
    out = tmp_path_factory.mktemp("ema_run")
    cfg = tiny_config(shapes8, out, "solver.max_iter=2", "solver.ema_decay=0.9", "train.checkpoint_period=1",
                      "train.eval_period=1")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    initial = _state(model)
    evaluated = []
    real_evaluate = trainer_module.evaluate

    def recording_evaluate(model, *args, **kwargs):
        evaluated.append(_state(model))
        return real_evaluate(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "evaluate", recording_evaluate)
        summary = train(cfg, model=model)
    return out, initial, evaluated, summary


def test_checkpoint_holds_the_average_as_model_and_the_trained_weights_beside_it(ema_run):
    out, initial, _, _ = ema_run
    first = torch.load(out / "model_0000001.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert first["ema_updates"] == 1 and final["ema_updates"] == 2
    e = initial
    for checkpoint, t in ((first, 0), (final, 1)):
        d = _expected_decay(0.9, t)
        w = checkpoint["raw_model"]
        e = {k: e[k] + (w[k] - e[k]) * (1 - d) if w[k].is_floating_point() else w[k] for k in w}
        assert checkpoint["model"].keys() == e.keys()
        assert all(torch.equal(checkpoint["model"][k], e[k]) for k in e)
    trained = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(final["model"][trained], final["raw_model"][trained])


def test_evaluation_scores_the_average(ema_run):
    out, _, evaluated, summary = ema_run
    assert len(evaluated) == 2 and summary["eval"] is not None
    for state, name in zip(evaluated, ("model_0000001.pth", "model_final.pth")):
        average = torch.load(out / name, weights_only=True)["model"]
        assert state.keys() == average.keys() and all(torch.equal(state[k], average[k]) for k in state)


def test_predictor_loads_the_average(ema_run):
    from maskrcnn.predictor import Predictor

    out, _, _, _ = ema_run
    average = torch.load(out / "model_final.pth", weights_only=True)["model"]
    loaded = Predictor.from_checkpoint(out / "model_final.pth").model.state_dict()
    assert loaded.keys() == average.keys() and all(torch.equal(loaded[k], average[k]) for k in average)
