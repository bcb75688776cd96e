"""docs/labelling-loop.md runs as written: every command of its fenced ``bash`` blocks, in order, in a fresh
process from the root of a copy of the repository, as tests/test_readme.py runs the README's. Only sizes
are shrunk, through the documented options (the table below); the demo model the guide starts from
(``make demo``, minutes) is stood in for by the demo configuration with random weights. The commands in
plain blocks (labelme's window, a CVAT or Label Studio server) are the reader's to run."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from maskrcnn.config import config_to_dict, load_config
from maskrcnn.data.shapes import CATEGORIES
from maskrcnn.modeling.maskrcnn import build_model
from test_readme import _environment, _matches, readme_commands, workdir  # noqa: F401 (workdir: a fixture)

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "labelling-loop.md"
DEMO_CONFIG = "configs/maskrcnn_R18_FPN_small.yaml"

# Command prefix -> documented options appended to it (later options and overrides win).
SHRUNK = {
    "python tools/make_shapes.py": "--num-val 4 --min-size 96 --max-size 128",
    "python tools/train.py": "solver.max_iter=2 solver.warmup_iters=1 solver.ims_per_batch=2 train.log_period=1",
}


def guide_commands():
    return [command for kind, command in readme_commands(GUIDE.read_text()) if kind == "bash"]


def test_the_guide_has_the_whole_loop():
    commands = guide_commands()
    assert [c.split()[1] for c in commands if c.startswith("python ")] == [
        "tools/make_shapes.py", "tools/infer.py", "tools/convert_dataset.py", "tools/train.py", "tools/infer.py",
        "tools/convert_dataset.py", "tools/check_dataset.py", "tools/train.py", "tools/eval.py"]
    for prefix in SHRUNK:
        assert any(command.startswith(prefix) for command in commands), prefix


@pytest.fixture(scope="module")
def loop_workdir(workdir):
    """test_readme's copy of the repository, and the stand-in demo model in it."""
    cfg = load_config(REPO / DEMO_CONFIG)
    torch.manual_seed(0)
    (workdir / "output" / "demo").mkdir(parents=True, exist_ok=True)
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                "class_names": [c["name"] for c in CATEGORIES], "iteration": 0},
               workdir / "output" / "demo" / "model_final.pth")
    return workdir


@pytest.mark.slow
def test_the_labelling_loop_runs_as_written(loop_workdir):
    workdir = loop_workdir
    for command in guide_commands():
        shrunk = _matches(command, SHRUNK)
        line = f"{command} {SHRUNK[shrunk]}" if shrunk else command
        done = subprocess.run(["bash", "-c", line], cwd=workdir, env=_environment(workdir), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, (f"guide command failed ({done.returncode}):\n{line}\n--- stdout\n"
                                      f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
    loop = workdir / "data" / "loop"
    batches = {batch: {f"{batch}/{p.name}" for p in (loop / batch).iterdir()} for batch in ("batch1", "batch2")}
    assert [len(names) for names in batches.values()] == [10, 10]
    first, both = ({image["file_name"] for image in json.loads((loop / f"labels_round{i}.json").read_text())["images"]}
                   for i in (1, 2))
    # the random stand-in finds nothing in some images: those have no objects to train on, and are left out
    assert first <= batches["batch1"] and first and both - first <= batches["batch2"] and both - first
    assert first <= both
    assert len(list((workdir / "output/loop/pre/labelme").glob("*.json"))) == 20
    metrics = json.loads((workdir / "output/loop/round2/eval/metrics.json").read_text())
    assert metrics["images"] == 4
