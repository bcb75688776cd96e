"""Serve a checkpoint or an exported ONNX file over HTTP, batching concurrent requests.

    python tools/serve.py --checkpoint output/train/model_final.pth
    python tools/serve.py --onnx output/model.onnx --runtime openvino --port 8000
    curl -F image=@street.jpg http://127.0.0.1:8000/predict
    curl -F image=@street.jpg "http://127.0.0.1:8000/predict?overlay=1" -o overlay.png

Endpoints: ``POST /predict`` (multipart field ``image``; JSON, or a PNG with ``?overlay=1``),
``GET /health`` and ``GET /`` (a page: drop an image, see its masks); see ``maskrcnn.deploy.serve`` and
docs/service.md.

``--label-studio`` serves Label Studio's ML backend protocol instead (``/health``, ``/setup``, ``/predict``:
predictions of a project's tasks; ``maskrcnn.deploy.label_studio_backend``, docs/annotation-tools.md):

    python tools/serve.py --checkpoint output/train/model_final.pth --label-studio --port 9090 --image-root photos/

It listens on 127.0.0.1 unless ``--host`` says otherwise; any other address or host name needs ``--token``
(requests then carry ``Authorization: Bearer <token>``; Label Studio sends it as a basic-authentication password).
"""

import argparse
import io
import os
from pathlib import Path

import uvicorn
from PIL import Image

from maskrcnn.cli import run
from maskrcnn.config import ServiceConfig
from maskrcnn.deploy.label_studio_backend import create_label_studio_app
from maskrcnn.deploy.runtime import RUNTIMES, ExportedPredictor
from maskrcnn.deploy.serve import create_app, is_loopback
from maskrcnn.errors import InputError
from maskrcnn.predictor import PRECISIONS, Predictor
from maskrcnn.visualize import draw_instances


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file written by training (runs in PyTorch)")
    source.add_argument("--onnx", help="ONNX file written by tools/export.py (or its int8 .xml, with --runtime openvino)")
    parser.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES, help="runtime of --onnx")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="default: the checkpoint's model.precision (auto: bf16 where native, else fp32); "
                             "for --onnx, auto; bf16: autocast (PyTorch) or OpenVINO's bf16 inference")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="detections scoring below are dropped (default: the model's own threshold)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help="bearer token every request must carry (required off loopback)")
    parser.add_argument("--max-batch-size", type=int, default=ServiceConfig.max_batch_size,
                        help="images per batch at most")
    parser.add_argument("--max-wait-ms", type=float, default=ServiceConfig.max_wait_ms,
                        help="wait for more images after the first")
    parser.add_argument("--max-queue", type=int, default=ServiceConfig.max_queue,
                        help="requests held at once (uploading, decoding, waiting, running); more get 503")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=ServiceConfig.timeout_s,
                        help="seconds per request, upload to answer")
    parser.add_argument("--max-bytes", type=int, default=ServiceConfig.max_bytes, help="largest upload in bytes")
    parser.add_argument("--max-pixels", type=int, default=ServiceConfig.max_pixels,
                        help="largest image in pixels (W x H)")
    studio = parser.add_argument_group("Label Studio ML backend")
    studio.add_argument("--label-studio", action="store_true", help="serve Label Studio's ML backend protocol")
    studio.add_argument("--image-root", help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: local files "
                                             "are read there (default: fetched from Label Studio)")
    studio.add_argument("--label-studio-url", help="Label Studio's address (default: what it sends on connecting)")
    studio.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="Label Studio API token (default: $LABEL_STUDIO_API_KEY, else what it sends)")
    studio.add_argument("--model-version", help="the predictions' model_version (default: the model file's name)")
    studio.add_argument("--simplify", type=float, default=None, help="polygon simplification in pixels (default 1)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must lie in 0..65535, got {args.port}")
    if args.token is None and not is_loopback(args.host):
        raise InputError(f"listening on {args.host} needs --token (only loopback and localhost go without)")
    if args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint, precision=args.precision, mask_format="rle",
                                              score_thresh=args.score_thresh)
    else:
        predictor = ExportedPredictor(args.onnx, runtime=args.runtime, precision=args.precision, mask_format="rle",
                                      score_thresh=args.score_thresh)
    print(predictor.resolved_precision.message)
    if args.label_studio:
        app = create_label_studio_app(
            predictor, class_names=predictor.class_names, image_root=args.image_root, token=args.token,
            model_version=args.model_version or Path(args.checkpoint or args.onnx).name, tolerance=args.simplify,
            label_studio_url=args.label_studio_url, label_studio_token=args.label_studio_token,
            max_batch_size=args.max_batch_size, max_bytes=args.max_bytes, max_pixels=args.max_pixels)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return
    app = create_app(predictor,
                     class_names=predictor.class_names, draw=overlay_png, max_batch_size=args.max_batch_size,
                     max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
                     max_bytes=args.max_bytes, max_pixels=args.max_pixels, token=args.token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def overlay_png(image, result) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(draw_instances(image, result, score_thresh=None)).save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    run(main)
