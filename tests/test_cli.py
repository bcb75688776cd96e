"""Command-line tools: an error a user can fix is one line, ``error: <message>``, with exit status 2 and no
traceback (``--debug`` shows it); bad data fails in the up-front check, naming the file and ids."""

import ast
import errno
import os
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
import analyze as analyze_tool  # noqa: E402
import eval as eval_tool  # noqa: E402
import explain as explain_tool  # noqa: E402
import export as export_tool  # noqa: E402
import infer as infer_tool  # noqa: E402
import load_test as load_test_tool  # noqa: E402
import serve as serve_tool  # noqa: E402
import train as train_tool  # noqa: E402
from serving import free_port  # noqa: E402


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


# Bad options and option combinations of every tool: (tool, its arguments, the error line). ``{ckpt}`` is the
# tiny checkpoint, ``{ann}``/``{images}`` the hand-written COCO set, ``{out}`` a fresh folder, ``{port}`` a
# loopback port where nothing listens and ``{refused}`` what the system says when a connection is refused there.
BAD_OPTIONS = {
    "analyze without a model or results": (
        analyze_tool, "--ann {ann} --images {images} --output {out}",
        "error: give --checkpoint (to run the model) or --results (a results json)"),
    "analyze of a training split without its results": (
        analyze_tool, "--results {ann} --ann {ann} --images {images} --output {out} --train-ann {ann}",
        "error: --train-ann needs --train-results, or --checkpoint with --train-images"),
    "analyze with batches of 0": (
        analyze_tool, "--checkpoint {ckpt} --ann {ann} --images {images} --output {out} --batch-size 0",
        "error: --batch-size must be at least 1, got 0"),
    "eval with batches of 0": (
        eval_tool, "--checkpoint {ckpt} --ann {ann} --images {images} --output {out} --batch-size 0",
        "error: --batch-size must be at least 1, got 0"),
    "eval with -1 workers": (
        eval_tool, "--checkpoint {ckpt} --ann {ann} --images {images} --output {out} --num-workers -1",
        "error: --num-workers must be at least 0, got -1"),
    "explain of an image without its annotations": (
        explain_tool, "--checkpoint {ckpt} --image {images}/one.png --output {out}",
        "error: --image needs --ann"),
    "explain of 0 RoIs": (
        explain_tool, "--checkpoint {ckpt} --image {images}/one.png --ann {ann} --output {out} --num-rois 0",
        "error: --num-rois must be at least 1, got 0"),
    "export calibrated on 0 images": (
        export_tool, "--checkpoint {ckpt} --output {out}/model.onnx --int8-calibration {images} --calibration-count 0",
        "error: --calibration-count must be at least 1, got 0"),
    "infer with batches of 0": (
        infer_tool, "--checkpoint {ckpt} --input {images} --output {out} --batch-size 0",
        "error: --batch-size must be at least 1, got 0"),
    "infer into a file": (
        infer_tool, "--checkpoint {ckpt} --input {images}/one.png --output {ann}",
        "error: [Errno 17] File exists: '{ann}'"),
    "infer with a checkpoint that is not one": (
        infer_tool, "--checkpoint {ann} --input {images}/one.png --output {out}",
        "error: {ann} is not a readable checkpoint: {unpickling}"),
    "infer on a device that does not exist": (
        infer_tool, "--checkpoint {ckpt} --input {images}/one.png --output {out} --device gpu",
        "error: device 'gpu' is not a device name ('cpu', 'cuda' or 'cuda:N'): {bad_device}"),
    "eval on a GPU this machine lacks": (
        eval_tool, "--checkpoint {ckpt} --ann {ann} --images {images} --output {out} --device cuda:7",
        "{no_gpu}"),
    "serve on a port that does not exist": (
        serve_tool, "--checkpoint {ckpt} --port 65536",
        "error: --port must lie in 0..65535, got 65536"),
    "load test of a service that is not there": (
        load_test_tool, "--url http://127.0.0.1:{port} --image {images}/one.png --concurrency 1 --requests 1",
        "error: no service answers at http://127.0.0.1:{port}/predict: {refused}"),
    "load test from 0 clients": (
        load_test_tool, "--url http://127.0.0.1:{port} --image {images}/one.png --concurrency 0",
        "error: concurrency must be at least 1, got 0"),
    "load test of 0 requests": (
        load_test_tool, "--url http://127.0.0.1:{port} --image {images}/one.png --requests 0",
        "error: requests must be at least 1, got 0"),
    "load test of 0 seconds": (
        load_test_tool, "--url http://127.0.0.1:{port} --image {images}/one.png --max-seconds 0",
        "error: max_seconds must be > 0, got 0.0"),
}


def _torch_load_error(path) -> str:
    """What torch.load says of a file that is not a checkpoint (its message varies between releases)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the message is what the tool's line must carry
        return one_line(exc)
    raise AssertionError(f"{path} loads as a checkpoint")


def _device_error(name: str) -> str:
    try:
        torch.device(name)
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError(f"{name!r} is a device")


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_of_every_tool_are_one_line(tmp_path, capsys, checkpoint, case):
    tool, args, expected = BAD_OPTIONS[case]
    ann_file, image_dir = _write(tmp_path, _tiny_coco())
    names = {"ckpt": checkpoint, "ann": ann_file, "images": image_dir, "out": tmp_path / "out", "port": free_port(),
             "refused": ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)),
             "unpickling": _torch_load_error(ann_file), "bad_device": _device_error("gpu"),
             "no_gpu": ("error: device 'cuda:7': no CUDA GPU is available on this machine; use 'cpu'"
                        if not torch.cuda.is_available() else
                        f"error: device 'cuda:7': this machine has {torch.cuda.device_count()} CUDA GPU(s)")}
    assert _error_line(capsys, tool.main, args.format(**names).split()) == expected.format(**names)


def test_tools_raise_only_errors_a_user_can_fix():
    """What a tool raises itself is an InputError or a missing file (one line through ``run``), and it checks
    option combinations itself rather than through argparse's ``parser.error`` (usage, then a second line)."""
    allowed = {"InputError", "FileNotFoundError", "SystemExit"}
    found = []
    for path in sorted((REPO / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if not (isinstance(exc, ast.Name) and exc.id in allowed):
                    found.append(f"{path.name}:{node.lineno}: raise {ast.unparse(node.exc)}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "error":
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)
