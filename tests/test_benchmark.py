"""The benchmark compares like with like: the same detections (checked), torchvision in its faster layout,
outputs of the same kind; on a small model so that it runs in seconds."""

import torch

from maskrcnn.config import Config
import pytest

from benchmarks import speed
from benchmarks.speed import (benchmark_inference, benchmark_paste, choose_modes, compare_detections, compare_precisions,
                              format_report)
from maskrcnn.precision import machine_summary
from maskrcnn.reference import our_model_from, sample_images, well_conditioned_torchvision_model
from tiny import tiny_config


def _small_models():
    cfg = Config().model
    cfg.backbone.depth = 18
    cfg.input.min_size, cfg.input.max_size = [96], 160
    cfg.roi_heads.score_thresh, cfg.roi_heads.detections_per_img = 0.0, 20
    tv = well_conditioned_torchvision_model(cfg)
    return tv, our_model_from(tv, cfg)


def test_compare_detections_finds_a_changed_label_and_a_moved_mask():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = masks[1, 4:, 4:] = True
    ours = [{"boxes": torch.tensor([[0.0, 0, 4, 4], [4, 4, 8, 8]]), "labels": torch.tensor([1, 2]), "masks": masks}]
    assert compare_detections(ours, ours) == {"detections": 2, "same_label": 1.0, "min_box_iou": 1.0,
                                              "mean_mask_iou": 1.0}
    other = {**ours[0], "labels": torch.tensor([1, 3]), "masks": masks.roll(1, dims=2)}
    check = compare_detections(ours, [other])
    assert check["same_label"] == 0.5 and 0 < check["mean_mask_iou"] < 1


def test_inference_figures_compare_the_same_detections_with_the_faster_torchvision_layout():
    tv, ours = _small_models()
    figures = benchmark_inference(tv, ours, sample_images(96, torch.device("cpu"), count=2), mode="fp32", repeats=1,
                                  device=torch.device("cpu"))
    assert figures["check_same_label"] == 1.0 and figures["check_detections"] == 40
    assert figures["check_min_box_iou"] >= 0.99 and figures["check_mean_mask_iou"] >= 0.9
    assert figures["tv_layout"] in ("NCHW", "channels_last")
    assert figures["e2e_tv_s"] == min(figures["e2e_tv_nchw_s"], figures["e2e_tv_cl_s"])
    assert figures["e2e_gflop"] == pytest.approx(sum(figures[f"{stage}_gflop"] for stage in speed.STAGES))
    for stage in (*speed.STAGES, "e2e"):
        assert figures[f"{stage}_floor_s"] == pytest.approx(figures[f"{stage}_gflop"] / figures["peak_gflops"])
        if figures[f"{stage}_floor_s"] >= 0.01 * figures[f"{stage}_tv_s"]:
            assert figures[f"{stage}_ceiling"] == pytest.approx(figures[f"{stage}_tv_s"] / figures[f"{stage}_floor_s"])
    report = format_report({**machine_summary(), "architecture": "configs/maskrcnn_R50_FPN_v2.yaml", "device": "cpu",
                            "image_size": "96x144", "detections": 20, "repeats": 1,
                            **{f"fp32_{k}": v for k, v in figures.items()}, "e2e_fp32_speedup": figures["e2e_speedup"],
                            "paste_s": 1, "paste_tv_s": 1,
                            "write_s": 1, "paste_speedup": 1, "paste_vs_write": 1, "paste_differing_pixels": 0})
    assert "torchvision channels_last: median" in report and "same detections: 100.0% of 40" in report
    assert f"at {figures['peak_gflops']:.0f} GFLOP/s" in report and "ceiling = tv ms / floor ms" in report
    header, architecture = report.splitlines()[:2]
    assert architecture.startswith("R50-FPN architecture configs/maskrcnn_R50_FPN_v2.yaml;")
    summary = machine_summary()
    assert header.startswith(f"CPU {summary['cpu']}, ISA {torch.backends.cpu.get_cpu_capability()}, native bf16 ")
    assert f"{torch.get_num_threads()} threads" in header
    restricted = format_report({**machine_summary(), "isa_caps": "ONEDNN_MAX_CPU_ISA=AVX2", "architecture": "x",
                                "device": "cpu", "image_size": "96x144", "detections": 20, "repeats": 1,
                                "paste_s": 1, "paste_tv_s": 1, "write_s": 1, "paste_speedup": 1,
                                "paste_vs_write": 1, "paste_differing_pixels": 0})
    assert restricted.splitlines()[0].endswith("; restricted by ONEDNN_MAX_CPU_ISA=AVX2")


