"""Pre-annotating a folder of 1,000 images with ``tools/infer.py --format labelme``: a progress bar runs while
it works, and nothing is written outside ``--output``: not beside the images, not in the working folder, the
home folder or the temporary folder, not in this repository."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from maskrcnn.config import config_to_dict
from maskrcnn.modeling.maskrcnn import build_model
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 1000


def smallest_checkpoint(path: Path) -> None:
    """The tiny model at its narrowest (32-48 px inputs, 8 stem channels, 3 detections per image), random
    weights: about 10 ms an image on one core."""
    cfg = tiny_config()
    m = cfg.model
    m.input.min_size, m.input.max_size = [32], 48
    m.backbone.width, m.backbone.fpn_channels = 8, 16
    m.roi_heads.box_head_dim, m.roi_heads.mask_head_dim, m.roi_heads.detections_per_img = 32, 8, 3
    torch.manual_seed(0)
    torch.save({"model": build_model(m).state_dict(), "config": config_to_dict(cfg),
                "class_names": ["circle", "square", "triangle"], "iteration": 0}, path)


def files_under(folder: Path) -> dict:
    """Every file under ``folder`` -> (size, modification time in ns)."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def repository_files() -> set:
    """The untracked and ignored files git lists where a stray write of the tool would land: the
    repository's root, ``tools/`` (the script's folder) and ``maskrcnn/`` (the package's), bytecode aside."""
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".",
                             ":(exclude)**/__pycache__/**"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    return {line[3:] for line in listed.splitlines()
            if line[:2] in ("??", "!!") and ("/" not in line[3:] or line[3:].startswith(("tools/", "maskrcnn/")))}


@pytest.mark.slow
def test_a_thousand_images_show_progress_and_write_only_into_the_output(tmp_path):
    photos, home, temporary, work, output = (tmp_path / name for name in ("photos", "home", "tmp", "work", "out"))
    for folder in (photos, home, temporary, work):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        cv2.imwrite(str(photos / f"img_{i:04d}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    smallest_checkpoint(tmp_path / "tiny.pth")
    before, repository = files_under(tmp_path), repository_files()

    env = dict(os.environ, HOME=str(home), TMPDIR=str(temporary), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, str(ROOT / "tools" / "infer.py"), "--checkpoint", str(tmp_path / "tiny.pth"),
               "--input", str(photos), "--output", str(output), "--format", "labelme", "--precision", "fp32"]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # tqdm redraws its bar as it goes (on a pipe, a carriage return before each redraw: a line in text mode)
    updates = [line for line in done.stderr.splitlines() if line.startswith("inference:")]
    assert len(updates) >= 3 and f"{IMAGES}/{IMAGES}" in updates[-1] and f"{IMAGES}/{IMAGES}" not in updates[0]
    assert f"labelme: {IMAGES} images" in done.stdout
    assert f"written: {IMAGES} files in {output / 'labelme'}" in done.stdout.splitlines()  # not 1,000 paths

    names = [f"img_{i:04d}" for i in range(IMAGES)]
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()) == sorted(
        ["results.json"] + [f"{n}.png" for n in names] + [f"labelme/{n}.json" for n in names])
    after = {path: stat for path, stat in files_under(tmp_path).items() if not path.is_relative_to(output)}
    assert after == before  # the images, the checkpoint, home, tmp and the working folder untouched
    assert repository_files() <= repository
