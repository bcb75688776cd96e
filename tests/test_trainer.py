"""The training loop end to end on a few tiny generated images: loss goes down, outputs are written,
resume reproduces the uninterrupted run, a non-finite loss stops with the last good checkpoint."""

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from maskrcnn.config import Config, load_config
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.checkpoint import find_last_checkpoint
from maskrcnn.engine.logger import MetricsLogger
from maskrcnn.engine.trainer import train
from maskrcnn.modeling.maskrcnn import build_model

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_dir: Path, output_dir: Path, *overrides: str) -> List[str]:
    """Settings of a small Mask R-CNN on the shapes data in ``data_dir``, fp32 on the CPU, logging every
    iteration; ``overrides`` come last and win."""
    return [
        "model.backbone.depth=18", "model.backbone.fpn_channels=32", "model.roi_heads.box_head_dim=64",
        "model.roi_heads.mask_head_dim=16", "model.roi_heads.mask_head_convs=1", "model.roi_heads.num_classes=3",
        "model.rpn.batch_size_per_image=64", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
        "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=50",
        "model.roi_heads.batch_size_per_image=32", "model.input.min_size=[64]", "model.input.max_size=96",
        f"data.train_ann={data_dir}/annotations/instances_train.json", f"data.train_images={data_dir}/train",
        f"data.val_ann={data_dir}/annotations/instances_val.json", f"data.val_images={data_dir}/val",
        "data.num_workers=0", "solver.ims_per_batch=2", "solver.lr=0.01", "solver.warmup_iters=2",
        "solver.steps=[1000]", "train.device=cpu", "train.precision=fp32", f"train.output_dir={output_dir}",
        "train.log_period=1", "train.checkpoint_period=1000", *overrides]


def tiny_config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    return load_config(None, tiny_overrides(data_dir, output_dir, *overrides))


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's few cores are shared: one intra-op thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes8(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes8")
    generate_shapes(root, num_train=8, num_val=2, seed=0, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """30 iterations on the same two images (no flip): the loss must fall."""
    data = tmp_path_factory.mktemp("shapes2")
    generate_shapes(data, num_train=2, num_val=1, seed=0, min_size=64, max_size=96)
    out = tmp_path_factory.mktemp("overfit")
    cfg = tiny_config(data, out, "solver.max_iter=30", "solver.lr=0.02", "solver.clip_grad_norm=1.0",
                      "data.flip_prob=0.0", "train.checkpoint_period=20")
    summary = train(cfg)
    return cfg, out, summary


def test_loss_goes_down(overfit_run):
    _, out, _ = overfit_run
    losses = [r["total_loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_run_writes_checkpoints_config_and_figures(overfit_run):
    cfg, out, summary = overfit_run
    assert load_config(out / "config.yaml") == cfg
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000020.pth", "model_final.pth"]
    assert find_last_checkpoint(out) == out / "model_final.pth"
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 30 and final["class_names"] == ["square", "circle", "triangle"]
    model = build_model(cfg.model)
    model.load_state_dict(final["model"])
    assert torch.load(out / "model_0000020.pth", weights_only=True)["iteration"] == 20
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "train_summary.json").read_text()) == summary


def test_metrics_log_has_every_term(overfit_run):
    cfg, out, summary = overfit_run
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, 31))
    terms = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    for r in records:
        assert terms | {"iteration", "total_loss", "lr", "time", "data_time"} == set(r)
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in terms), rel=1e-5)
    assert records[0]["lr"] == pytest.approx(cfg.solver.lr * cfg.solver.warmup_factor)
    assert records[-1]["lr"] == pytest.approx(cfg.solver.lr)
    assert summary["train"] == records[-1] and summary["eval"] is None


@pytest.mark.parametrize("ema_decay", [pytest.param(0.0, id="plain"),
                                       pytest.param(0.9, id="weight_average", marks=pytest.mark.slow)])
def test_resume_reproduces_uninterrupted_run(shapes8, tmp_path, monkeypatch, ema_decay):
    settings = ("solver.max_iter=6", "train.checkpoint_period=3", f"solver.ema_decay={ema_decay}")
    straight = tiny_config(shapes8, tmp_path / "straight", *settings)
    train(straight)
    expected = read_jsonl(tmp_path / "straight" / "metrics.jsonl")

    interrupted = tiny_config(shapes8, tmp_path / "resumed", *settings)
    original_log = MetricsLogger.log

    def crash_after_logging_iteration_4(logger, record):
        original_log(logger, record)
        if record["iteration"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "log", crash_after_logging_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted)
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    assert len(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == 4
    assert find_last_checkpoint(tmp_path / "resumed").name == "model_0000003.pth"

    train(interrupted, resume=True)
    resumed = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(1, 7))
    for a, b in zip(expected, resumed):
        assert {k: v for k, v in a.items() if k.startswith(("loss", "total"))} == \
               {k: v for k, v in b.items() if k.startswith(("loss", "total"))}
    final_a = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    final_b = torch.load(tmp_path / "resumed" / "model_final.pth", weights_only=True)
    weights = ["model", "raw_model"] if ema_decay else ["model"]  # with an average: the average, the trained
    assert [key for key in final_a if key in ("model", "raw_model")] == weights
    for key in weights:
        assert final_a[key].keys() == final_b[key].keys()
        assert all(torch.equal(final_a[key][k], final_b[key][k]) for k in final_a[key]), key
    assert final_a.get("ema_updates") == final_b.get("ema_updates") == (6 if ema_decay else None)


