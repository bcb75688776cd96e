"""What the service tests share: a tiny model and its checkpoint, the service on a free loopback port (the
tool in a subprocess, or an app under uvicorn in a thread of the test), and PNG bytes of an array."""

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from maskrcnn.config import config_to_dict
from maskrcnn.predictor import Predictor
from tiny import tiny_config

ROOT = Path(__file__).parents[1]
CLASS_NAMES = ["circle", "square", "triangle"]


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_predictor(score_thresh: float = 0.2) -> Predictor:
    """The tiny random model of ``tests/tiny.py`` (seed 0), masks as RLE, as the service runs it."""
    torch.manual_seed(0)
    return Predictor(tiny_config(), None, class_names=CLASS_NAMES, score_thresh=score_thresh, mask_format="rle")


def write_checkpoint(predictor: Predictor, path: Path) -> Path:
    torch.save({"model": predictor.model.state_dict(), "config": config_to_dict(tiny_config()),
                "class_names": CLASS_NAMES}, path)
    return path


def get_json(url: str, token: Optional[str] = None, timeout: float = 10.0) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def serve_tool(args: List[str], token: Optional[str] = None) -> Iterator[str]:
    """``tools/serve.py ARGS`` on a free loopback port, this checkout's package first on the path; yields its
    base URL once ``/health`` answers (fails the test after 120 s) and stops it on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, str(ROOT / "tools/serve.py"), *args, "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            get_json(base + "/health", token, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the service did not start: {process.communicate()[1][-2000:]}")
            time.sleep(0.5)
    try:
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def serve_app(app) -> Iterator[Tuple[str, int]]:
    """``app`` under uvicorn in a thread of this process, on a free loopback port; yields (base URL, port)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
