"""An HTTP inference service: upload checks, a bounded batching queue in front of a predictor, the app.

    app = create_app(predictor, class_names=names, draw=overlay_png, max_batch_size=4, max_wait_ms=10)
    uvicorn.run(app, host="127.0.0.1", port=8000)

``POST /predict`` takes one image as a multipart upload (field ``image``), read upright (EXIF orientation
applied), and returns JSON: the image size and per detection ``box`` (x1, y1, x2, y2 pixels of the upright
image), ``score``, ``label``, ``class_name`` and ``segmentation`` (COCO RLE with string counts);
``?overlay=1`` returns a PNG with the detections drawn instead. ``GET /health`` reports the model's classes,
the batches run so far and the requests refused, dropped or timed out. ``GET /`` is a web page that uploads
an image and draws the answer.
Concurrent requests are gathered into one batch of at most ``max_batch_size`` images, waiting at most
``max_wait_ms`` after the first; the network runs one batch at a time in a worker thread.

What one client can take is bounded, so that no client stalls the others:
- bytes: the body is read in chunks and cut (413) once it passes ``max_bytes`` plus a small allowance for
  the form, with or without a Content-Length header;
- pixels: an image whose header declares more than ``max_pixels`` is refused (413) before it is decoded;
  decoding runs in worker threads, so the event loop keeps answering meanwhile;
- requests held: at most ``max_queue`` (uploading, decoding, waiting or running); more get 503 with
  ``Retry-After`` before their body is read;
- time: ``timeout_s`` per request (408 while the upload arrives, 503 after);
- a request whose client disconnects while it waits is dropped before the network sees it.
Uploads are checked before the network sees them: empty, over ``max_bytes``, not an image content type,
not decodable, or declaring more than ``max_pixels`` pixels are answered with 4xx and a message.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import math
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from maskrcnn.config import ServiceConfig
from maskrcnn.errors import InputError
from maskrcnn.fileio import decode_image, exif_orientation, swaps_axes
from maskrcnn.structures import Instances

IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "image/gif")
FORM_OVERHEAD = 16 * 1024  # bytes a multipart body may hold beyond its file: boundaries, part headers
CLOSE = {"Connection": "close"}  # a refusal before the body is read ends the connection instead of draining it
# The page runs its own inline script and style and talks to this service only.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


class UploadError(ValueError):
    """An upload the service refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, content_type: Optional[str], *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Check and decode one uploaded image -> ``(H, W, 3)`` uint8 RGB array, upright: EXIF orientation
    applied, as :func:`~maskrcnn.fileio.decode_image` (and so the predictor) reads the same bytes.

    Raises :class:`UploadError` with 415 for a content type other than an image's, 400 for an empty or
    undecodable file, 413 for a file over ``max_bytes`` or an image whose header declares more than
    ``max_pixels`` pixels; the pixel count is read from the header before anything is decoded.
    """
    if content_type is None or content_type.split(";")[0].strip().lower() not in IMAGE_CONTENT_TYPES:
        raise UploadError(415, f"content type {content_type!r} is not one of {', '.join(IMAGE_CONTENT_TYPES)}")
    if not data:
        raise UploadError(400, "the uploaded file is empty")
    if len(data) > max_bytes:
        raise UploadError(413, f"the uploaded file has {len(data)} bytes; the limit is {max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit here
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
                orientation = exif_orientation(image)
        except Image.DecompressionBombError as error:  # PIL's own limit, far above any sensible max_pixels
            raise UploadError(413, f"the image declares too many pixels: {error}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise UploadError(400, f"the uploaded file is not an image ({type(error).__name__}: {error})") from None
        if swaps_axes(orientation):
            width, height = height, width
        if width * height > max_pixels:
            raise UploadError(413, f"the image declares {width}x{height} = {width * height} pixels (upright); the "
                                   f"limit is {max_pixels}")
        try:
            return decode_image(data, where="the uploaded image")
        except InputError as error:
            raise UploadError(400, str(error)) from None


class BatchQueue:
    """Gathers concurrent requests into batches for a predictor, holding at most ``max_queue`` requests.

    predict: images (a list of ``(H, W, 3)`` uint8 RGB arrays) -> one :class:`Instances` per image; it runs
        in one worker thread, one batch at a time.
    max_batch_size: images per batch at most.
    max_wait_ms: how long a batch waits, after its first image, for more.
    max_queue: requests held at once, from :meth:`reserve` to :meth:`release` (uploading, decoding, waiting
        or in the running batch); :meth:`reserve` refuses more.

    A request that gives up while it waits (its client left, its time ran out) cancels its future: the
    queue drops its image at once and never runs it.
    """

    def __init__(self, predict: Callable[[List[np.ndarray]], List[Instances]], *,
                 max_batch_size: int = ServiceConfig.max_batch_size, max_wait_ms: float = ServiceConfig.max_wait_ms,
                 max_queue: int = ServiceConfig.max_queue):
        if max_batch_size < 1:
            raise InputError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise InputError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < max_batch_size:
            raise InputError(f"max_queue ({max_queue}) must be at least max_batch_size ({max_batch_size})")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.held = 0  # requests between reserve() and release()
        self.queued = 0  # requests submitted and not yet answered (waiting or running)
        self.batch_sizes: List[int] = []  # every batch run so far
        self.batch_seconds = 0.0  # how long the last batch ran
        self._queue: Optional[asyncio.Queue] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    def reserve(self) -> bool:
        """Take a place for one request; False when ``max_queue`` requests are already held."""
        if self.held >= self.max_queue:
            return False
        self.held += 1
        return True

    def release(self) -> None:
        """Give back a place taken by :meth:`reserve`."""
        self.held -= 1

    def retry_after(self) -> int:
        """Seconds after which a refused client may try again: the time to run a full queue, at least 1."""
        return max(1, math.ceil(self.batch_seconds * math.ceil(self.max_queue / self.max_batch_size)))

    async def submit(self, image: np.ndarray) -> Instances:
        """Queue one image and wait for its detections; cancelling the wait drops the image from the queue."""
        job = [image, asyncio.get_running_loop().create_future()]
        self._queue.put_nowait(job)
        self.queued += 1
        try:
            return await job[1]
        finally:
            self.queued -= 1
            job[0] = None  # answered or given up: the queue no longer holds the pixels

    async def run(self) -> None:
        """Serve the queue until cancelled: take a first request, gather more until the batch is full or
        the wait is over, drop those that gave up meanwhile, run the batch, answer each request."""
        self._queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = [(image, future) for image, future in batch if not future.done()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.predict, [image for image, _ in batch])
            except Exception as error:  # the requests of this batch fail; the service keeps serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                self.batch_seconds = time.perf_counter() - started
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def instances_to_json(result: Instances) -> dict:
    """One image's detections as the service returns them (boxes xyxy, pixels of the upright uploaded image)."""
    coco = result.to_coco(0, label_to_cat_id={label: label for label in result.labels.tolist()})  # every label
    segmentations = [r.get("segmentation") for r in coco]
    detections = []
    for box, score, label, name, segmentation in zip(result.boxes.tolist(), result.scores.tolist(),
                                                     result.labels.tolist(), result.class_names, segmentations):
        detection = {"box": box, "score": score, "label": label, "class_name": name}
        if segmentation is not None:
            detection["segmentation"] = segmentation
        detections.append(detection)
    return {"height": result.image_size[0], "width": result.image_size[1], "detections": detections}


