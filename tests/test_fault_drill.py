"""Fault drill: training killed with SIGKILL mid-step and in the middle of a checkpoint write, resumed each
time, ends with exactly the weights (trained and averaged) of an uninterrupted run; a corrupt checkpoint is
named and resume falls back to the previous good one."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.checkpoint import find_last_checkpoint, load_checkpoint
from test_trainer import tiny_overrides

REPO = Path(__file__).resolve().parents[1]

# Runs tools/train.py in this process with one fault armed: "step N" kills the process inside the N-th
# optimizer step of this run; "save N" writes half of the N-th checkpoint file of this run, then kills it.
RUNNER = """
import os, signal, sys
import torch
sys.path.insert(0, {tools!r})
import train as train_tool
from maskrcnn.cli import run

fault, count = sys.argv[1], int(sys.argv[2])
calls = [0]

def kill_on_call(original):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            if fault == "save":
                args[1].write(b"half a checkpoint")
                args[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapper

if fault == "step":
    torch.amp.GradScaler.step = kill_on_call(torch.amp.GradScaler.step)
elif fault == "save":
    torch.save = kill_on_call(torch.save)
run(train_tool.main, sys.argv[3:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("drill_data")
    generate_shapes(root, num_train=8, num_val=2, seed=0, min_size=64, max_size=96)
    return root


def _train(tmp_path: Path, data: Path, out: Path, fault: str = "none", count: int = 0):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(tools=str(REPO / "tools")))
    args = tiny_overrides(data, out, "solver.max_iter=6", "train.checkpoint_period=2", "train.log_period=2",
                          "solver.ema_decay=0.9")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(runner), fault, str(count), "--resume", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _final_weights(out: Path) -> dict:
    """The final checkpoint's weight average and trained weights, one dict, and the average's update count."""
    final = torch.load(out / "model_final.pth", weights_only=True)
    return {**{f"average {k}": v for k, v in final["model"].items()},
            **{f"trained {k}": v for k, v in final["raw_model"].items()},
            "updates": torch.tensor(final["ema_updates"])}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = _train(tmp, data, tmp / "out")
    assert result.returncode == 0, result.stderr
    return _final_weights(tmp / "out")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.mark.slow
def test_killed_mid_step_and_mid_checkpoint_write_resumes_to_the_same_weights(tmp_path, data, uninterrupted):
    out = tmp_path / "out"
    killed = _train(tmp_path, data, out, "step", 3)  # inside iteration 3's optimizer step
    assert killed.returncode == -signal.SIGKILL
    assert find_last_checkpoint(out).name == "model_0000002.pth"
    killed = _train(tmp_path, data, out, "save", 1)  # resumed at 2; dies writing model_0000004.pth
    assert killed.returncode == -signal.SIGKILL
    assert find_last_checkpoint(out).name == "model_0000002.pth" and not (out / "model_0000004.pth").exists()
    finished = _train(tmp_path, data, out)
    assert finished.returncode == 0, finished.stderr
    assert "resuming from" in finished.stdout and "model_0000002.pth at iteration 2" in finished.stdout
    _assert_same_weights(_final_weights(out), uninterrupted)


@pytest.mark.slow
def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, data, uninterrupted):
    out = tmp_path / "out"
    killed = _train(tmp_path, data, out, "step", 5)  # checkpoints 2 and 4 written, killed in iteration 5
    assert killed.returncode == -signal.SIGKILL and find_last_checkpoint(out).name == "model_0000004.pth"
    good = (out / "model_0000004.pth").read_bytes()
    (out / "model_0000004.pth").write_bytes(good[: len(good) // 2])  # truncated on disk
    with pytest.raises(ValueError, match=r"model_0000004\.pth is not a readable checkpoint"):
        load_checkpoint(out / "model_0000004.pth", torch.nn.Linear(1, 1))
    finished = _train(tmp_path, data, out)
    assert finished.returncode == 0, finished.stderr
    assert "skipping model_0000004.pth:" in finished.stdout
    assert "resuming from" in finished.stdout and "model_0000002.pth at iteration 2" in finished.stdout
    _assert_same_weights(_final_weights(out), uninterrupted)
