"""Precision "auto" picks bf16 only where the hardware computes it natively, every entry point defaults to it,
and an explicit bf16 where it is emulated runs with a warning. The CPU's answer is monkeypatched both ways,
so these tests hold on any machine and never depend on bf16 being fast."""

import json
import warnings

import pytest
import torch

from maskrcnn import precision as precision_module
from maskrcnn.config import Config
from maskrcnn.engine.trainer import train
from maskrcnn.precision import ISA_CAPS, channels_last_is_faster, cpu_bf16, machine_summary, resolve_precision
from maskrcnn.predictor import Predictor
from tiny import tiny_config

AVX2_FLAGS = ("fpu", "sse4_2", "avx", "avx2", "fma")
AVX512_BF16_FLAGS = AVX2_FLAGS + ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
AMX_FLAGS = AVX2_FLAGS + ("avx512f", "avx512bw", "avx512vl", "amx_tile", "amx_bf16")


@pytest.fixture
def x86_cpu(monkeypatch):
    """Make the CPU an x86 one with the given feature flags (oneDNN's own bf16 check follows the flags)."""
    def make(flags, onednn_cap=None):
        monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(precision_module, "_cpu_flags", lambda: tuple(flags))
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: "avx512bw" in flags)
        if onednn_cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_cap)
    return make


@pytest.mark.parametrize("flags, unit", [(AVX512_BF16_FLAGS, "AVX512-BF16"), (AMX_FLAGS, "AMX")])
def test_auto_is_bf16_where_the_cpu_has_it(x86_cpu, flags, unit):
    x86_cpu(flags)
    resolved = resolve_precision("auto", "cpu")
    assert (resolved.precision, resolved.native) == ("bf16", True)
    assert resolved.message.startswith("precision auto -> bf16: ") and unit in resolved.message


def test_auto_is_fp32_on_an_avx2_cpu(x86_cpu):
    x86_cpu(AVX2_FLAGS)
    resolved = resolve_precision("auto", "cpu")
    assert resolved.precision == "fp32"
    assert resolved.message == (f"precision auto -> fp32: this CPU has no native bf16 "
                                f"({torch.backends.cpu.get_cpu_capability()})")


def test_auto_is_fp32_on_avx512_without_bf16(x86_cpu):
    x86_cpu(AVX2_FLAGS + ("avx512f", "avx512bw", "avx512vl"))  # Skylake-X: oneDNN emulates bf16 there
    assert resolve_precision("auto", "cpu").precision == "fp32"


def test_an_onednn_isa_cap_below_bf16_makes_it_fp32(x86_cpu):
    x86_cpu(AVX512_BF16_FLAGS, onednn_cap="AVX2")
    native, why = cpu_bf16()
    assert not native and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    x86_cpu(AVX512_BF16_FLAGS, onednn_cap="avx512_core_bf16")
    assert cpu_bf16()[0]


