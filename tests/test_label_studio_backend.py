"""The Label Studio ML backend (maskrcnn/deploy/label_studio_backend.py) answered as Label Studio calls it:
``/setup`` and ``/predict`` with the bodies Label Studio's ``MLApi`` sends (label_studio/ml/api_connector.py),
over HTTP on a loopback port. Its predictions are those the pre-annotation writer puts in tasks.json for the
same detections; images are read from the local-files root or fetched from Label Studio with the token that
``/setup`` gave. tests/test_label_studio.py connects it to a real Label Studio server."""

import base64
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from preannotation_support import CLASSES, DETECTIONS, H, KEEP, SCORE_THRESH, W, instances, write
from serving import get_json, serve_app, serve_tool, tiny_predictor, write_checkpoint
from maskrcnn.data.formats.label_studio import labeling_config
from maskrcnn.deploy.label_studio_backend import create_label_studio_app, labeling_target
from maskrcnn.errors import InputError

FILLS = dict(zip(DETECTIONS, (60, 90, 120)))  # each image's grey level: how the stand-in model knows it
PROJECT = "7.1700000000"  # Label Studio's project uid: "<id>.<created_at timestamp>"


@pytest.fixture
def images(tmp_path):
    """The images of DETECTIONS in tmp_path/images, each its own grey, and their detections by grey."""
    folder = tmp_path / "images"
    folder.mkdir()
    by_fill = {}
    for name, detections in DETECTIONS.items():
        Image.fromarray(np.full((H, W, 3), FILLS[name], np.uint8)).save(folder / name)
        by_fill[FILLS[name]] = instances(detections, rle=name == "b.png")
    return folder, by_fill


def stand_in_model(by_fill):
    """A predict callable that answers each image with the detections prepared for its grey level."""
    calls = []

    def predict(arrays):
        calls.append(len(arrays))
        assert all(array.shape == (H, W, 3) and array.dtype == np.uint8 for array in arrays)
        return [by_fill[int(array[0, 0, 0])] for array in arrays]

    return predict, calls


