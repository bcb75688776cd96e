"""Video in, video out (maskrcnn.video, tools/infer.py on a clip): the overlay video keeps the frame count,
size and frame rate; one JSON line per frame, holding what the same tool writes for the frame as an image; an
unreadable file is a one-line error."""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from maskrcnn.cli import run
from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.video import VideoReader, VideoWriter
from maskrcnn.visualize import save_png
from tiny import save_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import infer as infer_tool  # noqa: E402

FRAMES, WIDTH, HEIGHT, FPS = 7, 96, 64, 12.0


def write_clip(path: Path) -> Path:
    """A generated clip of 7 frames, 96x64 at 12 frames/s: a square moving across a gradient, written by OpenCV."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    for n in range(FRAMES):
        frame = np.tile(np.linspace(40, 200, WIDTH, dtype=np.uint8)[None, :, None], (HEIGHT, 1, 3))
        frame[20:44, 8 + 8 * n:32 + 8 * n] = (30, 220, 90)
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "model.pth"
    save_tiny_checkpoint(path, ["a", "b", "c"])
    return path


def test_writer_and_reader_round_trip_size_rate_and_count(tmp_path):
    path = tmp_path / "out.mp4"
    with VideoWriter(path, width=WIDTH, height=HEIGHT, fps=FPS) as writer:
        for n in range(FRAMES):
            writer.write(np.full((HEIGHT, WIDTH, 3), 20 * n, dtype=np.uint8))
    with VideoReader(path) as reader:
        frames = list(reader)
        assert (reader.width, reader.height, reader.fps) == (WIDTH, HEIGHT, FPS)
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    assert np.abs(np.array([frame.mean() for frame in frames]) - 20 * np.arange(FRAMES)).max() < 6  # lossy, in order


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="frame is 10x10"):
        with VideoWriter(path, width=WIDTH, height=HEIGHT, fps=FPS) as writer:
            writer.write(np.zeros((10, 10, 3), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_infer_on_a_clip_writes_overlay_video_and_one_json_line_per_frame(tmp_path, checkpoint, capsys):
    clip = write_clip(tmp_path / "clip.mp4")
    run(infer_tool.main, ["--checkpoint", str(checkpoint), "--input", str(clip), "--output", str(tmp_path / "out"),
                          "--score-thresh", "0.0", "--batch-size", "3"])
    assert f"{FRAMES} frames" in capsys.readouterr().out
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (WIDTH, HEIGHT)
    assert capture.get(cv2.CAP_PROP_FPS) == FPS
    capture.release()
    records = [json.loads(line) for line in (tmp_path / "out" / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert records[2]["time_s"] == pytest.approx(2 / FPS)
    detections = [d for r in records for d in r["detections"]]
    assert detections, "a score threshold of 0 keeps the random model's detections"
    assert all(mask_utils.decode(d["segmentation"]).shape == (HEIGHT, WIDTH) for d in detections)


def test_a_clip_without_a_threshold_gives_per_frame_what_its_frames_give_as_images(tmp_path, checkpoint):
    """Without --score-thresh both paths keep what the model's own threshold keeps: each frame's JSON line holds
    exactly the detections that results.json holds for the frame written as a PNG (one frame per batch, so
    that both run the same computation)."""
    clip = write_clip(tmp_path / "clip.mp4")
    run(infer_tool.main, ["--checkpoint", str(checkpoint), "--input", str(clip), "--output", str(tmp_path / "video"),
                          "--batch-size", "1"])
    with VideoReader(clip) as reader:
        for n, frame in enumerate(reader):
            save_png(tmp_path / "frames" / f"{n:06d}.png", frame)
    run(infer_tool.main, ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "frames"),
                          "--output", str(tmp_path / "images")])
    results = json.loads((tmp_path / "images" / "results.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "video" / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(FRAMES))
    for record in records:
        assert record["detections"] == [r for r in results if r["image_id"] == record["frame"]]
    assert any(r["score"] < DISPLAY_SCORE_THRESH for r in results), "no detection tells the two thresholds apart"


@pytest.mark.parametrize("content", [b"", b"\x00\x01 not a video" * 100], ids=["empty", "garbage"])
def test_corrupt_video_is_a_one_line_error(tmp_path, checkpoint, capsys, content):
    clip = tmp_path / "broken.mp4"
    clip.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        run(infer_tool.main, ["--checkpoint", str(checkpoint), "--input", str(clip), "--output", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot read video file {clip}")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
