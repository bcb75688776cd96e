"""Generate the synthetic shapes dataset (COCO format); reuses an existing one made with the same options."""

import argparse
import time

from maskrcnn.cli import run
from maskrcnn.config import ShapesConfig
from maskrcnn.data.shapes import CATEGORY_SETS, generate_shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/shapes", help="output folder")
    parser.add_argument("--num-train", type=int, default=ShapesConfig.num_train, help="training images")
    parser.add_argument("--num-val", type=int, default=ShapesConfig.num_val, help="validation images")
    parser.add_argument("--seed", type=int, default=ShapesConfig.seed, help="generation seed")
    parser.add_argument("--min-size", type=int, default=ShapesConfig.min_size, help="smallest image side (pixels)")
    parser.add_argument("--max-size", type=int, default=ShapesConfig.max_size, help="largest image side (pixels)")
    parser.add_argument("--categories", default=ShapesConfig.categories, choices=sorted(CATEGORY_SETS),
                        help="square, circle, triangle (basic), star, hexagon, cross (novel) or sunburst, gear, "
                             "comb (edges: large thin shapes, for --min-size 512 --max-size 800)")
    parser.add_argument("--rare-fraction", type=float, default=ShapesConfig.rare_fraction,
                        help="long-tailed training split: the last category is drawn this often relative to "
                             "each other one (0.1: a tenth as often); the validation split stays balanced")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generated = generate_shapes(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                                min_size=args.min_size, max_size=args.max_size, categories=args.categories,
                                rare_fraction=args.rare_fraction, progress=True)
    if generated:
        print(f"wrote {args.num_train} training and {args.num_val} validation images to {args.out} "
              f"in {time.perf_counter() - start:.1f} s")
    else:
        print(f"{args.out} already holds this dataset (same options); nothing to do")


if __name__ == "__main__":
    run(main)
