"""Command-line tools: an error a user can fix is one line, ``error: <message>``, with exit status 2 and no
traceback (``--debug`` shows it); bad data fails in the up-front check, naming the file and ids."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.cli import one_line, run
from maskrcnn.config import config_to_dict
from maskrcnn.data.annotation_cache import cache_path
from maskrcnn.errors import InputError, MissingPackageError
from maskrcnn.modeling.maskrcnn import build_model
from test_coco_dataset import BAD_ANNOTATIONS, BAD_COMPRESSED_RLE, _tiny_coco, _write
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import eval as eval_tool  # noqa: E402
import train as train_tool  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model for the three categories of the hand-written COCO set (names a, b, c)."""
    path = tmp_path_factory.mktemp("cli") / "model.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(tiny_config().model).state_dict(), "config": config_to_dict(tiny_config()),
                "class_names": ["b", "a", "c"], "iteration": 0}, path)
    return path


def _error_line(capsys, main, argv) -> str:
    """Run a tool as its ``__main__`` does; return its error line (the last line of standard error, after
    any progress bar) after checking exit status 2 and that nothing else reports an error."""
    with pytest.raises(SystemExit) as info:
        run(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and "Traceback" not in err
    lines = err[:-1].split("\n")
    assert lines[-1].startswith("error: ") and err.count("error") == lines[-1].count("error"), err
    return lines[-1]


def _malformed_sets():
    """Fifteen malformed COCO sets: every bad annotation kind, bad compressed RLE, and bad image files."""
    cases = {}
    for reason, change in BAD_ANNOTATIONS.items():
        cases[reason] = (lambda data, change=change: data["annotations"][0].update(change), "annotation id 10")
    for name, (counts, _) in BAD_COMPRESSED_RLE.items():
        cases[name] = (lambda data, counts=counts: data["annotations"][1].update(
            {"segmentation": {"size": [40, 60], "counts": counts}}), "annotation id 11")
    cases["unknown image id"] = (lambda data: data["annotations"][0].update({"image_id": 99}), "annotation id 10")
    return cases


MALFORMED = _malformed_sets()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_eval_on_malformed_coco_prints_one_line_naming_file_and_id(tmp_path, capsys, checkpoint, case):
    data = _tiny_coco()
    change, expected_id = MALFORMED[case]
    change(data)
    ann_file, image_dir = _write(tmp_path, data)
    line = _error_line(capsys, eval_tool.main, ["--checkpoint", str(checkpoint), "--ann", str(ann_file),
                                                "--images", str(image_dir), "--num-workers", "0"])
    assert str(ann_file) in line and expected_id in line


def test_image_of_another_size_than_the_json_says_fails_before_inference(tmp_path, capsys, checkpoint):
    ann_file, image_dir = _write(tmp_path, _tiny_coco())
    ann_file.write_text(ann_file.read_text().replace('"height": 30, "width": 30', '"height": 30, "width": 31'))
    line = _error_line(capsys, eval_tool.main, ["--checkpoint", str(checkpoint), "--ann", str(ann_file),
                                                "--images", str(image_dir), "--output", str(tmp_path / "out")])
    assert line == (f"error: 1 bad image file: image file {image_dir / 'three.png'} (image id 3) is 30x30 (WxH) but "
                    f"{ann_file} gives 31x30")
    assert not (tmp_path / "out").exists()


def test_missing_images_fail_before_inference(tmp_path, capsys, checkpoint):
    ann_file, image_dir = _write(tmp_path, _tiny_coco())
    (image_dir / "two.png").unlink()
    (image_dir / "four.png").unlink()
    line = _error_line(capsys, eval_tool.main, ["--checkpoint", str(checkpoint), "--ann", str(ann_file),
                                                "--images", str(image_dir), "--output", str(tmp_path / "out")])
    assert line.startswith("error: 2 bad image files")
    assert "two.png not found (image id 2" in line and "four.png not found (image id 4" in line
    assert not (tmp_path / "out").exists()  # nothing was run


def test_wrong_checkpoint_is_one_line(tmp_path, capsys):
    ann_file, image_dir = _write(tmp_path, _tiny_coco(), images=False)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    line = _error_line(capsys, eval_tool.main, ["--checkpoint", str(tmp_path / "nothere.pth"), "--ann", str(ann_file),
                                                "--images", str(image_dir)])
    assert "nothere.pth" in line


def test_bad_override_names_the_key_meant(capsys):
    line = _error_line(capsys, train_tool.main, ["--config", "configs/maskrcnn_R18_FPN_small.yaml",
                                                 "backbone.pretrained=false"])
    assert line == ("error: bad override 'backbone.pretrained=false': unknown key 'backbone.pretrained'; "
                    "did you mean model.backbone.pretrained?")


def test_eval_override_of_the_checkpoints_config_names_the_key_meant(capsys, checkpoint, tmp_path):
    line = _error_line(capsys, eval_tool.main, ["--checkpoint", str(checkpoint), "--ann", str(tmp_path / "a.json"),
                                                "--images", str(tmp_path), "model.input.min_size_testt=96"])
    assert line.startswith("error: bad override 'model.input.min_size_testt=96': unknown key "
                           "'model.input.min_size_testt'; did you mean model.input.min_size_test")


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="bad override"):
        run(train_tool.main, ["--debug", "model.input.max_size=abc"])


def test_tool_run_as_a_script_prints_one_line_and_exits_2():
    result = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/maskrcnn_R18_FPN_small.yaml",
                             "model.input.min_size=[]"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: model.input.min_size must be a non-empty list of positive sizes, got []\n"


def test_fault_keeps_its_traceback(capsys):
    def main(argv):
        np.zeros(3).reshape(2, 2)  # a ValueError from inside numpy: a defect, not the user's input

    with pytest.raises(ValueError, match="cannot reshape"):
        run(main, [])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [InputError("bad value in x.yaml\n  expected y"), FileNotFoundError("no x.json"),
                                   MissingPackageError("needs the z package: pip install z")])
def test_input_error_is_one_line_with_exit_2(capsys, error):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as info:
        run(main, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {one_line(error)}\n" and "\n" not in one_line(error)


def test_warnings_are_one_line():
    script = ("import warnings; from maskrcnn.cli import run; "
              "run(lambda argv: warnings.warn('annotation cache x is damaged (cut short); rebuilding it'), [])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stderr == "warning: annotation cache x is damaged (cut short); rebuilding it\n"


def test_eval_puts_the_annotation_cache_where_asked(tmp_path, checkpoint):
    ann_file, image_dir = _write(tmp_path, _tiny_coco())
    run(eval_tool.main, ["--checkpoint", str(checkpoint), "--ann", str(ann_file), "--images", str(image_dir),
                         "--num-workers", "0", "--output", str(tmp_path / "out"),
                         "--annotation-cache-dir", str(tmp_path / "cache")])
    assert cache_path(ann_file, tmp_path / "cache").is_file() and not cache_path(ann_file).exists()