def post(url: str, body, auth=None):
    """POST ``body`` as JSON (as Label Studio's MLApi does) -> (status, JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def predict_body(tasks, config):
    """What Label Studio sends to /predict (MLApi._prep_prediction_req)."""
    return {"tasks": tasks, "project": PROJECT, "label_config": config,
            "params": {"login": None, "password": None, "context": None}}


def setup_body(config, hostname="http://localhost:8080", access_token="owner-token"):
    """What Label Studio sends to /setup (MLApi.setup)."""
    return {"project": PROJECT, "schema": config, "hostname": hostname, "access_token": access_token,
            "extra_params": None}


def local_tasks(names):
    return [{"id": i, "data": {"image": f"/data/local-files/?d={name}"}, "meta": {}, "project": 7}
            for i, name in enumerate(names, start=1)]


def writer_predictions(folder, tmp_path):
    """The predictions the pre-annotation writer puts in tasks.json for DETECTIONS, per image (None: none)."""
    records = [(folder / name, instances(detections, rle=name == "b.png")) for name, detections in DETECTIONS.items()]
    write("label-studio", records, tmp_path / "written", model_version="shapes-v1")
    tasks = json.loads((tmp_path / "written" / "tasks.json").read_text())
    return [task["predictions"][0] if task["predictions"] else None for task in tasks]


def app_for(by_fill, folder, **options):
    predict, calls = stand_in_model(by_fill)
    options = {"class_names": CLASSES, "model_version": "shapes-v1", "image_root": folder,
               "score_thresh": SCORE_THRESH, **options}
    return create_label_studio_app(predict, **options), calls


def test_predictions_are_those_of_the_preannotation_writer(images, tmp_path):
    folder, by_fill = images
    config = labeling_config(KEEP)
    app, calls = app_for(by_fill, folder, max_batch_size=2)
    with serve_app(app) as (base, _):
        assert get_json(base + "/health")["status"] == "UP"
        assert post(base + "/setup", setup_body(config)) == (200, {"model_version": "shapes-v1"})
        status, answer = post(base + "/predict", predict_body(local_tasks(DETECTIONS), config))
    assert status == 200, answer
    expected = writer_predictions(folder, tmp_path)
    empty = {"result": [], "score": None, "model_version": "shapes-v1"}
    assert answer["results"] == [prediction or empty for prediction in expected]
    assert [bool(p) for p in expected] == [True, True, False] and calls == [2, 1]  # two images, then one


def test_regions_go_to_the_projects_own_control_names(images, tmp_path):
    """Another project's config: the image is "photo" of data key "img", the controls "outline" and
    "paint"; "bar" is a label of one control only, so bar detections are left out."""
    folder, by_fill = images
    config = """<View>
      <Header value="Draw the shapes"/>
      <Image name="photo" value="$img" zoom="true"/>
      <PolygonLabels name="outline" toName="photo"><Label value="ring"/><Label value="blob"/><Label value="bar"/>
      </PolygonLabels>
      <BrushLabels name="paint" toName="photo"><Label value="ring"/><Label value="blob"/></BrushLabels>
    </View>"""
    assert labeling_target(config, CLASSES).keep == ["ring", "blob"]
    app, _ = app_for(by_fill, folder)
    tasks = [{"id": 1, "data": {"img": "/data/local-files/?d=a.png"}}]
    with serve_app(app) as (base, _):
        status, answer = post(base + "/predict", predict_body(tasks, config))
    assert status == 200, answer
    expected = [dict(region, from_name={"polygon": "outline", "brush": "paint"}[region["from_name"]],
                     to_name="photo") for region in writer_predictions(folder, tmp_path)[0]["result"]
                if region["value"].get("polygonlabels", region["value"].get("brushlabels"))[0] != "bar"]
    assert answer["results"][0]["result"] == expected
    assert len(expected) == len(writer_predictions(folder, tmp_path)[0]["result"]) - 1


@pytest.mark.parametrize("config, message", [
    ("<View><Image name='image' value='$image'/><PolygonLabels name='p' toName='image'><Label value='ring'/>"
     "</PolygonLabels></View>", "no <Image> with both a <PolygonLabels> and a <BrushLabels>"),
    (labeling_config(["dog", "cat"]), "none of the model's classes"),
    ("<View><Image", "not XML"),
])
def test_a_config_that_cannot_hold_the_shapes_is_refused_at_setup_and_predict(images, config, message):
    folder, by_fill = images
    with pytest.raises(InputError, match=message):
        labeling_target(config, CLASSES)
    app, calls = app_for(by_fill, folder)
    with serve_app(app) as (base, _):
        setup = post(base + "/setup", setup_body(config))
        predicted = post(base + "/predict", predict_body(local_tasks(["a.png"]), config))
    for status, answer in (setup, predicted):
        assert status == 422 and message in answer["detail"]
    assert calls == []


@pytest.mark.parametrize("url, message", [
    ("/data/local-files/?d=../outside.png", "lies outside the image root"),
    ("/data/local-files/?d=missing.png", "not found under the image root"),
    ("http://example.com/a.png", "is not on Label Studio at http://localhost:8080"),
])
def test_a_task_whose_image_cannot_be_read_fails_the_request_naming_it(images, url, message):
    folder, by_fill = images
    (folder.parent / "outside.png").write_bytes((folder / "a.png").read_bytes())
    app, calls = app_for(by_fill, folder)
    config = labeling_config(KEEP)
    tasks = local_tasks(["a.png"]) + [{"id": 12, "data": {"image": url}}]
    with serve_app(app) as (base, _):
        post(base + "/setup", setup_body(config))
        status, answer = post(base + "/predict", predict_body(tasks, config))
    assert status == 422 and answer["detail"].startswith("task 12: ") and message in answer["detail"]
    assert calls == []  # the batch's images are all read before the model runs


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes) to requests with ``Authorization: Token owner-token``, as Label
    Studio serves uploads and local files; records what it was asked."""

    files, seen = {}, []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != "Token owner-token":
            self.send_error(401)
        elif self.path not in self.files:
            self.send_error(404)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(self.files[self.path])

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_label_studio():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeLabelStudio
    server.shutdown()
    server.server_close()
    _FakeLabelStudio.files, _FakeLabelStudio.seen = {}, []


