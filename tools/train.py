"""Train Mask R-CNN from a YAML configuration.

    python tools/train.py --config configs/maskrcnn_R18_FPN_small.yaml [--resume] [key.sub=value ...]
    torchrun --nproc_per_node=2 tools/train.py --config configs/maskrcnn_R18_FPN_small.yaml solver.ims_per_batch=8

Trailing ``key.sub=value`` arguments override the file (e.g. ``solver.max_iter=2000 train.precision=bf16``).
Outputs go to ``train.output_dir``; ``--resume`` continues from its last checkpoint.
"""

import argparse
import json
import os

from maskrcnn.cli import run
from maskrcnn.config import load_config
from maskrcnn.engine.trainer import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (defaults are used for what it leaves out)")
    parser.add_argument("--resume", action="store_true", help="continue from train.output_dir/last_checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="configuration overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run(main)
