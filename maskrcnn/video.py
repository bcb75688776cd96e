"""Video in, video out: read a clip's frames in batches, detect, write the overlay video and per-frame JSON.

    summary = detect_video(predictor, "clip.mp4", "output/clip", batch_size=4)
    # output/clip/clip.mp4: the overlay, same size and frame rate; output/clip/clip.jsonl: one line per frame

Frames are ``(H, W, 3)`` uint8 RGB arrays. Reading and writing go through OpenCV (``cv2.VideoCapture``, and
``cv2.VideoWriter`` with the ``mp4v`` codec, which OpenCV's pip wheels write without extra libraries). Each
output file is written under a temporary name and renamed when complete, so an interrupted run leaves no
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import cv2
import numpy as np
from tqdm import tqdm

from maskrcnn.errors import InputError
from maskrcnn.structures import Instances
from maskrcnn.visualize import draw_instances

# File name endings read as videos by tools/infer.py.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
FOURCC = "mp4v"  # MPEG-4 part 2: written by OpenCV's pip wheels with no system codec


class VideoReader:
    """The frames of a video file, in order, as ``(H, W, 3)`` uint8 RGB arrays.

    ``width``, ``height`` (pixels), ``fps`` (frames per second) and ``num_frames`` (the container's count,
    which can be approximate) are read on opening. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the file when OpenCV cannot open it or decode its first frame.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file not found: {self.path}")
        self._capture = cv2.VideoCapture(str(self.path))
        ok, first = self._capture.read() if self._capture.isOpened() else (False, None)
        if not ok or first is None:
            self._capture.release()
            raise InputError(f"cannot read video file {self.path}: not a video OpenCV decodes, or no frames")
        self._first = first
        self.height, self.width = first.shape[:2]
        self.fps = float(self._capture.get(cv2.CAP_PROP_FPS)) or 25.0
        self.num_frames = max(int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)), 1)

    def __iter__(self) -> Iterator[np.ndarray]:
        frame = self._first
        while frame is not None:
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            ok, frame = self._capture.read()
            frame = frame if ok else None

    def batches(self, size: int) -> Iterator[List[np.ndarray]]:
        """Lists of up to ``size`` consecutive frames."""
        if size < 1:
            raise InputError(f"batch size must be at least 1, got {size}")
        batch = []
        for frame in self:
            batch.append(frame)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        self._capture.release()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _temporary(path: Path) -> Path:
    """A temporary name beside ``path``, with its suffix (OpenCV picks the container by the suffix)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextlib.contextmanager
def _replaced_on_success(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` if the block succeeds, else removed."""
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class VideoWriter:
    """Write ``(H, W, 3)`` uint8 RGB frames of one size to a video file (``mp4v``), complete or not at all.

    Use as a context manager: the file appears under ``path`` when the block ends without an exception.
    Raises ``ValueError`` naming the file when OpenCV cannot open a writer or a frame has the wrong size.
    """

    def __init__(self, path: Union[str, Path], *, width: int, height: int, fps: float):
        self.path, self.size, self.fps = Path(path), (int(width), int(height)), float(fps)

    def __enter__(self) -> "VideoWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temporary(self.path)
        self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*FOURCC), self.fps, self.size)
        if not self._writer.isOpened():
            raise InputError(f"cannot write video file {self.path} with codec {FOURCC}")
        return self

    def write(self, frame: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` uint8 RGB frame of the video's size."""
        if frame.shape[:2] != self.size[::-1]:
            raise InputError(f"frame is {frame.shape[1]}x{frame.shape[0]}, video {self.path} is "
                             f"{self.size[0]}x{self.size[1]}")
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def __exit__(self, exc_type, *exc) -> None:
        self._writer.release()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)


def detect_video(predictor: Callable[[Sequence[np.ndarray]], List[Instances]], source: Union[str, Path],
                 output_dir: Union[str, Path], *, batch_size: int = 4, draw_thresh: Optional[float] = None,
                 progress: bool = True) -> dict:
    """Detect instances in every frame of a video; write the overlay video and one JSON line per frame.

    predictor: called with a list of RGB frames, returns one :class:`Instances` per frame (a
        :class:`~maskrcnn.predictor.Predictor`, whose score threshold decides what is kept); frames go to it
        ``batch_size`` at a time.
    draw_thresh: the overlay draws detections scoring at least this; None: the display threshold
        (:data:`~maskrcnn.config.DISPLAY_SCORE_THRESH`). It changes the picture only, not the JSON lines.
    Writes ``<output_dir>/<stem>.mp4`` (the detections drawn over their frame, coloured by class; same size
    and frame rate as the source) and ``<output_dir>/<stem>.jsonl``: per frame
    ``{"frame": n (from 0), "time_s": n / fps, "detections": [COCO result dicts, image_id = n, category_id =
    the model label, segmentation as COCO RLE]}``.
    Returns ``{"frames", "seconds", "frames_per_s", "video", "json"}``.
    """
    output_dir = Path(output_dir)
    draw = {} if draw_thresh is None else {"score_thresh": draw_thresh}
    with VideoReader(source) as reader:
        video_path, json_path = output_dir / f"{reader.path.stem}.mp4", output_dir / f"{reader.path.stem}.jsonl"
        start, frames = time.perf_counter(), 0
        with VideoWriter(video_path, width=reader.width, height=reader.height, fps=reader.fps) as writer, \
                _replaced_on_success(json_path) as json_tmp, open(json_tmp, "w", encoding="utf-8") as lines, \
                tqdm(total=reader.num_frames, desc="inference", unit="frame", disable=not progress) as bar:
            for batch in reader.batches(batch_size):
                for frame, instances in zip(batch, predictor(batch)):
                    writer.write(draw_instances(frame, instances, class_colors=True, **draw))
                    record = {"frame": frames, "time_s": frames / reader.fps, "detections": instances.to_coco(frames)}
                    lines.write(json.dumps(record) + "\n")
                    frames += 1
                bar.update(len(batch))
            lines.flush()
            os.fsync(lines.fileno())
    seconds = time.perf_counter() - start
    return {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds if seconds > 0 else 0.0,
            "video": video_path, "json": json_path}
