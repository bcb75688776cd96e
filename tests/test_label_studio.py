"""Pre-annotations through a real Label Studio server: a project with our labeling config, the tasks file
imported with its predictions through the API, the predictions made annotations by Label Studio's own action,
and the project exported by Label Studio's own converters (JSON, COCO for the polygons, BRUSH_TO_NUMPY for
the brush masks). Then the ML backend (maskrcnn/deploy/label_studio_backend.py) connected to a project:
Label Studio asks it for the predictions of local-file and uploaded images.

The server runs from .venv/annotation-tools (``bash tests/annotation_tools/setup.sh``), on the loopback
interface at a free port, with SQLite in the test's folder; it is stopped when the test ends."""

import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zipfile

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from preannotation_support import (AS_MASK, DETECTIONS, H, KEEP, KEPT, TOOLS_BIN, TOOLS_ENV, W, check_conversion,
                                   check_masks, make_predictions, requires_tools, write)
from serving import serve_app
from test_label_studio_backend import app_for, images, writer_predictions  # noqa: F401 (images: a fixture)
from maskrcnn.data.formats.label_studio import labeling_config, read_label_studio

pytestmark = [pytest.mark.slow, requires_tools]

START_TIMEOUT = 120  # seconds until the server answers, on a busy 2-core machine
TEMPLATE_DB = TOOLS_ENV / "label-studio-template" / "label_studio.sqlite3"  # built by setup.sh
TOKEN = "preannotation-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    """A Label Studio server started for one test; requests authenticate with the legacy API token, which
    ``--enable-legacy-api-token`` turns on for the organisation the start creates. It tells ML backends its
    own address (``LABEL_STUDIO_HOST``) and may connect one on loopback: ``ML_BLOCK_LOCAL_IP=false`` lets it
    call the backend, ``USE_DEFAULT_BANNED_SUBNETS=false`` lets it add the backend's webhook, whose check
    refuses loopback addresses otherwise."""

    def __init__(self, folder, document_root):
        self.url = f"http://127.0.0.1:{_free_port()}"
        (folder / "data").mkdir()
        shutil.copy(TEMPLATE_DB, folder / "data" / TEMPLATE_DB.name)  # migrated: the start skips the migrations
        env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(folder / "data"),
                   LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
                   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(document_root),
                   LABEL_STUDIO_HOST=self.url, LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
                   LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS="false",
                   LATEST_VERSION_CHECK="false", SENTRY_DSN="", COLLECT_ANALYTICS="false")  # no network
        self.log = open(folder / "label-studio.log", "wb")
        self.process = subprocess.Popen(
            [str(TOOLS_BIN / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1",
             "--port", self.url.rsplit(":", 1)[1], "--username", "test@example.com", "--password", "preannotate",
             "--user-token", TOKEN, "--enable-legacy-api-token"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=folder)
        self.log_path = folder / "label-studio.log"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"Label Studio did not serve /health within {START_TIMEOUT} s: "
                                     f"{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(1)

    def request(self, method: str, path: str, body=None, files=None) -> bytes:
        """``body`` sent as JSON, or ``files`` ({name: bytes}) as a multipart form."""
        data, kind = (json.dumps(body).encode() if body is not None else None), "application/json"
        if files is not None:
            boundary = uuid.uuid4().hex
            data = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                            f"Content-Type: image/png\r\n\r\n".encode() + content + b"\r\n"
                            for name, content in files.items()) + f"--{boundary}--\r\n".encode()
            kind = f"multipart/form-data; boundary={boundary}"
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Token {TOKEN}", "Content-Type": kind})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:2000]!r}") from None

    def json(self, method: str, path: str, body=None, files=None):
        return json.loads(self.request(method, path, body, files))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def label_studio(tmp_path):
    server = LabelStudio(tmp_path, tmp_path / "images")
    yield server
    server.stop()


def test_label_studio_imports_and_exports_the_predictions(tmp_path, label_studio):
    records, expected = make_predictions(tmp_path / "images")
    write("label-studio", records, tmp_path / "ls", model_version="shapes-v1")
    config = (tmp_path / "ls" / "labeling_config.xml").read_text()
    project = label_studio.json("POST", "/api/projects", {"title": "pre-annotations", "label_config": config})["id"]
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    imported = label_studio.json("POST", f"/api/projects/{project}/import", tasks)
    assert (imported["task_count"], imported["prediction_count"]) == (3, 2)

    done = label_studio.json("POST", f"/api/dm/actions?id=predictions_to_annotations&project={project}",
                             {"selectedItems": {"all": True, "excluded": []}})
    assert done["detail"] == "Created 2 annotations"
    assert label_studio.json("GET", f"/api/projects/{project}/model-versions/") == {"shapes-v1": 2}
    export = tmp_path / "export.json"
    export.write_bytes(label_studio.request("GET", f"/api/projects/{project}/export?exportType=JSON"))
    check_conversion(read_label_studio(export, image_dir=tmp_path / "images"), expected, label_studio=True)

    # Label Studio's own converters: the polygons to COCO (pixels), the brush masks decoded to arrays.
    kinds = [kind for name in DETECTIONS for kind in KEPT[name]]
    truth = [pair for image in expected for pair in image]
    as_mask = AS_MASK | {"two parts"}
    coco = json.loads(_export(label_studio, project, "COCO").read("result.json"))
    names = {category["id"]: category["name"] for category in coco["categories"]}
    polygons = [(names[a["category_id"]], mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
        a["segmentation"], H, W))).astype(bool)) for a in coco["annotations"]]
    polygon_truth = [pair for pair, kind in zip(truth, kinds) if kind not in as_mask]
    check_masks(polygons, polygon_truth, [False] * len(polygon_truth))

    arrays = _export(label_studio, project, "BRUSH_TO_NUMPY")
    brushes = {}  # (task id, label, index among the task's masks of that label) -> mask
    for member in arrays.namelist():  # task-<id>-annotation-<id>-by-<user>-brush-<label>-<index>.npy
        match = re.fullmatch(r"task-(\d+)-annotation-\d+-by-\d+-brush-(\w+)-(\d+)\.npy", member)
        assert match, member
        brushes[int(match[1]), match[2], int(match[3])] = np.load(io.BytesIO(arrays.read(member))) > 0
    mask_truth = {}  # the same keys, tasks numbered 1.. in import order
    for task_id, (name, image) in enumerate(zip(DETECTIONS, expected), start=1):
        for (label, mask), kind in zip(image, KEPT[name]):
            if kind in as_mask:
                mask_truth[task_id, label, sum(key[:2] == (task_id, label) for key in mask_truth)] = mask
    assert sorted(brushes) == sorted(mask_truth)
    for key, mask in mask_truth.items():
        np.testing.assert_array_equal(brushes[key], mask)


def _export(label_studio: LabelStudio, project: int, export_type: str) -> zipfile.ZipFile:
    """The project exported by Label Studio's converter ``export_type``, a zip file."""
    data = label_studio.request("GET", f"/api/projects/{project}/export?exportType={export_type}")
    return zipfile.ZipFile(io.BytesIO(data))


