"""``benchmarks/gpu_check.sh`` where no GPU is visible: it parses, and it stops at once with one line and a
non-zero status instead of running checks that need one."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_without_a_gpu_it_stops_with_one_line(tmp_path):
    """Run from another folder, with every GPU hidden (``CUDA_VISIBLE_DEVICES=""``): status 1, one line on
    stderr naming what is missing, nothing written."""
    out = tmp_path / "figures" / "gpu_check.txt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: no CUDA GPU visible to ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "figures").exists()
