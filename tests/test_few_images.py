"""The few-images benchmark: step times and scores read back and summarised, subsets cut, runs reused, and a
tiny run end to end."""

import json

import pytest

from benchmarks import few_images
from benchmarks.few_images import (SCORES, _load_scores, few_images_table, first_images, run_benchmark,
                                   step_times, summarize)
from maskrcnn.errors import InputError
from test_trainer import tiny_overrides


def test_step_times_average_the_second_half_weighted_by_iterations(tmp_path):
    records = [{"iteration": 10, "time": 9.0, "data_time": 5.0}, {"iteration": 20, "time": 8.0, "data_time": 4.0},
               {"iteration": 20, "segm": {"AP": 0.1}}, {"iteration": 30, "time": 1.0, "data_time": 0.1},
               {"iteration": 40, "time": 2.0, "data_time": 0.2}, {"iteration": 45, "time": 4.0, "data_time": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Half of 45 is 22.5: the windows (30, 40] and (40, 45] count; (20, 30] starts before it, and the
    # evaluation record has no time.
    assert step_times(tmp_path) == {"time": pytest.approx((10 * 2.0 + 5 * 4.0) / 15),
                                    "data_time": pytest.approx((10 * 0.2 + 5 * 0.4) / 15)}


def test_step_times_of_a_log_with_one_record_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 10, "time": 1.0, "data_time": 0.1}) + "\n")
    with pytest.raises(InputError, match="1 training records"):
        step_times(tmp_path)


def test_first_images_keeps_the_first_images_and_their_annotations_and_rewrites_only_on_change(tmp_path):
    data = {"images": [{"id": i} for i in (5, 2, 9)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 9}, {"id": 2, "image_id": 2}, {"id": 3, "image_id": 5}]}
    source = tmp_path / "all.json"
    source.write_text(json.dumps(data))
    out = first_images(source, 2, tmp_path / "sub" / "first2.json")
    assert json.loads(out.read_text()) == {**data, "images": [{"id": 5}, {"id": 2}],
                                           "annotations": [{"id": 2, "image_id": 2}, {"id": 3, "image_id": 5}]}
    written = out.stat().st_mtime_ns
    first_images(source, 2, out)
    assert out.stat().st_mtime_ns == written
    with pytest.raises(InputError, match="has 3 images, 4 asked for"):
        first_images(source, 4, out)


def _run(split, training, seed, trained, average, time=1.0):
    scores = {"trained": dict(zip(SCORES, trained)), "average": dict(zip(SCORES, average))}
    return {"split": split, "size": 100, "training": training, "seed": seed, "scores": scores,
            "step": {"time": time, "data_time": time / 10}}


def test_summary_gives_mean_half_range_and_the_change_from_the_baseline_paired_by_seed():
    runs = [_run("balanced", "flips", 0, (0.30, 0.40, 0.10, 0.20), (0.32, 0.41, 0.12, 0.22), time=1.0),
            _run("balanced", "flips", 1, (0.34, 0.44, 0.20, 0.30), (0.35, 0.45, 0.22, 0.31), time=3.0),
            _run("balanced", "lsj_cp_rfs", 0, (0, 0, 0, 0), (0.40, 0.50, 0.30, 0.35), time=2.0),
            _run("balanced", "lsj_cp_rfs", 1, (0, 0, 0, 0), (0.38, 0.46, 0.16, 0.30), time=2.0)]
    rows = summarize(runs, ["all", "ema", "baseline"], [100], [0, 1])
    assert [r["config"] for r in rows] == ["baseline", "ema", "all"]  # the order of CONFIGS
    baseline, ema, every = rows
    assert baseline["mask_ap"]["per_seed"] == [0.30, 0.34]
    assert baseline["mask_ap"]["mean"] == pytest.approx(0.32)
    assert baseline["mask_ap"]["half_range"] == pytest.approx(0.02)
    assert baseline["mask_ap"]["change"] == 0.0
    assert ema["rare_mask_ap"]["change"] == pytest.approx(0.02)  # the average of the same trainings
    assert every["mask_ap"]["change"] == pytest.approx(((0.40 - 0.30) + (0.38 - 0.34)) / 2)
    assert every["rare_mask_ap"]["change"] == pytest.approx(((0.30 - 0.10) + (0.16 - 0.20)) / 2)
    assert baseline["time"] == ema["time"] == pytest.approx(2.0) and every["data_time"] == pytest.approx(0.2)
    table = few_images_table(rows).splitlines()
    assert table[2] == "| balanced | 100 | baseline | 32.0 ± 2.0 | 42.0 ± 2.0 | 15.0 ± 5.0 | 2.000 (0.200) |"
    assert table[4] == "| balanced | 100 | all | 39.0 ± 1.0 (+7.0) | 48.0 ± 2.0 (+6.0) | 23.0 ± 7.0 (+8.0) | 2.000 (0.200) |"