def test_label_studio_gets_predictions_from_the_ml_backend(tmp_path, images):  # noqa: F811 (the fixture)
    """A project whose tasks are local files and an upload; the backend connected through the API (Label
    Studio calls /health and /setup), then Label Studio's own action asks it for every task's prediction
    (/predict). The stored predictions are the pre-annotation writer's for the same detections."""
    folder, by_fill = images
    (tmp_path / "server").mkdir()
    label_studio = LabelStudio(tmp_path / "server", folder)
    try:
        app, calls = app_for(by_fill, folder)
        with serve_app(app) as (backend, _):
            project = label_studio.json("POST", "/api/projects", {"title": "backend",
                                                                  "label_config": labeling_config(KEEP)})["id"]
            local = [{"data": {"image": f"/data/local-files/?d={name}"}} for name in ("a.png", "empty.png")]
            label_studio.json("POST", f"/api/projects/{project}/import", local)
            label_studio.json("POST", f"/api/projects/{project}/import",
                              files={"b.png": (folder / "b.png").read_bytes()})
            connected = label_studio.json("POST", "/api/ml", {"project": project, "url": backend,
                                                              "title": "maskrcnn"})
            assert connected["state"] == "CO", connected  # connected: /health and /setup answered
            done = label_studio.json("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                                     {"selectedItems": {"all": True, "excluded": []}})
        assert done["detail"] == "Retrieved 3 predictions"
        assert calls == [3]  # the three tasks in one request, one batch
        tasks = json.loads(label_studio.request(
            "GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=true"))  # not annotated yet
        predictions = label_studio.json("GET", f"/api/predictions?project={project}")
    finally:
        label_studio.stop()
    expected = dict(zip(DETECTIONS, writer_predictions(folder, tmp_path)))
    names = {}  # task id -> image file name
    for task in tasks:
        url = task["data"]["image"]
        names[task["id"]] = url.rsplit("=", 1)[1] if "local-files" in url else url.rsplit("/", 1)[1].split("-", 1)[1]
        assert url.startswith("/data/upload/") == (names[task["id"]] == "b.png")
    read = {names[prediction["task"]]: prediction for prediction in predictions}
    assert len(read) == len(predictions) and all(p["model_version"] == "shapes-v1" for p in predictions)
    assert sorted(read) == sorted(DETECTIONS)
    for name, prediction in read.items():
        if expected[name] is None:
            assert prediction["result"] == [] and prediction["score"] is None
        else:
            assert prediction["result"] == expected[name]["result"]
            assert prediction["score"] == pytest.approx(expected[name]["score"])
