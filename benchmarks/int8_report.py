"""Does int8 keep the accuracy? Box and mask AP of a checkpoint run by OpenVINO in f32 and with its
backbone and FPN quantised to int8 (NNCF), on the same evaluation set.

    python -m benchmarks.int8_report --checkpoint output/demo/model_final.pth \
        --calibration data/shapes/train --ann data/shapes/annotations/instances_val.json --images data/shapes/val

Calibrates on the first ``--calibration-count`` images of ``--calibration`` (take them from the training
split), evaluates both models with pycocotools and prints AP, the drop in AP points and whether it is
within the 1-point mask AP limit under which int8 is offered. Writes ``model.onnx``, ``model.int8.xml``
and ``int8_report.json`` to ``--output`` (default: an ``int8`` folder next to the checkpoint).
See :mod:`benchmarks.int8`.
"""

import argparse
import sys
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.fileio import save_json

from .int8 import format_int8_report, run_int8_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    parser.add_argument("--calibration", required=True, help="folder of calibration images (training split)")
    parser.add_argument("--calibration-count", type=int, default=100, help="calibration images used")
    parser.add_argument("--ann", required=True, help="COCO instances json of the evaluation set")
    parser.add_argument("--images", required=True, help="folder holding the images of --ann")
    parser.add_argument("--preset", default="mixed", choices=["mixed", "performance"],
                        help="NNCF preset: asymmetric (mixed) or symmetric (performance) activations")
    parser.add_argument("--output", help="folder for the exported files and int8_report.json")
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / "int8"
    report = run_int8_report(args.checkpoint, args.calibration, args.ann, args.images, output,
                             calibration_count=args.calibration_count, preset=args.preset,
                             progress=lambda message: print(f"[int8] {message}", file=sys.stderr, flush=True))
    save_json(output / "int8_report.json", report)
    print(format_int8_report(report))


if __name__ == "__main__":
    run(main)
