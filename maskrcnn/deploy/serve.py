"""An HTTP inference service: upload checks, a batching queue in front of a predictor, and the app.

    app = create_app(predictor, max_batch_size=4, max_wait_ms=10)
    uvicorn.run(app, host="127.0.0.1", port=8000)

``POST /predict`` takes one image as a multipart upload (field ``image``) and returns JSON: the image
size and per detection ``box`` (x1, y1, x2, y2 pixels of the uploaded image), ``score``, ``label``,
``class_name`` and ``segmentation`` (COCO RLE with string counts); ``?overlay=1`` returns a PNG with the
detections drawn instead. ``GET /health`` reports the model's classes and the batches run so far.
Concurrent requests are gathered into one batch of at most ``max_batch_size`` images, waiting at most
``max_wait_ms`` after the first; the network runs one batch at a time in a worker thread, so the event
loop keeps accepting and checking uploads meanwhile.

Uploads are checked before the network sees them: empty, over ``max_bytes``, not an image content type,
not decodable, or declaring more than ``max_pixels`` pixels (read from the file header, before any pixel
is decoded) are answered with 4xx and a message.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from maskrcnn.structures import Instances

IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "image/gif")


class UploadError(ValueError):
    """An upload the service refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, content_type: Optional[str], *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Check and decode one uploaded image -> ``(H, W, 3)`` uint8 RGB array.

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit here
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as error:  # PIL's own limit, far above any sensible max_pixels
        raise UploadError(413, f"the image declares too many pixels: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UploadError(400, f"the uploaded file is not an image ({type(error).__name__}: {error})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(413, f"the image declares {width}x{height} = {width * height} pixels; the limit is "
                               f"{max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise UploadError(400, f"the uploaded image cannot be decoded ({type(error).__name__}: {error})") from None


class BatchQueue:
    """Gathers concurrent requests into batches for a predictor.

    predict: images (a list of ``(H, W, 3)`` uint8 RGB arrays) -> one :class:`Instances` per image; it runs
        in one worker thread, one batch at a time.
    max_batch_size: images per batch at most.
    max_wait_ms: how long a batch waits, after its first image, for more.
    """

    def __init__(self, predict: Callable[[List[np.ndarray]], List[Instances]], *, max_batch_size: int = 4,
                 max_wait_ms: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.batch_sizes: List[int] = []  # every batch run so far
        self._queue: Optional[asyncio.Queue] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    async def submit(self, image: np.ndarray) -> Instances:
        """Queue one image and wait for its detections."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def run(self) -> None:
        """Serve the queue until cancelled: take a first request, gather more until the batch is full or
        the wait is over, run the batch, answer each request."""
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
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.predict, [image for image, _ in batch])
            except Exception as error:  # the requests of this batch fail; the service keeps serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def instances_to_json(result: Instances) -> dict:
    """One image's detections as the service returns them (boxes xyxy in the uploaded image's pixels)."""
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


def create_app(predict: Callable[[List[np.ndarray]], List[Instances]], *, class_names: Sequence[str],
               draw: Callable[[np.ndarray, Instances], bytes], max_batch_size: int = 4, max_wait_ms: float = 10.0,
               max_bytes: int = 20 * 2**20, max_pixels: int = 40_000_000, token: Optional[str] = None):
    """The FastAPI app of the service.

    predict: images (``(H, W, 3)`` uint8 RGB arrays) -> :class:`Instances`, e.g. a
        :class:`~maskrcnn.predictor.Predictor` or an :class:`~maskrcnn.deploy.runtime.ExportedPredictor`
        called on a list.
    class_names: reported by ``/health``.
    draw: (image, detections) -> PNG bytes, the ``?overlay=1`` answer.
    max_batch_size, max_wait_ms: batching (see :class:`BatchQueue`).
    max_bytes, max_pixels: upload limits (see :func:`decode_upload`).
    token: when set, every request needs the header ``Authorization: Bearer <token>`` (401 otherwise).
    """
    queue = BatchQueue(predict, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(queue.run())
        yield
        task.cancel()
        queue.close()

    app = FastAPI(title="maskrcnn", lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes + 64 * 1024:
            return JSONResponse({"detail": f"the request has {length} bytes; the upload limit is {max_bytes}"},
                                status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        sizes = queue.batch_sizes
        return {"status": "ok", "classes": list(class_names), "batches": len(sizes), "images": sum(sizes),
                "largest_batch": max(sizes, default=0), "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}

    @app.post("/predict")
    async def predict_endpoint(image: UploadFile = File(...), overlay: bool = False):
        data = await image.read(max_bytes + 1)
        try:
            pixels = decode_upload(data, image.content_type, max_bytes=max_bytes, max_pixels=max_pixels)
        except UploadError as error:
            raise HTTPException(status_code=error.status, detail=f"{image.filename}: {error}") from None
        result = await queue.submit(pixels)
        if overlay:
            return Response(draw(pixels, result), media_type="image/png")
        return instances_to_json(result)

    return app


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
    requests after ``max_seconds``. Returns ``requests`` (sent), ``errors`` (non-200 answers),
    ``requests_per_s`` and the latency percentiles ``p50_s`` and ``p95_s``."""
    latencies: List[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))
    start = time.perf_counter()

    def client():
        nonlocal errors
        while time.perf_counter() - start < max_seconds:
            with lock:
                if next(counter, None) is None:
                    return
            sent = time.perf_counter()
            status, _ = post_image(url, data, content_type=content_type, token=token)
            with lock:
                latencies.append(time.perf_counter() - sent)
                errors += status != 200

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "requests_per_s": len(latencies) / elapsed,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95))}