def test_bf16_finds_the_fp32_detections_with_their_scores_and_masks():
    """Our bf16 against our fp32 on the well-conditioned tiny model (bf16 is emulated on AVX2: 64 px, two
    images). Here bf16 moves scores by 0.006 at most and mask probabilities by 0.0013 on average; bf16
    outputs that gave each detection another's score would differ by up to 0.2, another's mask by 0.1."""
    cfg = tiny_config().model
    ours = speed.prepare_for_inference(our_model_from(well_conditioned_torchvision_model(cfg), cfg))
    check = compare_precisions(ours, sample_images(64, torch.device("cpu"), count=2), torch.device("cpu"))
    assert check["detections"] == 2 * cfg.roi_heads.detections_per_img
    assert check["found"] >= 0.9 and check["same_box"] >= 0.8, check
    assert check["max_score_diff"] < 0.03 and check["mean_mask_diff"] < 0.01, check
    report = format_report({**machine_summary(), "architecture": "x", "device": "cpu", "image_size": "64x96",
                            "detections": 20, "repeats": 1, "paste_s": 1, "paste_tv_s": 1, "write_s": 1,
                            "paste_speedup": 1, "paste_vs_write": 1, "paste_differing_pixels": 0,
                            **{f"bf16_vs_fp32_{key}": value for key, value in check.items()}})
    assert f"bf16 against fp32, ours, on the small training model with well-conditioned weights: " \
           f"{check['found']:.1%} of the 40 fp32 detections found in bf16" in report


@pytest.mark.parametrize("native, expected", [(False, ("fp32",)), (True, ("fp32", "bf16"))])
def test_auto_mode_measures_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(speed, "device_bf16", lambda device: (native, "this CPU has no native bf16 (AVX2)"
                                                              if not native else "this CPU has native bf16 (AMX)"))
    modes, why = choose_modes("auto")
    assert modes == expected
    if not native:
        assert "fp32 only: this CPU has no native bf16 (AVX2)" in why and "--mode both" in why
    assert choose_modes("both")[0] == ("fp32", "bf16") and choose_modes("bf16")[0] == ("bf16",)


def test_benchmark_json_names_the_cpu_isa_and_native_bf16(monkeypatch, capsys):
    from benchmarks import benchmark
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {**machine_summary(), "threads": torch.get_num_threads()}
    monkeypatch.setattr(benchmark, "run_benchmark", fake_run)
    monkeypatch.setattr(speed, "device_bf16", lambda device: (False, "this CPU has no native bf16 (AVX2)"))
    benchmark.main(["--json"])
    import json
    out = capsys.readouterr()
    figures = json.loads(out.out)
    assert seen["modes"] == ("fp32",) and "measuring fp32 only" in out.err
    assert {"cpu", "isa", "native_bf16", "threads"} <= set(figures)
    assert figures["isa"] == torch.backends.cpu.get_cpu_capability()


def test_paste_figures_time_outputs_of_the_same_kind():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(10, 28, 28, generator=g)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 30.0]]).repeat(10, 1) + torch.rand(10, 4, generator=g) * 10
    figures = benchmark_paste(probs, boxes, (60, 80), repeats=1, device=torch.device("cpu"))
    assert figures["paste_speedup"] == figures["paste_tv_s"] / figures["paste_s"] > 0


