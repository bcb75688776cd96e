"""The edge comparison (benchmarks/edges.py): the table, and a tiny run end to end; and the pieces of the refined
head's cost benchmark (benchmarks/refine_cost.py) that decide what it compares."""

import json

import pytest
import torch

from benchmarks import edges
from benchmarks.edges import compare_refinement, edges_table
from benchmarks.refine_cost import refined_twin, spread
from maskrcnn.config import load_config
from maskrcnn.data.shapes import EDGE_CATEGORIES
from maskrcnn.fileio import read_checkpoint
from maskrcnn.modeling.maskrcnn import build_model
from test_trainer import tiny_overrides


def test_table_gives_both_heads_and_their_difference():
    run = {"mask_ap": 0.25, "mask_ap75": 0.2, "boundary_ap": 0.02, "boundary_ap75": 0.0, "box_ap": 0.6,
           "train_minutes": 4.0}
    table = edges_table({"plain": run, "refined": {**run, "boundary_ap": 0.125, "train_minutes": 4.5}})
    lines = table.splitlines()
    assert lines[0] == "| | plain 28 x 28 | point-refined | refined - plain |"
    assert "| Boundary AP | 0.020 | 0.125 | +0.105 |" in lines
    assert "| mask AP | 0.250 | 0.250 | +0.000 |" in lines


@pytest.mark.slow
def test_tiny_comparison_trains_both_heads_from_one_start_and_evaluates_them(tmp_path, monkeypatch):
    """A start of 2 iterations with the plain head, then 2 of each head from it: the refined run loads every tensor
    of the start and adds its point head; both are evaluated with Boundary AP; edges.json holds what was returned."""
    monkeypatch.setattr(edges, "NUM_TRAIN", 4)
    monkeypatch.setattr(edges, "NUM_VAL", 2)
    monkeypatch.setattr(edges, "IMAGE_SIDES", (96, 128))
    monkeypatch.setattr(edges, "EDGE_SETTINGS", ())
    data, out = tmp_path / "edges", tmp_path / "out"
    overrides = [o for o in tiny_overrides(data, out) if not o.startswith(("data.train_", "data.val_",
                                                                            "train.output_dir"))]
    results = compare_refinement(config=None, data_dir=data, output_dir=out, base_iter=2, max_iter=2,
                                 overrides=overrides)
    assert json.loads((data / "annotations" / "instances_val.json").read_text())["categories"] == EDGE_CATEGORIES
    assert json.loads((out / "edges.json").read_text()) == json.loads(json.dumps(results))
    assert results["start"] == str(out / "base" / "model_final.pth")
    for name in ("plain", "refined"):
        assert 0 <= results[name]["boundary_ap"] <= 1 and 0 <= results[name]["mask_ap"] <= 1
        summary = json.loads((out / name / "weights_summary.json").read_text())
        assert summary["source"] == results["start"] and not summary["classes_fresh"]
    start = read_checkpoint(out / "base" / "model_final.pth")["model"]
    refined = read_checkpoint(out / "refined" / "model_final.pth")["model"]
    plain = read_checkpoint(out / "plain" / "model_final.pth")["model"]
    assert not any("point_head" in key for key in plain)
    assert {key for key in refined if "point_head" not in key} == set(start)


def test_the_refined_twin_is_the_plain_model_with_a_point_head():
    cfg = load_config(None, [o for o in tiny_overrides(".", ".") if o.startswith("model.")])
    torch.manual_seed(0)
    plain = build_model(cfg.model).eval()
    twin = refined_twin(plain, cfg.model)
    assert twin.roi_heads.point_head is not None and not twin.training and plain.roi_heads.point_head is None
    assert all(torch.equal(value, twin.state_dict()[key]) for key, value in plain.state_dict().items())


def test_spread_compares_each_round_and_the_fastest_rounds():
    figures = spread({"plain": [2.0, 1.0, 4.0], "refined": [2.2, 1.3, 4.2]}, "e2e")
    assert figures["e2e_plain_s"] == 2.0 and figures["e2e_refined_min_s"] == 1.3
    assert figures["e2e_extra"] == pytest.approx(0.1) and figures["e2e_extra_max"] == pytest.approx(0.3)
    assert figures["e2e_extra_min"] == pytest.approx(0.05) and figures["e2e_extra_best"] == pytest.approx(0.3)
