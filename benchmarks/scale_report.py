"""Annotations at COCO scale: build time, peak memory, cache load time and loader-worker memory against pycocotools.

    python -m benchmarks.scale_report                                  # a train2017-sized synthetic json
    python -m benchmarks.scale_report --images 5000 --annotations 36500 --work /tmp/scale

Writes (once, into --work) a synthetic COCO instances json (train2017's 118,287 images and 862,961 polygon
annotations by default, about 360 MB), then measures, each in a fresh process: pycocotools' ``COCO`` build;
``CocoDetection`` building its packed annotations and cache; ``CocoDetection`` loading that cache; and the
proportional set size (PSS) of ``--workers`` loader workers after a full pass over every image's
annotations, for pycocotools' index and for ours. See :mod:`benchmarks.scale`.
"""

import argparse
import json
from pathlib import Path

from maskrcnn.cli import run

from .scale import TRAIN2017, annotation_report, write_synthetic_coco


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=TRAIN2017["images"], help="images in the synthetic json")
    parser.add_argument("--annotations", type=int, default=TRAIN2017["annotations"], help="polygon annotations")
    parser.add_argument("--workers", type=int, default=4, help="loader workers for the memory measurement")
    parser.add_argument("--work", default="output/scale", help="folder for the synthetic json and its cache")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    if args.images < 1 or args.annotations < 0 or args.workers < 1:
        raise ValueError(f"--images and --workers must be positive and --annotations not negative, got "
                         f"{args.images}, {args.workers} and {args.annotations}")

    ann_file = Path(args.work) / f"instances_synthetic_{args.images}_{args.annotations}.json"
    if not ann_file.is_file():
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_coco(ann_file, num_images=args.images, num_annotations=args.annotations)
    report = annotation_report(ann_file, num_workers=args.workers)
    if args.json:
        print(json.dumps(report))
        return
    coco, build, load = report["pycocotools"], report["ours_build"], report["ours_cache_load"]
    workers_coco, workers_ours = report["workers_pycocotools"], report["workers_ours"]
    print(f"{ann_file}: {ann_file.stat().st_size / 2**20:.0f} MiB, {args.images} images, "
          f"{args.annotations} annotations; cache {report['ours_cache_bytes'] / 2**20:.0f} MiB")
    print(f"{'':34}{'pycocotools':>12}{'ours':>10}{'ratio':>8}")
    rows = [("build (s)", coco["seconds"], build["seconds"]),
            ("build peak RSS (MiB)", coco["peak_rss_mb"], build["peak_rss_mb"]),
            ("  of which at start (MiB)", coco["baseline_rss_mb"], build["baseline_rss_mb"]),
            ("cached: load (s)", coco["seconds"], load["seconds"]),
            ("cached: peak RSS (MiB)", coco["peak_rss_mb"], load["peak_rss_mb"]),
            (f"{workers_ours['workers']} workers' PSS after a pass (MiB)", workers_coco["workers_pss_mb"],
             workers_ours["workers_pss_mb"]),
            ("  their anonymous memory (MiB)", workers_coco["workers_anonymous_mb"],
             workers_ours["workers_anonymous_mb"]),
            ("  main + workers PSS (MiB)", workers_coco["total_pss_mb"], workers_ours["total_pss_mb"])]
    bare = report["workers_none"]
    for name, theirs, ours in rows:
        print(f"{name:34}{theirs:12.1f}{ours:10.1f}{theirs / ours:7.2f}x")
    print(f"workers without any dataset: PSS {bare['workers_pss_mb']:.1f} MiB, "
          f"anonymous {bare['workers_anonymous_mb']:.1f} MiB; main + workers {bare['total_pss_mb']:.1f} MiB")
    print("ratio: pycocotools / ours (above 1: ours is faster or smaller); the cached rows compare pycocotools' "
          "build with our cache load")


if __name__ == "__main__":
    run(main)
