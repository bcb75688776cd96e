"""Load a running service (tools/serve.py) from this machine: requests per second and latency percentiles
at several concurrency levels.

    python tools/serve.py --checkpoint output/demo/model_final.pth &
    python tools/load_test.py --url http://127.0.0.1:8000 --image data/shapes/val/000001.jpg

Each level sends ``--requests`` uploads of the image from that many client threads (bounded in count and
in ``--max-seconds`` per level) and prints requests/s, p50 / p95 latency and how many requests the
service refused (503: its ``--max-queue`` was full) or failed. Only loopback URLs are
accepted: this is a measuring tool, not a load generator for other machines.
"""

import argparse
from pathlib import Path
from urllib.parse import urlparse

from maskrcnn.cli import run
from maskrcnn.deploy.serve import load_test
from maskrcnn.errors import InputError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL (loopback only)")
    parser.add_argument("--image", required=True, help="the image file to upload (PNG or JPEG)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client threads per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at most)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time limit per level")
    parser.add_argument("--token", help="bearer token, if the service has one")
    args = parser.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(f"--url must point at this machine (127.0.0.1, localhost or ::1), got {args.url}")
    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    content_type = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    print("| concurrency | requests | refused | errors | requests/s | p50 latency (s) | p95 latency (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for concurrency in args.concurrency:
        r = load_test(args.url.rstrip("/") + "/predict", path.read_bytes(), content_type=content_type,
                      concurrency=concurrency, requests=args.requests, max_seconds=args.max_seconds,
                      token=args.token)
        print(f"| {concurrency} | {r['requests']} | {r['refused']} | {r['errors']} | {r['requests_per_s']:.2f} | "
              f"{r['p50_s']:.3f} | {r['p95_s']:.3f} |", flush=True)


if __name__ == "__main__":
    run(main)