def test_summary_without_the_baseline_gives_no_change():
    runs = [_run("long_tailed", "rfs", 0, (0.3, 0.4, 0.1, 0.2), (0.3, 0.4, 0.1, 0.2))]
    row, = summarize(runs, ["lt_rfs"], [100], [0])
    assert row["mask_ap"]["change"] is None
    assert few_images_table([row]).splitlines()[2].startswith("| long-tailed | 100 | lt_rfs | 30.0 ± 0.0 | 40.0")


def test_a_saved_run_is_reused_only_with_the_same_configuration_and_overrides(tmp_path):
    record = {"config": "a.yaml", "settings": ["solver.max_iter=300"], "scores": {}}
    (tmp_path / "scores.json").write_text(json.dumps(record))
    assert _load_scores(tmp_path, "a.yaml", ["solver.max_iter=300"]) == record
    assert _load_scores(tmp_path, "a.yaml", ["solver.max_iter=200"]) is None
    assert _load_scores(tmp_path, "b.yaml", ["solver.max_iter=300"]) is None
    assert _load_scores(tmp_path / "none", "a.yaml", []) is None


def test_unknown_configuration_or_size_is_an_error_naming_it(tmp_path):
    common = dict(config=None, data_dir=tmp_path, output_dir=tmp_path, seeds=[0], iters=20, num_val=2)
    with pytest.raises(InputError, match=r"unknown \['flip'\]"):
        run_benchmark(**common, sizes=[100], configs=["flip"])
    with pytest.raises(InputError, match=r"--sizes must be among \[50, 100, 200\], got \[30\]"):
        run_benchmark(**common, sizes=[30], configs=["baseline"])


@pytest.mark.slow
def test_tiny_benchmark_scores_both_models_of_one_training_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(few_images, "SIZES", (4,))
    data, out = tmp_path / "data", tmp_path / "out"
    overrides = [o for o in tiny_overrides(data, out) if not o.startswith(("data.train_", "data.val_", "train.output"))]
    common = dict(config=None, data_dir=data, output_dir=out, sizes=[4], seeds=[0], iters=4, num_val=2,
                  configs=["ema", "baseline"], overrides=overrides)
    result = run_benchmark(**common)
    assert [p.name for p in (out / "balanced_4").iterdir()] == ["flips_seed0"]  # one training for both
    run, = result["runs"]
    assert sorted(run["scores"]) == ["average", "trained"] and run["step"]["time"] > 0
    baseline, ema = result["rows"]
    for key in SCORES:
        assert baseline[key]["mean"] == run["scores"]["trained"][key]
        assert ema[key]["mean"] == run["scores"]["average"][key]
    assert json.loads((out / "few_images.json").read_text()) == json.loads(json.dumps(result))

    def no_training(cfg):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(few_images, "train", no_training)
    assert run_benchmark(**common)["rows"] == result["rows"]
