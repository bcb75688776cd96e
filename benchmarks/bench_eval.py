"""Speed of COCO scoring: pycocotools against faster-coco-eval on a synthetic COCO val-sized results file.

    python -m benchmarks.bench_eval                              # 5,000 images, 100 detections per image
    python -m benchmarks.bench_eval --images 500 --work /tmp/bench_eval

Writes (once, into --work) a synthetic ground truth of ``--images`` 640x480 images with 7.3 polygon objects
per image (COCO val's density) and a results file with ``--detections`` per image, then times
``evaluate_results`` (results loading, matching, accumulation, summary) for bbox and segm with both
backends, each run in its own process, and prints the seconds side by side with their ratio and the AP
of each (which must agree). See :mod:`benchmarks.scale`.
"""

import argparse
import json
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.fileio import save_json

from .scale import bench_evaluation, synthetic_results, write_synthetic_coco


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images in the synthetic ground truth")
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--work", default="output/bench_eval", help="folder for the synthetic json files")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    if args.images < 1 or args.detections < 1:
        raise ValueError(f"--images and --detections must be positive, got {args.images} and {args.detections}")

    work = Path(args.work)
    ann_file = work / f"gt_{args.images}.json"
    results_file = work / f"results_{args.images}x{args.detections}.json"
    work.mkdir(parents=True, exist_ok=True)
    if not ann_file.is_file():
        write_synthetic_coco(ann_file, num_images=args.images, num_annotations=round(7.3 * args.images))
    if not results_file.is_file():
        save_json(results_file, synthetic_results(ann_file, detections_per_image=args.detections))
    figures = bench_evaluation(ann_file, results_file)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.images} images, {args.detections} detections per image")
    print(f"{'':6}{'pycocotools s':>15}{'faster-coco-eval s':>20}{'ratio':>8}{'AP (both)':>20}")
    for iou_type, by_backend in figures.items():
        slow, fast = by_backend["pycocotools"], by_backend["faster-coco-eval"]
        print(f"{iou_type:6}{slow['seconds']:15.1f}{fast['seconds']:20.1f}{slow['seconds'] / fast['seconds']:7.1f}x"
              f"{slow['AP']:10.4f} {fast['AP']:.4f}")


if __name__ == "__main__":
    run(main)