@pytest.mark.parametrize("token, status", [("owner-token", 200), ("another-token", 422)])
def test_uploads_are_fetched_from_label_studio_with_the_token_setup_sent(images, tmp_path, fake_label_studio,
                                                                         token, status):
    folder, by_fill = images
    url, handler = fake_label_studio
    handler.files = {"/data/upload/7/0a1b2c3d-b.png": (folder / "b.png").read_bytes(),
                     "/data/local-files/?d=a.png": (folder / "a.png").read_bytes()}
    app, _ = app_for(by_fill, None)  # no image root: local files come from Label Studio too
    config = labeling_config(KEEP)
    tasks = [{"id": 1, "data": {"image": "/data/upload/7/0a1b2c3d-b.png"}},
             {"id": 2, "data": {"image": f"{url}/data/local-files/?d=a.png"}}]
    with serve_app(app) as (base, _):
        assert post(base + "/setup", setup_body(config, hostname=url, access_token=token))[0] == 200
        answered, answer = post(base + "/predict", predict_body(tasks, config))
    assert answered == status, answer
    assert handler.seen[0] == ("/data/upload/7/0a1b2c3d-b.png", f"Token {token}")
    if status == 200:
        expected = writer_predictions(folder, tmp_path)
        assert [r["result"] for r in answer["results"]] == [expected[1]["result"], expected[0]["result"]]
    else:
        assert answer["detail"] == "task 1: /data/upload/7/0a1b2c3d-b.png: Label Studio answered 401 Unauthorized"


def test_with_a_token_requests_need_it_as_basic_auth_password_or_bearer(images):
    folder, by_fill = images
    app, _ = app_for(by_fill, folder, token="s3cret")
    basic = "Basic " + base64.b64encode(b"label-studio:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"label-studio:guess").decode()
    config = labeling_config(KEEP)
    with serve_app(app) as (base, _):
        assert post(base + "/setup", setup_body(config))[0] == 401
        assert post(base + "/setup", setup_body(config), auth=wrong)[0] == 401
        assert post(base + "/setup", setup_body(config), auth=basic)[0] == 200
        assert post(base + "/setup", setup_body(config), auth="Bearer s3cret")[0] == 200
        with pytest.raises(urllib.error.HTTPError, match="401"):
            get_json(base + "/health")
        assert get_json(base + "/health", token="s3cret")["model_version"] == "shapes-v1"


def test_the_labeling_config_it_offers_fits_it(images):
    folder, by_fill = images
    app, _ = app_for(by_fill, folder)
    with serve_app(app) as (base, _):
        with urllib.request.urlopen(base + "/labeling-config", timeout=10) as response:
            config = response.read().decode()
    assert config == labeling_config(CLASSES)
    assert labeling_target(config, CLASSES).keep == CLASSES


@pytest.mark.slow
def test_the_serve_tool_runs_the_backend_from_a_checkpoint(tmp_path):
    checkpoint = write_checkpoint(tiny_predictor(), tmp_path / "tiny.pth")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(photos / "x.png")
    with serve_tool(["--checkpoint", str(checkpoint), "--label-studio", "--image-root", str(photos),
                     "--score-thresh", "0"]) as base:
        health = get_json(base + "/health")
        config = labeling_config(health["classes"])
        assert post(base + "/setup", setup_body(config)) == (200, {"model_version": "tiny.pth"})
        status, answer = post(base + "/predict", predict_body(local_tasks(["x.png"]), config))
    assert status == 200, answer
    (prediction,) = answer["results"]
    assert prediction["model_version"] == "tiny.pth" and prediction["result"]  # score 0: the random model's all
    for region in prediction["result"]:
        assert (region["original_width"], region["original_height"]) == (96, 80)
        assert region["from_name"] in ("polygon", "brush") and region["to_name"] == "image"
