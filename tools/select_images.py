"""Choose the next images to label from a folder of unlabelled ones: those the model is least sure of, spread
over what the pool holds (mask and score uncertainty, diversity; see maskrcnn/active.py).

    python tools/select_images.py --checkpoint output/train/model_final.pth --images unlabelled/ --budget 100 \
        --output output/next --format labelme [--exclude labelled.txt]

Writes ``selected.txt`` (the chosen images' paths, best first), ``selection.json`` (each one's scores) and the
chosen images' detections as pre-annotations for the tool, in ``<output>/<format>/`` (see
docs/annotation-tools.md), those scoring at least the checkpoint's own threshold.
"""

import argparse
from pathlib import Path

from tqdm import tqdm

from maskrcnn.active import (embeddings, informativeness, read_exclude, score_pool, select_images,
                             write_selection)
from maskrcnn.cli import require_at_least, run
from maskrcnn.config import RoIHeadsConfig
from maskrcnn.data.formats.preannotate import PREANNOTATION_FORMATS, PreannotationWriter
from maskrcnn.errors import InputError
from maskrcnn.fileio import image_files
from maskrcnn.predictor import PRECISIONS, Predictor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    parser.add_argument("--images", required=True, help="folder of unlabelled images (the pool)")
    parser.add_argument("--budget", type=int, required=True, help="how many images to choose")
    parser.add_argument("--output", required=True, help="folder for selected.txt, selection.json and pre-annotations")
    parser.add_argument("--format", choices=PREANNOTATION_FORMATS, default="labelme", help="pre-annotation format")
    parser.add_argument("--score-thresh", type=float, default=RoIHeadsConfig.score_thresh,
                        help="detections scoring below do not count towards uncertainty (default: the library's "
                             f"detection threshold, {RoIHeadsConfig.score_thresh}, whatever the checkpoint's)")
    parser.add_argument("--exclude", default=None, help="file listing images to leave out (one path a line)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help="default: the checkpoint's")
    args = parser.parse_args(argv)
    require_at_least(args, budget=1, score_thresh=0.0)

    excluded = read_exclude(args.exclude) if args.exclude else set()
    paths = [path for path in image_files(args.images) if path.name not in excluded]
    if args.budget > len(paths):
        raise InputError(f"--budget {args.budget} is more than the {len(paths)} images of {args.images}"
                         + (f" left after --exclude {args.exclude}" if excluded else ""))
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision,
                                          score_thresh=args.score_thresh)
    with tqdm(paths, desc="pool", unit="img") as progress:  # closed before an error is printed
        pool = score_pool(predictor, progress)
    values = informativeness(pool)
    chosen = select_images(values, embeddings(pool), args.budget)
    output = Path(args.output)
    written = write_selection(output, pool, chosen, settings={
        "checkpoint": str(args.checkpoint), "images": str(args.images), "budget": args.budget,
        "score_thresh": args.score_thresh, "exclude": args.exclude}, values=values)
    print(f"{written[0]}: {args.budget} of {len(pool)} images, best first")
    print(f"{written[1]}: each chosen image's informativeness, mask and score uncertainty, distance")
    writer = PreannotationWriter(args.format, output / args.format, class_names=predictor.class_names,
                                 score_thresh=predictor.config.model.roi_heads.score_thresh,
                                 model_version=Path(args.checkpoint).name)
    for index in chosen.index:
        writer.add(pool[index].path, predictor(pool[index].path))
    print("\n".join(writer.finish().lines()))


if __name__ == "__main__":
    run(main)
