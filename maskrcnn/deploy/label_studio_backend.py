"""The model behind Label Studio's machine-learning backend protocol: the predictions of a project's tasks
on request, the same regions as the Label Studio pre-annotations (:mod:`maskrcnn.data.formats.label_studio`).

    app = create_label_studio_app(predictor, class_names=names, model_version="model_final.pth",
                                  image_root="/data/photos")
    uvicorn.run(app, host="127.0.0.1", port=9090)

Label Studio calls, at the URL it is given for the backend (*Settings → Model → Connect Model*, or
``POST /api/ml``):

- ``GET /health``: ``{"status": "UP", ...}``;
- ``POST /setup`` with the project's labeling config (``schema``), Label Studio's address (``hostname``) and
  an API token of the project's owner (``access_token``): ``{"model_version": ...}``, or 422 with the reason
  when the config cannot hold the model's shapes;
- ``POST /predict`` with ``tasks`` (each ``{"id", "data": {<image key>: URL}, ...}``) and the project's
  ``label_config``: ``{"results": [one prediction per task, in order]}``, each ``{"result": [regions],
  "score": mean of the regions' scores, "model_version"}`` (no regions: an empty result, score None).

``GET /labeling-config`` gives a labeling config that fits: the pre-annotations'
(:func:`~maskrcnn.data.formats.label_studio.labeling_config`) for the model's classes.

The labeling config must have an ``<Image>`` with both a ``<PolygonLabels>`` and a ``<BrushLabels>`` control
on it (any names, any data key): a detection goes to the polygon control when polygons hold its mask and to
the brush control otherwise, as in the pre-annotation files. Classes that are not a label of both controls
are left out.

Image URLs are read where Label Studio keeps the files:

- ``/data/local-files/?d=<path>`` (a local storage): ``image_root/<path>``, when ``image_root`` is given
  (Label Studio's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``); a path that leaves it is refused;
- any other URL on Label Studio (``/data/upload/...``, or the local files without ``image_root``): fetched
  from Label Studio with its API token (``Authorization: Token ...``, never sent on to another host);
- URLs on other hosts are refused: the backend reads Label Studio's files only.

Label Studio's address and token come from ``label_studio_url`` / ``label_studio_token`` when given, else
from what ``/setup`` sent for the project. Images pass the service's checks
(:func:`~maskrcnn.deploy.serve.decode_upload`: at most ``max_bytes`` bytes and ``max_pixels`` pixels, EXIF
orientation applied). Any task that cannot be read fails the whole request (422, naming the task and the
URL), so that no image silently gets nothing. Requests run one at a time in a worker thread,
``max_batch_size`` images per forward pass.
With ``token``, every request needs it: HTTP basic authentication with the token as password (Label
Studio's *Basic Authentication* of a model connection) or ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import secrets
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urljoin, urlparse

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from maskrcnn.config import ServiceConfig
from maskrcnn.data.formats.label_studio import LOCAL_FILES, labeling_config, shape_region
from maskrcnn.data.formats.predictions import Dropped, predicted_image
from maskrcnn.deploy.serve import UploadError, decode_upload
from maskrcnn.errors import InputError
from maskrcnn.structures import Instances

MODEL_CLASS = "maskrcnn"  # what /health names the model
FETCH_TIMEOUT_S = 30.0  # seconds to fetch one image from Label Studio
LOCAL_FILES_PATH = urlparse(LOCAL_FILES).path.rstrip("/")  # where Label Studio serves a local storage's files


@dataclass
class LabelingTarget:
    """Where the regions go in a project's labeling config: the ``<Image>`` named ``image`` shows
    ``data[data_key]``; ``polygon`` and ``brush`` are the names of its PolygonLabels and BrushLabels
    controls; ``keep`` the model's classes that are a label of both."""

    image: str
    data_key: str
    polygon: str
    brush: str
    keep: List[str]