def test_deploy_benchmark_names_the_machine_and_runs_bf16_only_where_native(monkeypatch, capsys):
    from benchmarks import benchmark_deploy, deploy_speed
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        variants = deploy_speed.deploy_variants(kwargs["modes"])
        return {"variants": list(variants), "image": [800, 1200], "detections": 100, "repeats": 1,
                "onnxruntime_op_shares": {"Conv": 0.6}, **machine_summary(),
                **{name: {"median_s": 1.0 + i, "min_s": 1.0 + i, "max_s": 1.0 + i} for i, name in enumerate(variants)}}
    monkeypatch.setattr(benchmark_deploy, "run_deploy_benchmark", fake_run)
    monkeypatch.setattr(speed, "device_bf16", lambda device: (False, "this CPU has no native bf16 (AVX2)"))
    benchmark_deploy.main([])
    out = capsys.readouterr()
    assert seen["modes"] == ("fp32",) and "measuring fp32 only" in out.err
    assert out.out.startswith(f"CPU {machine_summary()['cpu']}, ISA {torch.backends.cpu.get_cpu_capability()}, ")
    assert "| openvino f32 | 3.00 (3.00-3.00) | 0.33x |" in out.out and "bf16 |" not in out.out
    benchmark_deploy.main(["--mode", "both"])
    assert "| eager bf16 |" in capsys.readouterr().out


def test_stage_gflop_equal_torchvision_stage_by_stage():
    """The floor counts each stage's arithmetic where it runs: torchvision's own stages, counted the same
    way, do the same convolutions and matrix products (the same architecture, the same detections), but
    for the outputs our heads skip."""
    tv, ours = _small_models()
    images = sample_images(96, torch.device("cpu"), count=2)
    counts = {}
    for name, stages, model in (("ours", speed._our_stages, speed.prepare_for_inference(ours)),
                                ("tv", speed._torchvision_stages, tv.eval())):
        with torch.no_grad(), speed._FlopClock() as flops:
            stages(model, images, flops)
        counts[name] = flops.gflop
    conv = 2 * 2 * 48 * 72 * 3 * 64 * 7 * 7 / 1e9  # the stem alone: 2 images of 96 x 144, stride 2
    assert counts["ours"]["backbone_fpn"] > conv
    for stage in ("backbone_fpn", "rpn"):
        assert counts["ours"][stage] == pytest.approx(counts["tv"][stage], rel=1e-9), stage
    # ours skips outputs: the box deltas of the background class, the mask logits of undetected classes
    for stage in ("box_head", "mask_head"):
        assert 0.95 * counts["tv"][stage] <= counts["ours"][stage] < counts["tv"][stage], stage


def test_fusion_benchmark_times_both_paths_and_checks_their_detections():
    from benchmarks import fusion

    _, ours = _small_models()
    images = sample_images(96, torch.device("cpu"), count=2)
    figures = fusion.measure(speed.prepare_for_inference(ours), images, mode="fp32", repeats=1)
    assert figures["fused_same_label"] == 1.0 and figures["fused_min_box_iou"] >= 0.99
    assert figures["plain_same_label"] == 1.0 and figures["plain_min_box_iou"] == 1.0
    for part in fusion.PARTS:
        assert figures[f"{part}_ratio"] == figures[f"{part}_plain_s"] / figures[f"{part}_fused_s"]
        assert figures[f"{part}_fused_min_s"] <= figures[f"{part}_fused_s"] <= figures[f"{part}_fused_max_s"]
    report = fusion.format_report({f"fp32_{key}": value for key, value in figures.items()}, ["fp32"], "header")
    assert "fp32, detections against the plain fp32 ones:" in report and "  fused: 100.0% with equal labels" in report
    assert all(f"  {part}" in report for part in fusion.PARTS)
