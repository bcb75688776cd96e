"""tools/infer.py on images: results.json holds every detection the model returns, the overlays draw those at the
display threshold (or --draw-thresh), and --format writes pre-annotations that read back as the detections."""

import json
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from maskrcnn.cli import run
from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.formats import read_labelme
from maskrcnn.predictor import Predictor, read_image
from maskrcnn.visualize import draw_instances, save_png
from tiny import save_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import infer as infer_tool  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    save_tiny_checkpoint(root / "model.pth", ["a", "b", "c"])
    rng = np.random.default_rng(0)
    for n in range(2):
        image = np.tile(np.linspace(30, 220, 96, dtype=np.uint8)[None, :, None], (64, 1, 3))
        image[10:50, 20 + 10 * n:70] = rng.integers(0, 255, 3, dtype=np.uint8)
        save_png(root / "images" / f"{n:06d}.png", image)
    return root


def _overlay(folder: Path, name: str) -> np.ndarray:
    return read_image(folder / f"{name}.png")


def test_overlays_draw_at_the_display_threshold_and_results_keep_everything(setup, tmp_path):
    run(infer_tool.main, ["--checkpoint", str(setup / "model.pth"), "--input", str(setup / "images"),
                          "--output", str(tmp_path / "out"), "--score-thresh", "0.0", "--precision", "fp32"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    predictor = Predictor.from_checkpoint(setup / "model.pth", score_thresh=0.0, precision="fp32")
    image = read_image(setup / "images" / "000000.png")
    instances = predictor(image)
    assert len([r for r in results if r["image_id"] == 0]) == len(instances) > 0
    assert any(r["score"] < DISPLAY_SCORE_THRESH for r in results), "no detection tells the thresholds apart"
    overlay = _overlay(tmp_path / "out", "000000")
    np.testing.assert_array_equal(overlay, draw_instances(image, instances))
    assert not np.array_equal(overlay, draw_instances(image, instances, score_thresh=None))

    run(infer_tool.main, ["--checkpoint", str(setup / "model.pth"), "--input", str(setup / "images"),
                          "--output", str(tmp_path / "all"), "--score-thresh", "0.0", "--draw-thresh", "0.0",
                          "--precision", "fp32"])
    np.testing.assert_array_equal(_overlay(tmp_path / "all", "000000"), draw_instances(image, instances, score_thresh=0.0))
    assert json.loads((tmp_path / "all" / "results.json").read_text()) == results


def test_format_labelme_writes_files_that_read_back_as_the_detections(setup, tmp_path, capsys):
    run(infer_tool.main, ["--checkpoint", str(setup / "model.pth"), "--input", str(setup / "images"),
                          "--output", str(tmp_path / "out"), "--score-thresh", "0.0", "--format", "labelme",
                          "--simplify", "0"])
    out = capsys.readouterr().out
    assert "labelme: 2 images" in out
    files = sorted((tmp_path / "out" / "labelme").glob("*.json"))
    assert [f.stem for f in files] == ["000000", "000001"]
    for file in files:
        assert (file.parent / json.loads(file.read_text())["imagePath"]).resolve() == \
            (setup / "images" / f"{file.stem}.png").resolve()
    conversion = read_labelme(tmp_path / "out" / "labelme", image_dir=setup / "images", class_names=["a", "b", "c"])
    written = sum(len(record.instances) for record in conversion.records)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    kept = [r for r in results if mask_utils.area(r["segmentation"]) > 0]
    assert written == len(kept) > 0


def test_format_on_a_video_is_a_one_line_error(setup, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        run(infer_tool.main, ["--checkpoint", str(setup / "model.pth"), "--input", str(clip),
                              "--output", str(tmp_path / "out"), "--format", "cvat"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --format writes pre-annotations of images; {clip} is a video"
