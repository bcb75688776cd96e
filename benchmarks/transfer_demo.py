"""Show what starting from the demo model's weights buys on shapes it has never seen.

    python -m benchmarks.transfer_demo --checkpoint output/demo/model_final.pth [--max-iter 300 --eval-period 100]

Generates 100 training and 100 validation images of stars, hexagons and crosses (data/shapes_novel),
trains the demo configuration on them from scratch and from --checkpoint (same settings and iterations),
evaluates both every --eval-period iterations and prints mask and box AP with the training minutes.
Results go to --output (transfer.json, and each run's folder).
"""

import argparse

from maskrcnn.cli import run

from .transfer import compare_transfer, transfer_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="output/demo/model_final.pth", help="the weights to start from")
    parser.add_argument("--config", default="configs/maskrcnn_R18_FPN_small.yaml", help="configuration of both runs")
    parser.add_argument("--data", default="data/shapes_novel", help="folder of the novel shapes split")
    parser.add_argument("--output", default="output/transfer", help="folder for both runs and transfer.json")
    parser.add_argument("--max-iter", type=int, default=300, help="training iterations of each run")
    parser.add_argument("--eval-period", type=int, default=100, help="evaluate every this many iterations")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="configuration overrides")
    args = parser.parse_args(argv)
    results = compare_transfer(config=args.config, checkpoint=args.checkpoint, data_dir=args.data,
                               output_dir=args.output, max_iter=args.max_iter, eval_period=args.eval_period,
                               overrides=args.overrides)
    print(transfer_table(results))


if __name__ == "__main__":
    run(main)
