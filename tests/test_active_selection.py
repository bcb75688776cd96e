"""The active-selection benchmark: labelled subsets cut by name, the random strategy's draws, the summary and
its goal line, and a tiny run end to end that a rerun reuses."""

import json

import pytest

from benchmarks import active_selection
from benchmarks.active_selection import choose, goal, labelled_subset, run_benchmark, selection_table, summarize
from maskrcnn.errors import InputError
from test_trainer import tiny_overrides


def test_labelled_subset_keeps_the_named_images_and_their_annotations(tmp_path):
    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (5, 2, 9)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 9}, {"id": 2, "image_id": 2}, {"id": 3, "image_id": 5}]}
    source = tmp_path / "all.json"
    source.write_text(json.dumps(data))
    out = labelled_subset(source, ["9.jpg", "5.jpg"], tmp_path / "sub.json")
    assert json.loads(out.read_text()) == {**data, "images": [data["images"][0], data["images"][2]],
                                           "annotations": [{"id": 1, "image_id": 9}, {"id": 3, "image_id": 5}]}


def test_random_rounds_draw_from_one_permutation_per_seed_and_skip_the_labelled(tmp_path):
    pool = [f"{i}.jpg" for i in range(10)]
    common = dict(pool=pool, step=3, round_dir=tmp_path, previous_checkpoint=None, image_dir=tmp_path)
    first = choose("random", seed=0, labelled=["a.jpg"], **common)
    second = choose("random", seed=0, labelled=["a.jpg", *first], **common)
    assert len(first) == len(second) == 3 and not set(first) & set(second)
    assert choose("random", seed=0, labelled=["a.jpg"], **common) == first
    assert choose("random", seed=1, labelled=["a.jpg"], **common) != first
    assert not list(tmp_path.iterdir())  # the random strategy writes nothing


def runs_of(mask_aps: dict) -> list:
    """Runs for summarize: (strategy, round) -> mask AP per seed (seeds 0 and 1)."""
    return [{"strategy": strategy, "round": round_number, "seed": seed, "images": ["x"] * (10 + 5 * round_number),
             "rare_instances": 2 + round_number,
             "scores": {"trained": {"mask_ap": ap, "box_ap": ap / 2, "rare_mask_ap": ap / 4}}}
            for (strategy, round_number), values in mask_aps.items() for seed, ap in enumerate(values)]


def test_summary_pairs_the_strategies_by_seed():
    aps = {("select", 0): [0.2, 0.3], ("random", 0): [0.2, 0.3], ("select", 1): [0.5, 0.3],
           ("random", 1): [0.3, 0.35]}
    rows = summarize(runs_of(aps), seeds=[0, 1], rounds=1)
    assert [row["images"] for row in rows] == [10, 15]
    assert rows[1]["select"]["mask_ap"]["mean"] == pytest.approx(0.4)
    assert rows[1]["select"]["mask_ap"]["half_range"] == pytest.approx(0.1)
    assert rows[1]["difference"]["select"]["per_seed"] == pytest.approx([0.2, -0.05])
    assert rows[1]["difference"]["select"]["mean"] == pytest.approx(0.075)
    assert list(rows[1]["difference"]) == ["select"]
    table = selection_table(rows)
    assert "| 1 | 15 | 40.0 ± 10.0 | 32.5 ± 2.5 | 7.5 ± 12.5 |" in table


@pytest.mark.parametrize("select_aps, verdict", [
    ([0.4, 0.5, 0.5], "goal met: select reaches random's round-3 mask AP (50.0) at round 2; round-3 difference +0.0"),
    ([0.4, 0.45, 0.53], "goal met: select reaches random's round-3 mask AP (50.0) at round 3; round-3 difference +3.0"),
    ([0.4, 0.45, 0.52], "goal not met: select reaches random's round-3 mask AP (50.0) at round 3; round-3 "
                        "difference +2.0"),
    ([0.4, 0.45, 0.49], "goal not met: select reaches random's round-3 mask AP (50.0) at no round; round-3 "
                        "difference -1.0"),
])
def test_goal_is_met_a_round_earlier_or_by_three_points(select_aps, verdict):
    aps = {("select", 0): [0.6, 0.6], ("random", 0): [0.6, 0.6]}  # round 0 above the target does not count
    for round_number, (select_ap, random_ap) in enumerate(zip(select_aps, [0.4, 0.45, 0.5]), 1):
        aps[("select", round_number)] = [select_ap] * 2
        aps[("random", round_number)] = [random_ap] * 2
    assert goal(summarize(runs_of(aps), seeds=[0, 1], rounds=3)).startswith(verdict)


def test_an_unknown_ablation_is_an_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=r"--also: unknown \['entropy'\]"):
        run_benchmark(config=None, data_dir=tmp_path, output_dir=tmp_path, seeds=[0], iters=3, num_val=2, start=2,
                      step=1, rounds=1, pool_size=3, also=["entropy"])


@pytest.mark.slow
def test_tiny_benchmark_selects_trains_every_round_and_reuses_it(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    overrides = [o for o in tiny_overrides(data, out) if not o.startswith(("data.train_", "data.val_", "train.output"))]
    common = dict(config=None, data_dir=data, output_dir=out, seeds=[0], iters=3, num_val=2, start=2, step=1,
                  rounds=1, pool_size=3, also=["uncertainty"], overrides=overrides)
    result = run_benchmark(**common)
    runs = {(run["strategy"], run["round"]): run for run in result["runs"]}
    assert sorted(runs) == [(s, r) for s in ("random", "select", "uncertainty") for r in (0, 1)]
    scored = json.loads((out / "selections" / "uncertainty_round1_seed0" / "selection.json").read_text())["chosen"]
    assert scored[0]["path"].endswith(runs[("uncertainty", 1)]["images"][-1])
    assert "| mask AP select | mask AP random | mask AP uncertainty | select - random (paired) |" in \
        selection_table(result["rows"])
    assert runs[("select", 0)]["images"] == runs[("random", 0)]["images"] == ["000001.jpg", "000002.jpg"]
    chosen = (out / "selections" / "select_round1_seed0" / "selected.txt").read_text().splitlines()
    assert len(chosen) == 1 and runs[("select", 1)]["images"] == ["000001.jpg", "000002.jpg", chosen[0].split("/")[-1]]
    assert len(runs[("random", 1)]["images"]) == 3
    assert json.loads((out / "active_selection.json").read_text()) == json.loads(json.dumps(result))

    def no_training(cfg):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(active_selection, "train", no_training)
    monkeypatch.setattr(active_selection, "score_pool", no_training)
    assert run_benchmark(**common)["rows"] == result["rows"]
