"""Speed and memory of this Mask R-CNN against torchvision's, side by side in one process.

    python -m benchmarks.benchmark                     # 800 x 1200 images, 100 detections; fp32, and bf16 where native
    python -m benchmarks.benchmark --mode bf16 --quick --json
    python -m benchmarks.benchmark --architecture configs/maskrcnn_R50_FPN_v2.yaml --quick   # the v2 model

Prints, per inference stage and end to end, the median time of both models and their ratio
(torchvision / ours), peak memory, the mask paste against torchvision's and against writing the output,
and one training step of R50-FPN (2 images, 512 px) and of the small configuration. The R50-FPN is
torchvision's v1 architecture unless ``--architecture`` names a config file whose model section sets
another (``configs/maskrcnn_R50_FPN_v2.yaml``: torchvision's ``maskrcnn_resnet50_fpn_v2``). ``--json`` prints
all figures as one JSON line instead. See :mod:`benchmarks.speed` for what is measured and how.
"""

import argparse
import json
import sys

import torch

from maskrcnn.cli import run

from .speed import MODES, choose_modes, format_report, run_benchmark


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="auto", choices=[*MODES, "both", "auto"],
                        help="precision(s) to measure; auto: bf16 too only where the CPU/GPU computes it natively")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes on a 2-core CPU)")
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON line")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=800, help="inference images are SIZE x 1.5 SIZE pixels")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (score threshold 0)")
    parser.add_argument("--train-config", default="configs/maskrcnn_R18_FPN_small.yaml",
                        help="YAML of the small model whose training step is measured")
    parser.add_argument("--architecture", default=None,
                        help="config YAML whose model section is the R50-FPN measured (default: torchvision's v1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes, why = choose_modes(args.mode, args.device)
    print(f"[benchmark] measuring {why}", file=sys.stderr, flush=True)
    figures = run_benchmark(modes=modes, quick=args.quick, device=args.device, size=args.size,
                            detections=args.detections, train_config=args.train_config,
                            architecture=args.architecture,
                            progress=lambda message: print(f"[benchmark] {message}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()}))
    else:
        print(format_report(figures))


if __name__ == "__main__":
    run(main)