class _NanAtCall(torch.nn.Module):
    """A MaskRCNN whose ``loss_box_reg`` becomes NaN on its ``bad_call``-th training forward."""

    def __init__(self, inner, bad_call):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def forward(self, images, targets=None):
        losses = self.inner(images, targets)
        self.calls += 1
        if self.calls == self.bad_call:
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses


class _InfPixelsAtCall(torch.nn.Module):
    """A MaskRCNN fed infinite pixels on its ``bad_call``-th training forward (its BatchNorm statistics
    turn non-finite in that forward, before any loss is seen)."""

    def __init__(self, inner, bad_call):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def forward(self, images, targets=None):
        self.calls += 1
        if self.calls == self.bad_call:
            images = [image * float("inf") for image in images]
        return self.inner(images, targets)


class _NanGradientAtCall(_NanAtCall):
    """A MaskRCNN whose losses stay finite on its ``bad_call``-th training forward but whose gradient is
    NaN: sqrt(0) is 0, its derivative is infinite, and the chain rule multiplies that by 0."""

    def forward(self, images, targets=None):
        losses = self.inner(images, targets)
        self.calls += 1
        if self.calls == self.bad_call:
            weight = self.inner.roi_heads.box_predictor.cls_score.weight
            losses["loss_box_reg"] = losses["loss_box_reg"] + torch.sqrt(weight.sum() * 0)
        return losses