async def read_upload(request: Request, *, max_bytes: int) -> Tuple[bytes, Optional[str], Optional[str]]:
    """Read the multipart body of ``request`` chunk by chunk -> (the bytes of its field ``image``, the file
    name, the content type the client gave it).

    The body is cut as soon as it exceeds ``max_bytes`` + :data:`FORM_OVERHEAD` bytes, whether or not it
    declared a Content-Length: at most one chunk past that is ever read. Raises :class:`UploadError`: 413
    for a body over the limit, 415 for a body that is not ``multipart/form-data``, 400 for a malformed form,
    422 for a form without ``image``. A client that leaves raises starlette's ``ClientDisconnect``.
    """
    limit = max_bytes + FORM_OVERHEAD
    too_large = f"the request body exceeds {limit} bytes (an upload of at most {max_bytes} bytes and its form)"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise UploadError(413, f"{too_large}: it declares {length}")
    kind = request.headers.get("content-type", "")
    if kind.split(";")[0].strip().lower() != "multipart/form-data":
        raise UploadError(415, f"the request has content type {kind!r}; send multipart/form-data with the "
                               "field 'image'")

    async def limited():
        read = 0
        async for chunk in request.stream():
            read += len(chunk)
            if read > limit:
                raise UploadError(413, too_large)
            yield chunk

    try:
        form = await MultiPartParser(request.headers, limited(), max_files=1, max_fields=8,
                                     max_part_size=FORM_OVERHEAD).parse()
    except MultiPartException as error:
        raise UploadError(400, f"the request is not a well-formed multipart form: {error}") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise UploadError(422, "the form has no file field 'image'")
    try:
        return await upload.read(), upload.filename, upload.content_type
    finally:
        await form.close()


