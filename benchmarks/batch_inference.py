"""Images per second of batch inference: the local engine and the Ray engine (a local Ray instance of 2 CPUs)
against a plain loop over the same images with the predictor, side by side in one process.

    python -m benchmarks.batch_inference                       # 48 images, 3 rounds, random weights
    python -m benchmarks.batch_inference --images 500 --checkpoint output/demo/model_final.pth --json

The images are the demo's synthetic shapes (:func:`maskrcnn.data.shapes.render_image`, 128 to 256 pixels a
side) written as JPEG files; the model is ``configs/maskrcnn_R18_FPN_small.yaml``, with seeded random weights
unless ``--checkpoint`` names trained ones (random weights keep every image at the configured 50 detections
a little over the score threshold, so the mask paste and encoding are fully loaded).

Every variant reads the files and returns each image's COCO results with RLE masks:
- ``predictor loop``: for each path, ``read_image``, ``Predictor(mask_format="rle")`` on that one image and
  ``Instances.to_coco``, results kept in memory (what a user's own loop does, nothing written);
- ``local engine``: :func:`maskrcnn.batch.predict_batch` with ``engine="local"``, batches of ``--batch-size``,
  images decoded ahead by threads, Parquet shards written to a new folder;
- ``ray engine``: the same with ``engine="ray"``, ``--actors`` actors of 1 CPU each on a local Ray instance
  started once beforehand (its start is not timed; each job's actor start and model load are).
The variants alternate within each round, so that load from other processes weighs on all alike; each
reports the median, minimum and maximum images per second over the rounds, after one warm-up round on
``--batch-size`` images.
"""

import argparse
import itertools
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np
import ray
import torch

from maskrcnn.batch import BATCH_SIZE, ModelSpec, RayOptions, predict_batch
from maskrcnn.cli import run
from maskrcnn.config import config_to_dict, load_config
from maskrcnn.data.shapes import render_image
from maskrcnn.fileio import read_image
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.precision import machine_summary
from maskrcnn.predictor import Predictor

from .speed import machine_line

CONFIG = Path(__file__).parents[1] / "configs" / "maskrcnn_R18_FPN_small.yaml"
IMAGE_SIDES = (128, 256)  # the demo's shapes images: each side drawn in this range (pixels)
RAY_CPUS = 2


def write_images(folder: Path, count: int) -> List[str]:
    """``count`` shapes images as JPEG files; their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels, _ = render_image(rng, min_size=IMAGE_SIDES[0], max_size=IMAGE_SIDES[1])
        paths.append(str(folder / f"{i:06d}.jpg"))
        cv2.imwrite(paths[-1], cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    return paths


def write_random_checkpoint(path: Path) -> Path:
    """The small config's model with seeded random weights, as a checkpoint."""
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                "class_names": ["square", "circle", "triangle"]}, path)
    return path


def run_batch_benchmark(*, images: int = 48, repeats: int = 3, batch_size: int = BATCH_SIZE, actors: int = RAY_CPUS,
                        checkpoint: Optional[str] = None, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Figures per variant (``predictor loop``, ``local engine``, ``ray engine``): ``median``, ``min``, ``max``
    images per second and ``detections`` per round; plus ``images``, ``repeats``, ``batch_size``, ``actors``,
    ``weights`` and where the figures hold (:func:`maskrcnn.precision.machine_summary`)."""
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # token authentication, no token file written
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        progress(f"writing {images} images")
        paths = write_images(folder / "images", images)
        model = checkpoint or str(write_random_checkpoint(folder / "model.pth"))
        spec = ModelSpec(checkpoint=model)
        predictor = Predictor.from_checkpoint(model, mask_format="rle")
        outputs = itertools.count()

        def loop(paths: List[str]) -> int:
            return sum(len(predictor(read_image(path)).to_coco(image_id=path)) for path in paths)

        def engine(name: str) -> Callable[[List[str]], int]:
            def job(paths: List[str]) -> int:
                return predict_batch(paths, folder / f"out{next(outputs)}", spec, engine=name, batch_size=batch_size,
                                     ray=RayOptions(actors=actors), progress=False)["detections"]
            return job

        variants = {"predictor loop": loop, "local engine": engine("local"), "ray engine": engine("ray")}
        progress(f"starting a local Ray instance of {RAY_CPUS} CPUs")
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            progress("warm-up")
            for variant in variants.values():
                variant(paths[:batch_size])
            rates: Dict[str, List[float]] = {name: [] for name in variants}
            detections: Dict[str, int] = {}
            for round_index in range(repeats):
                for name, variant in variants.items():
                    progress(f"round {round_index + 1}/{repeats}: {name}")
                    start = time.perf_counter()
                    detections[name] = variant(paths)
                    rates[name].append(len(paths) / (time.perf_counter() - start))
        finally:
            ray.shutdown()
    figures = {"images": images, "repeats": repeats, "batch_size": batch_size, "actors": actors,
               "weights": checkpoint or "random (seed 0)", "variants": list(variants), **machine_summary()}
    for name in variants:
        figures[name] = {"median": statistics.median(rates[name]), "min": min(rates[name]), "max": max(rates[name]),
                         "detections": detections[name]}
    return figures


def format_batch_report(figures: dict) -> str:
    """A Markdown table: images per second, median (min-max) over the rounds, and the ratio to the loop."""
    base = figures["predictor loop"]["median"]
    lines = [machine_line(figures),
             f"{figures['images']} images, {figures['repeats']} rounds, batches of {figures['batch_size']}, "
             f"Ray: {figures['actors']} actors of 1 CPU; weights: {figures['weights']}",
             "", "| variant | images/s, median (min-max) | vs loop | detections |", "| --- | --- | --- | --- |"]
    for name in figures["variants"]:
        f = figures[name]
        lines.append(f"| {name} | {f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f}) | {f['median'] / base:.2f}x | "
                     f"{f['detections']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per round (the issue's figure: 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass of the engines")
    parser.add_argument("--actors", type=int, default=RAY_CPUS, help="Ray actors (1 CPU each)")
    parser.add_argument("--checkpoint", default=None, help="trained weights (default: random, seed 0)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    figures = run_batch_benchmark(images=args.images, repeats=args.repeats, batch_size=args.batch_size,
                                  actors=args.actors, checkpoint=args.checkpoint,
                                  progress=lambda message: print(f"[benchmark] {message}", file=sys.stderr,
                                                                 flush=True))
    print(json.dumps(figures) if args.json else format_batch_report(figures))


if __name__ == "__main__":
    run(main)