def labeling_target(config: str, class_names: Sequence[str]) -> LabelingTarget:
    """Find the first ``<Image>`` of the labeling config ``config`` (XML) with both a ``<PolygonLabels>``
    and a ``<BrushLabels>`` control on it. InputError saying what is missing: no such image, or none of
    ``class_names`` a label of both controls."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError as error:
        raise InputError(f"the labeling config is not XML: {error}") from None
    tags = list(root.iter())
    controls = {"polygonlabels": [], "brushlabels": []}
    for tag in tags:
        if tag.tag.lower() in controls and tag.get("name") and tag.get("toName"):
            controls[tag.tag.lower()].append(tag)
    for image in (tag for tag in tags if tag.tag.lower() == "image"):
        name, value = image.get("name"), image.get("value", "")
        if not name or not value.startswith("$"):
            continue
        found = [next((c for c in controls[kind] if name in c.get("toName").split(",")), None)
                 for kind in ("polygonlabels", "brushlabels")]
        if None in found:
            continue
        polygon, brush = found
        labels = [{label.get("value") for label in control.iter() if label.tag.lower() == "label"}
                  for control in found]
        keep = [name_ for name_ in class_names if all(name_ in kind for kind in labels)]
        if not keep:
            raise InputError(f"none of the model's classes {list(class_names)} is a label of both the "
                             f"PolygonLabels {polygon.get('name')!r} and the BrushLabels {brush.get('name')!r} "
                             f"of the labeling config")
        return LabelingTarget(name, value[1:], polygon.get("name"), brush.get("name"), keep)
    raise InputError("the labeling config has no <Image> with both a <PolygonLabels> and a <BrushLabels> "
                     "control on it (GET /labeling-config gives one for this model)")


class ImageSource:
    """Reads the image a Label Studio task names (see the module docstring).

    image_root: Label Studio's local-files document root, or None to fetch those files from Label Studio.
    label_studio_url, token: Label Studio's address and an API token (None: unknown).
    max_bytes, max_pixels: the service's upload limits, applied to each image.
    """

    def __init__(self, *, image_root=None, label_studio_url: Optional[str] = None, token: Optional[str] = None,
                 max_bytes: int = ServiceConfig.max_bytes, max_pixels: int = ServiceConfig.max_pixels):
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.token = token
        self.max_bytes, self.max_pixels = max_bytes, max_pixels

    def read(self, url: str) -> np.ndarray:
        """The image at ``url`` -> ``(H, W, 3)`` uint8 RGB, upright. InputError naming the URL."""
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        if self.image_root is not None and parsed.path.rstrip("/") == LOCAL_FILES_PATH and "d" in query:
            data, content_type = self._read_local(query["d"][-1])
        else:
            data, content_type = self._fetch(url)
        try:
            return decode_upload(data, content_type, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        except UploadError as error:
            raise InputError(f"{url}: {error}") from None

    def _read_local(self, relative: str) -> Tuple[bytes, Optional[str]]:
        path = (self.image_root / relative.lstrip("/")).resolve()
        if not path.is_relative_to(self.image_root):
            raise InputError(f"local file {relative!r} lies outside the image root {self.image_root}")
        if not path.is_file():
            raise InputError(f"local file {relative!r}: {path} not found under the image root {self.image_root}")
        if path.stat().st_size > self.max_bytes:
            raise InputError(f"{path} has {path.stat().st_size} bytes; the limit is {self.max_bytes}")
        return path.read_bytes(), mimetypes.guess_type(path.name)[0]

    def _fetch(self, url: str) -> Tuple[bytes, Optional[str]]:
        if self.label_studio_url is None:
            raise InputError(f"{url}: Label Studio's address is unknown (give --label-studio-url, or connect the "
                             "backend to a project so that Label Studio sends it)")
        origin = urlparse(self.label_studio_url)
        absolute = urlparse(urljoin(self.label_studio_url + "/", url))
        if (absolute.scheme, absolute.netloc) != (origin.scheme, origin.netloc):
            raise InputError(f"{url} is not on Label Studio at {self.label_studio_url}; the backend reads Label "
                             "Studio's files (and the image root's) only")
        request = urllib.request.Request(absolute.geturl())
        if self.token:
            request.add_unredirected_header("Authorization", f"Token {self.token}")  # not sent on redirects
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(self.max_bytes + 1)
                content_type = response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            raise InputError(f"{url}: Label Studio answered {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            raise InputError(f"{url}: no answer from Label Studio at {self.label_studio_url} "
                             f"({getattr(error, 'reason', error)})") from None
        if not content_type.startswith("image/"):
            content_type = mimetypes.guess_type(absolute.path)[0] or content_type
        return data, content_type


def task_predictions(tasks: Sequence[dict], target: LabelingTarget,
                     predict: Callable[[List[np.ndarray]], List[Instances]], source: ImageSource, *,
                     model_version: str, score_thresh: Optional[float] = None, tolerance: Optional[float] = None,
                     max_batch_size: int = ServiceConfig.max_batch_size) -> List[dict]:
    """One prediction per task of ``tasks`` (Label Studio's task dicts), in order: the model's detections
    of the task's image as regions of ``target``'s controls. ``max_batch_size`` images per call of
    ``predict``. InputError naming the task whose image cannot be read."""
    results = []
    for start in range(0, len(tasks), max_batch_size):
        chunk = tasks[start:start + max_batch_size]
        images = [_task_image(task, index, target, source) for index, task in enumerate(chunk, start)]
        for instances in predict(images):
            image = predicted_image("task", instances, dropped=Dropped(), score_thresh=score_thresh,
                                    keep=target.keep, tolerance=tolerance, multipart=False)
            regions = []
            for i, shape in enumerate(image.shapes):
                region = shape_region(shape, f"r{i}", image.height, image.width)
                region.update(from_name=target.brush if shape.is_mask else target.polygon, to_name=target.image)
                regions.append(region)
            score = float(np.mean([shape.score for shape in image.shapes])) if image.shapes else None
            results.append({"result": regions, "score": score, "model_version": model_version})
    return results


def _task_image(task, index: int, target: LabelingTarget, source: ImageSource) -> np.ndarray:
    where = f"task {task.get('id', index) if isinstance(task, dict) else index}"
    data = task.get("data") if isinstance(task, dict) else None
    url = data.get(target.data_key) if isinstance(data, dict) else None
    if not isinstance(url, str):
        raise InputError(f"{where}: no image URL in data[{target.data_key!r}]")
    try:
        return source.read(url)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


class _AuthGuard:
    """ASGI middleware: every HTTP request must carry ``token`` as the password of HTTP basic
    authentication (any user name) or as ``Authorization: Bearer <token>``; others get 401."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def _allowed(self, header: bytes) -> bool:
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return secrets.compare_digest(credentials, self.token)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(credentials, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(password, self.token)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            response = JSONResponse({"detail": "missing or wrong credentials"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="maskrcnn"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_label_studio_app(predict: Callable[[List[np.ndarray]], List[Instances]], *, class_names: Sequence[str],
                            model_version: str, image_root=None, label_studio_url: Optional[str] = None,
                            label_studio_token: Optional[str] = None, score_thresh: Optional[float] = None,
                            tolerance: Optional[float] = None, max_batch_size: int = ServiceConfig.max_batch_size,
                            max_bytes: int = ServiceConfig.max_bytes, max_pixels: int = ServiceConfig.max_pixels,
                            token: Optional[str] = None):
    """The FastAPI app of the Label Studio ML backend (see the module docstring).

    predict: images (``(H, W, 3)`` uint8 RGB arrays) -> :class:`Instances`, e.g. a
        :class:`~maskrcnn.predictor.Predictor` called on a list.
    class_names: the model's classes, in order. model_version: what the predictions are labelled with.
    image_root: Label Studio's local-files document root (None: fetch those files from Label Studio).
    label_studio_url, label_studio_token: Label Studio's address and API token (None: what ``/setup`` sends).
    score_thresh: detections scoring below are left out (None: what ``predict`` returns).
    tolerance: polygon simplification in pixels (None: the pre-annotations' default).
    max_batch_size: images per call of ``predict``. max_bytes, max_pixels: limits of each image.
    token: when set, every request must carry it (basic authentication password or bearer token).
    """
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image root not found (a folder): {image_root}")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="label-studio")
    setups: Dict[str, Tuple[Optional[str], Optional[str]]] = {}  # project -> (hostname, access token)

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="maskrcnn Label Studio ML backend", lifespan=lifespan)
    if token is not None:
        app.add_middleware(_AuthGuard, token=token)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, detail="the request body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, detail="the request body is not a JSON object")
        return body

    def target_of(config) -> LabelingTarget:
        if not isinstance(config, str):
            raise HTTPException(422, detail="the request has no labeling config")
        try:
            return labeling_target(config, class_names)
        except InputError as error:
            raise HTTPException(422, detail=str(error)) from None

    @app.get("/health")
    async def health():
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": model_version,
                "classes": list(class_names)}

    @app.get("/labeling-config")
    async def config():
        return Response(labeling_config(class_names), media_type="application/xml")

    @app.post("/setup")
    async def setup(request: Request):
        body = await body_of(request)
        target_of(body.get("schema"))
        setups[str(body.get("project"))] = (body.get("hostname"), body.get("access_token"))
        return {"model_version": model_version}

    @app.post("/predict")
    async def predict_endpoint(request: Request):
        body = await body_of(request)
        target = target_of(body.get("label_config"))
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise HTTPException(422, detail="the request has no 'tasks' list")
        hostname, access_token = setups.get(str(body.get("project")), (None, None))
        source = ImageSource(image_root=image_root, label_studio_url=label_studio_url or hostname,
                             token=label_studio_token or access_token, max_bytes=max_bytes, max_pixels=max_pixels)
        run = partial(task_predictions, tasks, target, predict, source, model_version=model_version,
                      score_thresh=score_thresh, tolerance=tolerance, max_batch_size=max_batch_size)
        try:
            results = await asyncio.get_running_loop().run_in_executor(worker, run)
        except InputError as error:
            raise HTTPException(422, detail=str(error)) from None
        return {"results": results, "model_version": model_version}

    return app