def page_html() -> str:
    """The service's web page: one self-contained HTML file (inline script and style, nothing fetched from
    elsewhere) shipped in the package beside this module."""
    return resources.files(__package__).joinpath("page", "index.html").read_text(encoding="utf-8")


class _TokenGuard:
    """ASGI middleware: every HTTP request but ``GET /`` (the page, which holds no data) must carry
    ``Authorization: Bearer <token>``; others get 401 before their body is read."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["method"] == "GET" and scope["path"] == "/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer", **CLOSE})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(predict: Callable[[List[np.ndarray]], List[Instances]], *, class_names: Sequence[str],
               draw: Callable[[np.ndarray, Instances], bytes], max_batch_size: int = ServiceConfig.max_batch_size,
               max_wait_ms: float = ServiceConfig.max_wait_ms, max_queue: int = ServiceConfig.max_queue,
               timeout_s: float = ServiceConfig.timeout_s, max_bytes: int = ServiceConfig.max_bytes,
               max_pixels: int = ServiceConfig.max_pixels, decode_workers: int = ServiceConfig.decode_workers,
               token: Optional[str] = None):
    """The FastAPI app of the service; the defaults of its limits are :class:`~maskrcnn.config.ServiceConfig`'s.

    predict: images (``(H, W, 3)`` uint8 RGB arrays) -> :class:`Instances`, e.g. a
        :class:`~maskrcnn.predictor.Predictor` or an :class:`~maskrcnn.deploy.runtime.ExportedPredictor`
        called on a list.
    class_names: reported by ``/health``.
    draw: (image, detections) -> PNG bytes, the ``?overlay=1`` answer.
    max_batch_size, max_wait_ms, max_queue: batching and its bound (see :class:`BatchQueue`); a request
        beyond ``max_queue`` gets 503 with ``Retry-After`` before its body is read.
    timeout_s: seconds one request may take from its first body byte to its answer: 408 while the upload is
        still arriving, 503 with ``Retry-After`` after.
    max_bytes, max_pixels: upload limits (see :func:`read_upload` and :func:`decode_upload`).
    decode_workers: threads that decode uploads, off the event loop.
    token: when set, every request but ``GET /`` needs the header ``Authorization: Bearer <token>`` (401
        otherwise).
    """
    if timeout_s <= 0:
        raise InputError(f"timeout_s must be > 0, got {timeout_s}")
    queue = BatchQueue(predict, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
    decoder = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
    counts = {"refused": 0, "dropped": 0, "timed_out": 0}
    page = page_html()

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(queue.run())
        yield
        task.cancel()
        queue.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="maskrcnn", lifespan=lifespan)
    if token is not None:
        app.add_middleware(_TokenGuard, token=token)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health():
        sizes = queue.batch_sizes
        return {"status": "ok", "classes": list(class_names), "batches": len(sizes), "images": sum(sizes),
                "largest_batch": max(sizes, default=0), "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                "held": queue.held, "queued": queue.queued, "max_queue": max_queue, **counts}

    async def answer(request: Request, stage: List[str]) -> Tuple[np.ndarray, Instances]:
        """Read, check and decode the upload, then wait for its detections -> (pixels, detections);
        ``stage[0]`` says how far it got."""
        data, filename, content_type = await read_upload(request, max_bytes=max_bytes)
        stage[0] = "decoding"
        check = partial(decode_upload, data, content_type, max_bytes=max_bytes, max_pixels=max_pixels)
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(decoder, check)
        except UploadError as error:
            raise UploadError(error.status, f"{filename}: {error}") from None
        del data, check
        stage[0] = "waiting"
        waiting = asyncio.ensure_future(queue.submit(pixels))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also on timeout: a request that stops waiting leaves the queue
            gone.cancel()
            waiting.cancel()
        if waiting not in done:
            counts["dropped"] += 1
            raise ClientDisconnect()
        return pixels, waiting.result()

    @app.post("/predict")
    async def predict_endpoint(request: Request, overlay: bool = False):
        if not queue.reserve():
            counts["refused"] += 1
            raise HTTPException(503, detail=f"the service holds {max_queue} requests already; try again later",
                                headers={"Retry-After": str(queue.retry_after()), **CLOSE})
        stage = ["reading"]
        try:
            pixels, result = await asyncio.wait_for(answer(request, stage), timeout_s)
        except UploadError as error:
            raise HTTPException(error.status, detail=str(error), headers=CLOSE) from None
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it: the client has left
        except asyncio.TimeoutError:
            counts["timed_out"] += 1
            if stage[0] == "reading":
                raise HTTPException(408, detail=f"the upload did not arrive within {timeout_s} s",
                                    headers=CLOSE) from None
            raise HTTPException(503, detail=f"the request was not answered within {timeout_s} s ({stage[0]})",
                                headers={"Retry-After": str(queue.retry_after())}) from None
        finally:
            queue.release()
        if overlay:
            return Response(draw(pixels, result), media_type="image/png")
        return instances_to_json(result)

    return app


async def client_gone(request: Request) -> None:
    """Return once the client of ``request`` has disconnected (its body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal; any other name counts as off loopback, whatever it resolves to."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def post_image(url: str, data: bytes, *, filename: str = "image.png", content_type: str = "image/png",
               token: Optional[str] = None, timeout: float = 60.0) -> Tuple[int, bytes]:
    """A client's ``POST`` of one image to ``url`` (the service's ``/predict``) -> (HTTP status, body)."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def load_test(url: str, data: bytes, *, content_type: str, concurrency: int, requests: int, max_seconds: float,
              token: Optional[str] = None) -> dict:
    """Send up to ``requests`` uploads of ``data`` to ``url`` from ``concurrency`` threads, stopping new
    requests after ``max_seconds``. Returns ``requests`` (sent), ``refused`` (503 answers: the service's
    queue was full), ``errors`` (other non-200 answers), ``requests_per_s`` and the latency percentiles
    ``p50_s`` and ``p95_s``. Raises :class:`InputError` for counts below 1 or no time, and naming ``url``
    when a request gets no HTTP answer from it (nothing listens there)."""
    for name, value in (("concurrency", concurrency), ("requests", requests)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if max_seconds <= 0:
        raise InputError(f"max_seconds must be > 0, got {max_seconds}")
    latencies: List[float] = []
    refused = errors = 0
    unanswered: List[urllib.error.URLError] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    start = time.perf_counter()

    def client():
        nonlocal refused, errors
        while time.perf_counter() - start < max_seconds and not unanswered:
            with lock:
                if next(counter, None) is None:
                    return
            sent = time.perf_counter()
            try:
                status, _ = post_image(url, data, content_type=content_type, token=token)
            except urllib.error.URLError as error:  # not an HTTP answer: the connection itself failed
                unanswered.append(error)
                return
            with lock:
                latencies.append(time.perf_counter() - sent)
                refused += status == 503
                errors += status not in (200, 503)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if unanswered:
        raise InputError(f"no service answers at {url}: {unanswered[0].reason}")
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "refused": refused, "errors": errors,
            "requests_per_s": len(latencies) / elapsed,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95))}
