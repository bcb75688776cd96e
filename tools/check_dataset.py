"""Check a COCO instances dataset before training: list every problem, print and plot statistics.

    python tools/check_dataset.py --ann data/mine/instances_train.json --images data/mine/images \
        [--output output/check] [--draw 8] [--write-clean data/mine/instances_train_clean.json]

Each problem is printed on one line naming the file, image id and annotation id. The exit status is 1
when there is any error, 0 otherwise (warnings alone pass), and 2 when the input cannot be read at all.
Writes ``dataset_stats.png`` to --output; --draw N writes N annotation overlays there; --write-clean
writes a copy without the bad annotations and images.
"""

import argparse
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.data.check import check_dataset, format_report, plot_statistics, write_clean
from maskrcnn.visualize import write_ground_truth_overlays


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="COCO instances json")
    parser.add_argument("--images", required=True, help="folder holding the images of --ann")
    parser.add_argument("--output", default="output/check", help="folder for the statistics PNG and overlays")
    parser.add_argument("--draw", type=int, default=0, metavar="N", help="write N ground-truth overlays")
    parser.add_argument("--write-clean", metavar="OUT.json", help="write a copy without the bad annotations")
    args = parser.parse_args(argv)
    output = Path(args.output)
    result = check_dataset(args.ann, args.images, progress=True)
    print(format_report(result))
    plot_statistics(result.stats, output / "dataset_stats.png")
    print(f"statistics: {output / 'dataset_stats.png'}")
    if args.draw > 0:
        bad = result.bad_image_ids | {p.image_id for p in result.errors}
        files = write_ground_truth_overlays(args.ann, args.images, output / "overlays", count=args.draw,
                                            skip_image_ids=bad)
        print(f"{len(files)} overlays: {output / 'overlays'}")
    if args.write_clean:
        removed = write_clean(args.ann, args.write_clean, result)
        print(f"clean copy without {removed['annotations']} annotations and {removed['images']} images: "
              f"{args.write_clean}")
    if result.errors:
        raise SystemExit(1)


if __name__ == "__main__":
    run(main)