def _assert_stop_kept_last_good_checkpoint(output_dir: Path, good: str, stopped: str) -> None:
    """``good`` is still the last checkpoint, holds finite values only, and ``stopped`` (the state saved by
    the stop) equals it: parameters, buffers, optimizer state and iteration."""
    assert find_last_checkpoint(output_dir).name == good
    kept = torch.load(output_dir / good, weights_only=True)
    saved = torch.load(output_dir / stopped, weights_only=True)
    assert kept["iteration"] == saved["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert kept["model"].keys() == saved["model"].keys()
    assert all(torch.equal(kept["model"][k], saved["model"][k]) for k in kept["model"])
    kept_state, saved_state = kept["optimizer"]["state"], saved["optimizer"]["state"]
    assert kept_state.keys() == saved_state.keys() and all(
        torch.equal(kept_state[i][name], saved_state[i][name]) for i in kept_state for name in kept_state[i])


def test_non_finite_loss_stops_and_keeps_last_good_state(shapes8, tmp_path):
    cfg = tiny_config(shapes8, tmp_path, "solver.max_iter=10", "model.backbone.norm=bn",
                      "train.checkpoint_period=2")
    model = _InfPixelsAtCall(build_model(cfg.model), bad_call=3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at iteration 3; .*stopped_before_iteration"):
        train(cfg, model=model)
    _assert_stop_kept_last_good_checkpoint(tmp_path, "model_0000002.pth", "stopped_before_iteration_0000003.pth")
    assert [r["iteration"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_finite_loss_with_non_finite_gradient_takes_no_step(shapes8, tmp_path):
    cfg = tiny_config(shapes8, tmp_path, "solver.max_iter=10", "train.checkpoint_period=2")
    model = _NanGradientAtCall(build_model(cfg.model), bad_call=3)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* at iteration 3"):
        train(cfg, model=model)
    _assert_stop_kept_last_good_checkpoint(tmp_path, "model_0000002.pth", "stopped_before_iteration_0000003.pth")


def test_bf16_autocast_trains_on_cpu(shapes8, tmp_path):
    summary = train(tiny_config(shapes8, tmp_path, "solver.max_iter=2", "train.precision=bf16"))
    assert summary["iteration"] == 2 and math.isfinite(summary["train"]["total_loss"])


def test_periodic_and_final_evaluation_are_logged(shapes8, tmp_path):
    summary = train(tiny_config(shapes8, tmp_path, "solver.max_iter=2", "train.eval_period=1",
                                "train.eval_at_end=true"))
    evaluations = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "bbox" in r]
    assert [r["iteration"] for r in evaluations] == [1, 2]
    assert all(0.0 <= r[kind]["AP50"] <= 1.0 for r in evaluations for kind in ("bbox", "segm"))
    assert summary["eval"] == {k: v for k, v in evaluations[-1].items() if k != "iteration"}
    assert json.loads((tmp_path / "eval_0000002" / "metrics.json").read_text()) == summary["eval"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(shapes8, tmp_path, precision):
    summary = train(tiny_config(shapes8, tmp_path, "solver.max_iter=3", "train.device=cuda",
                                f"train.precision={precision}"))
    assert math.isfinite(summary["train"]["total_loss"])
    scaler = torch.load(tmp_path / "model_final.pth", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")


def test_unusable_settings_are_rejected(shapes8, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(tiny_config(shapes8, tmp_path, "train.precision=fp16"))
    with pytest.raises(ValueError, match="instances_train.json has 3 categories.*num_classes is 5"):
        train(tiny_config(shapes8, tmp_path, "model.roi_heads.num_classes=5"))


def test_tensorboard_without_package_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


def test_command_line_reads_file_then_overrides(shapes8, tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("solver:\n  max_iter: 2\ntrain:\n  log_period: 1\n")
    out = tmp_path / "cli"
    argv = ["train.py", "--config", str(config_file), *tiny_overrides(shapes8, out), "train.log_period=2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "tools" / "train.py"), run_name="__main__")
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [2]
    assert json.loads(capsys.readouterr().out)["iteration"] == 2


def test_resume_after_the_end_keeps_the_summary(overfit_run):
    cfg, out, summary = overfit_run
    before = (out / "train_summary.json").read_text()
    assert train(cfg, resume=True) == summary
    assert (out / "train_summary.json").read_text() == before and summary["train"] is not None


def test_partial_last_log_line_is_dropped_on_resume(tmp_path):
    lines = [json.dumps({"iteration": i, "total_loss": 1.0 / i}) for i in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 4, "total_lo')
    logger = MetricsLogger(tmp_path, start_iter=3)
    logger.close()
    assert [r["iteration"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def v2_head_overrides(norm: str) -> List[str]:
    """The head layout of torchvision's v2 model, narrowed to the tiny model: batch norm in the trunk,
    ``norm`` in the FPN, box head and mask head, a two-convolution RPN head, a box head of two 3x3
    convolutions and one fully connected layer."""
    return ["model.backbone.norm=bn", f"model.backbone.fpn_norm={norm}", "model.rpn.head_convs=2",
            "model.roi_heads.box_head_convs=2", "model.roi_heads.box_head_conv_dim=16",
            f"model.roi_heads.box_head_norm={norm}", "model.roi_heads.box_head_fcs=1",
            f"model.roi_heads.mask_head_norm={norm}"]


def test_v2_heads_with_batchnorm_learn(tmp_path):
    """30 iterations on the same two images with batch norm in every stage: the loss must fall, as it
    does for the v1 heads."""
    data = tmp_path / "shapes2"
    generate_shapes(data, num_train=2, num_val=1, seed=0, min_size=64, max_size=96)
    train(tiny_config(data, tmp_path / "out", "solver.max_iter=30", "solver.lr=0.02", "solver.clip_grad_norm=1.0",
                      "data.flip_prob=0.0", *v2_head_overrides("bn")))
    losses = [r["total_loss"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_v2_heads_train_evaluate_and_predict(shapes8, tmp_path, norm):
    """A checkpoint with normalised heads trains (the batch norms' running statistics move), is evaluated at
    the end of training, loads strictly into a fresh model and runs in the Predictor (normalisations folded)."""
    from maskrcnn.predictor import Predictor

    cfg = tiny_config(shapes8, tmp_path, "solver.max_iter=3", "train.eval_at_end=true", *v2_head_overrides(norm))
    summary = train(cfg)
    assert summary["iteration"] == 3 and math.isfinite(summary["train"]["total_loss"])
    assert all(0.0 <= summary["eval"][kind]["AP50"] <= 1.0 for kind in ("bbox", "segm"))
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    model = build_model(cfg.model)
    model.load_state_dict(state, strict=True)
    assert "rpn.head.extra_convs.0.weight" in state and "roi_heads.box_head.convs.1.weight" in state
    moved = [k for k in state if k.endswith("running_mean") and k.startswith(("fpn.", "roi_heads."))]
    assert len(moved) == (8 + 2 + 1 if norm == "bn" else 0)  # FPN, box head, the tiny mask head's one conv
    assert all(state[k].abs().sum() > 0 for k in moved), "batch norm statistics were not updated"

    predictor = Predictor.from_checkpoint(tmp_path / "model_final.pth", score_thresh=0.0)
    image = sorted((shapes8 / "val").glob("*.jpg"))[0]
    result = predictor(str(image))
    assert len(result.boxes) > 0 and result.masks.shape[1:] == result.image_size
