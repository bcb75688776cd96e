"""tools/serve.py's options reach the service it starts: the app its ``main`` builds from a command line, run
here on a free loopback port in place of ``uvicorn.run``, holds at most ``--max-queue`` requests, gives each
``--timeout`` seconds and batches as ``--max-batch-size`` and ``--max-wait-ms`` say."""

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maskrcnn.deploy.serve import post_image
from serving import get_json, png_bytes, serve_app, tiny_predictor, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import serve as serve_tool  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tiny_predictor(), tmp_path_factory.mktemp("serve_tool") / "model.pth")


def tool_app(monkeypatch, checkpoint, *options: str):
    """The app of ``tools/serve.py --checkpoint CHECKPOINT OPTIONS``: the tool's main runs as on the command
    line up to ``uvicorn.run``, which hands the app over here instead of serving it."""
    handed = []
    monkeypatch.setattr(serve_tool.uvicorn, "run", lambda app, **where: handed.append(app))
    serve_tool.main(["--checkpoint", str(checkpoint), *options])
    (app,) = handed
    return app


def stalled_upload(port: int) -> socket.socket:
    """A ``POST /predict`` whose headers arrive and whose body never does: it holds a place in the service."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b0\r\n"
                 b"Content-Length: 5000\r\n\r\n")
    return sock


def test_the_service_holds_at_most_max_queue_requests(monkeypatch, checkpoint):
    app = tool_app(monkeypatch, checkpoint, "--max-batch-size", "1", "--max-queue", "1")
    with serve_app(app) as (base, port):
        held = stalled_upload(port)
        deadline = time.monotonic() + 10
        while get_json(base + "/health")["held"] < 1:
            assert time.monotonic() < deadline, "the stalled upload never took its place"
            time.sleep(0.05)
        status, body = post_image(base + "/predict", png_bytes(np.zeros((40, 40, 3), np.uint8)))
        held.close()
        refused = get_json(base + "/health")["refused"]
    assert status == 503 and json.loads(body)["detail"].startswith("the service holds 1 requests already")
    assert refused == 1


def test_each_request_has_the_tools_timeout(monkeypatch, checkpoint):
    app = tool_app(monkeypatch, checkpoint, "--timeout", "1")
    with serve_app(app) as (base, port):
        sent = time.monotonic()
        sock = stalled_upload(port)
        sock.settimeout(10)  # far below the service's default timeout: only the tool's 1 s answers in time
        answer = b""
        while chunk := sock.recv(65536):  # until the service closes the connection
            answer += chunk
        waited = time.monotonic() - sent
        sock.close()
        timed_out = get_json(base + "/health")["timed_out"]
    assert answer.startswith(b"HTTP/1.1 408") and b"the upload did not arrive within 1.0 s" in answer, answer[:300]
    assert waited >= 1 and timed_out == 1


def test_the_service_batches_as_the_tool_says(monkeypatch, checkpoint):
    app = tool_app(monkeypatch, checkpoint, "--max-batch-size", "2", "--max-wait-ms", "5", "--max-queue", "3")
    with serve_app(app) as (base, _):
        stats = get_json(base + "/health")
    assert (stats["max_batch_size"], stats["max_wait_ms"], stats["max_queue"]) == (2, 5.0, 3)
