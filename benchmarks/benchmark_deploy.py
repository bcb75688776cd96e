"""Speed of the exported model (onnxruntime, OpenVINO f32, bf16 and int8) against eager PyTorch (fp32, bf16),
side by side in one process on the same image.

    python -m benchmarks.benchmark_deploy                  # R50-FPN, one 800 x 1200 image, 100 detections
    python -m benchmarks.benchmark_deploy --size 512 --repeats 3 --json
    python -m benchmarks.benchmark_deploy --mode both     # the bf16 variants too where bf16 is emulated

Prints where the figures hold (CPU, ISA, native bf16, threads), then a Markdown table: median (min-max)
seconds per image, image in and pasted masks out, the speed ratio against eager fp32 and the exported
graph's time alone. The bf16 variants run only where the CPU computes bf16 natively unless ``--mode``
asks for them. See :mod:`benchmarks.deploy_speed`.
"""

import argparse
import json
import sys

from maskrcnn.cli import run

from .deploy_speed import format_deploy_report, run_deploy_benchmark
from .speed import MODES, choose_modes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=800, help="the image is SIZE x 1.5 SIZE pixels")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (score threshold 0)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument("--mode", default="auto", choices=[*MODES, "both", "auto"],
                        help="precision(s) to measure; auto: the bf16 variants only where the CPU computes bf16 "
                             "natively")
    args = parser.parse_args(argv)
    modes, why = choose_modes(args.mode)
    print(f"[benchmark] measuring {why}", file=sys.stderr, flush=True)
    figures = run_deploy_benchmark(size=args.size, detections=args.detections, repeats=args.repeats, modes=modes,
                                   progress=lambda message: print(f"[benchmark] {message}", file=sys.stderr,
                                                                  flush=True))
    print(json.dumps(figures) if args.json else format_deploy_report(figures))


if __name__ == "__main__":
    run(main)