def test_explicit_bf16_where_emulated_warns_once_and_runs(x86_cpu):
    x86_cpu(AVX2_FLAGS)
    with pytest.warns(UserWarning, match="bf16 is emulated here .*several times slower"):
        resolved = resolve_precision("bf16", "cpu")
    assert (resolved.precision, resolved.native) == ("bf16", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu", warn=False).precision == "bf16"


def test_explicit_bf16_where_native_is_silent(x86_cpu):
    x86_cpu(AVX512_BF16_FLAGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu").native


def test_explicit_fp32_is_kept_and_unknown_names_are_refused(x86_cpu):
    x86_cpu(AVX512_BF16_FLAGS)
    assert resolve_precision("fp32", "cpu").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of .*'auto'.*got 'fp8'"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("flags, expected", [(AVX2_FLAGS, "fp32"), (AVX512_BF16_FLAGS, "bf16")])
def test_predictor_defaults_to_auto(x86_cpu, flags, expected):
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # this machine's own answer
    x86_cpu(flags)
    cfg = Config()
    cfg.model = tiny_config().model
    predictor = Predictor(cfg, None)
    assert predictor.precision == expected and predictor.resolved_precision.requested == "auto"
    if expected == "fp32" or native:  # a bf16 forward needs a CPU that has it, whatever the flags say
        result = predictor(torch.rand(3, 64, 80))
        assert result.boxes.dtype == torch.float32


def test_inference_precision_is_a_setting_of_the_model_and_auto_by_default():
    from maskrcnn.config import load_config
    assert Config().model.precision == "auto" and Config().train.precision == "auto"
    for name in ("maskrcnn_R18_FPN_small", "maskrcnn_R50_FPN", "maskrcnn_R50_FPN_v2"):
        cfg = load_config(f"configs/{name}.yaml")
        assert (cfg.model.precision, cfg.train.precision) == ("auto", "auto"), name
    with pytest.raises(ValueError, match="model.precision must be one of .*got 'fp8'"):
        load_model_with_precision("fp8")


def load_model_with_precision(precision: str):
    from maskrcnn.modeling.maskrcnn import build_model
    cfg = tiny_config()
    cfg.model.precision = precision
    return build_model(cfg.model)


def test_predictor_runs_at_the_configured_precision_unless_told_otherwise(x86_cpu):
    x86_cpu(AVX512_BF16_FLAGS)
    cfg = Config()
    cfg.model = tiny_config().model
    cfg.model.precision = "fp32"
    predictor = Predictor(cfg, None)
    assert (predictor.precision, predictor.resolved_precision.requested) == ("fp32", "fp32")
    assert Predictor(cfg, None, precision="auto").precision == "bf16"
    assert cfg.model.precision == "fp32"  # the caller's configuration is left as it was


@pytest.mark.parametrize("configured, asked, runs", [("fp32", None, "fp32"), ("bf16", None, "bf16"),
                                                      ("bf16", "fp32", "fp32")])
def test_detect_runs_at_the_models_precision_unless_told_otherwise(monkeypatch, configured, asked, runs):
    import maskrcnn.inference as inference
    seen = []
    monkeypatch.setattr(inference, "autocast", lambda precision, device: seen.append(precision) or torch.autocast(
        device.type, enabled=False))
    model = load_model_with_precision(configured).eval()
    inference.detect(model, [torch.rand(3, 64, 80)], class_names=["a", "b", "c"], precision=asked)
    assert seen == [runs]


def test_training_writes_the_resolved_precision(x86_cpu, tmp_path, capsys):
    from maskrcnn.data.shapes import generate_shapes
    from test_trainer import tiny_config as train_config
    x86_cpu(AVX2_FLAGS)
    data = tmp_path / "data"
    generate_shapes(data, num_train=2, num_val=1, seed=0, min_size=64, max_size=96)
    train(train_config(data, tmp_path / "out", "solver.max_iter=1", "train.precision=auto"))
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["precision"] == {"precision": "fp32", "requested": "auto", "native": True,
                                 "reason": f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()})"}
    assert info["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert info["layout"] == channels_last_is_faster("cpu")[1]
    assert "precision auto -> fp32: this CPU has no native bf16" in capsys.readouterr().err


def test_machine_summary_names_cpu_isa_bf16_and_threads():
    summary = machine_summary()
    assert summary["cpu"] and summary["isa"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(summary["native_bf16"], bool) and summary["threads"] == torch.get_num_threads()


def test_machine_summary_names_the_instruction_caps_a_figure_ran_under(monkeypatch):
    for name in ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert machine_summary()["isa_caps"] == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert machine_summary()["isa_caps"] == "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"


@pytest.mark.parametrize("isa, cap, expected", [("AVX512", None, True), ("AVX2", None, False),
                                                ("AVX512", "AVX2", False), ("DEFAULT", None, False)])
def test_training_layout_is_channels_last_only_where_it_trains_faster(monkeypatch, isa, cap, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    faster, why = channels_last_is_faster("cpu")
    assert faster is expected and why.startswith("channels-last" if expected else "NCHW")
