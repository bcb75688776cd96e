"""The transfer comparison: AP and minutes read back from the training logs, and a tiny run end to end."""

import json

import pytest
import torch

from benchmarks import transfer, transfer_demo
from benchmarks.transfer import evaluation_progress, transfer_table
from maskrcnn.cli import run
from maskrcnn.data.shapes import NOVEL_CATEGORIES
from maskrcnn.engine.checkpoint import save_checkpoint
from maskrcnn.modeling.maskrcnn import build_model
from test_trainer import tiny_overrides


def _eval(iteration, mask_ap, box_ap):
    return {"iteration": iteration, "segm": {"AP": mask_ap}, "bbox": {"AP": box_ap}, "images": 4}


def test_progress_sums_training_time_up_to_each_evaluation(tmp_path):
    records = [{"iteration": 10, "total_loss": 2.0, "time": 0.6}, {"iteration": 20, "total_loss": 1.5, "time": 1.2},
               _eval(20, 0.1, 0.2), {"iteration": 25, "total_loss": 1.0, "time": 2.4}, _eval(25, 0.3, 0.4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    progress = evaluation_progress(tmp_path)
    assert progress == [{"iteration": 20, "minutes": pytest.approx(18 / 60), "mask_ap": 0.1, "box_ap": 0.2},
                        {"iteration": 25, "minutes": pytest.approx(30 / 60), "mask_ap": 0.3, "box_ap": 0.4}]
    table = transfer_table({"scratch": progress, "weights": progress})
    assert table.splitlines()[2] == "| 20 | 0.100 / 0.200 | 0.3 | 0.100 / 0.200 | 0.3 |"


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run(transfer_demo.main, ["--checkpoint", str(tmp_path / "none.pth"), "--output", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1


@pytest.mark.slow
def test_tiny_comparison_runs_both_trainings_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "NUM_TRAIN", 4)
    monkeypatch.setattr(transfer, "NUM_VAL", 2)
    data, out = tmp_path / "novel", tmp_path / "out"
    overrides = [o for o in tiny_overrides(data, out)
                 if not o.startswith(("data.train_", "data.val_", "train.output_dir"))]
    cfg = transfer.load_config(None, overrides)
    torch.manual_seed(0)
    source = save_checkpoint(tmp_path / "demo.pth", model=build_model(cfg.model), iteration=100, config=cfg,
                             class_names=["square", "circle", "triangle"])
    results = transfer.compare_transfer(config=None, checkpoint=source, data_dir=data, output_dir=out, max_iter=2,
                                        eval_period=1, overrides=overrides)
    assert [p["iteration"] for p in results["scratch"]] == [1, 2] == [p["iteration"] for p in results["weights"]]
    assert json.loads((out / "transfer.json").read_text()) == results
    summary = json.loads((out / "weights" / "weights_summary.json").read_text())
    assert summary["classes_fresh"] == [c["name"] for c in NOVEL_CATEGORIES]
    assert not (out / "scratch" / "weights_summary.json").exists()
