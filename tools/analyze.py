"""Where a model fails: an error-analysis report of a checkpoint, or of its results, on a COCO dataset.

    python tools/analyze.py --checkpoint output/train/model_final.pth \\
        --ann data/shapes/annotations/instances_val.json --images data/shapes/val --output output/report
    python tools/analyze.py --results output/eval/results.json --ann ... --images ... --output output/report
    python tools/analyze.py --results output/rows --ann ... --images ... --output output/report   # a batch's rows

Writes ``index.html`` (open it in any browser, no server needed) and ``images/`` (gallery thumbnails) to
``--output``, and with ``--checkpoint`` the model's ``results.json``. ``--train-ann``/``--train-images`` add
the AP on a training split, for the train - validation gap (the checkpoint runs on it, or ``--train-results``
gives its results). See docs/analyze.md for what each part of the report means.
"""

import argparse
import shlex
import sys
from pathlib import Path

from maskrcnn.batch.results import load_results
from maskrcnn.cli import require_at_least, run
from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.coco import CocoDetection
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import load_coco, run_inference
from maskrcnn.evaluation.report import write_report
from maskrcnn.fileio import save_json
from maskrcnn.predictor import Predictor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint file written by training (run on the images)")
    parser.add_argument("--results", help="COCO results json, or batch output folder, of the images (instead of "
                                           "running a checkpoint)")
    parser.add_argument("--ann", required=True, help="COCO instances json of the images")
    parser.add_argument("--images", required=True, help="folder holding the images of --ann")
    parser.add_argument("--output", required=True, help="folder for index.html and images/")
    parser.add_argument("--train-ann", help="COCO instances json of a training split, for the generalisation gap")
    parser.add_argument("--train-images", help="folder holding the images of --train-ann")
    parser.add_argument("--train-results", help="COCO results json, or batch output folder, of the training split "
                                                 "(else the checkpoint runs)")
    parser.add_argument("--score-thresh", type=float, default=DISPLAY_SCORE_THRESH,
                        help="gallery and confusion matrix threshold")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.results:
        raise InputError("give --checkpoint (to run the model) or --results (a results json)")
    if args.train_ann and not (args.train_results or (args.checkpoint and args.train_images)):
        raise InputError("--train-ann needs --train-results, or --checkpoint with --train-images")
    require_at_least(args, batch_size=1)

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, score_thresh=None) \
        if args.checkpoint else None

    def results_of(coco_gt, ann, images, results_path):
        if results_path:
            return load_results(results_path, coco_gt, images)
        return run_inference(predictor.inference_model, CocoDetection(ann, images), batch_size=args.batch_size,
                             class_names=predictor.class_names, label_to_cat_id=predictor.label_to_cat_id)

    output, coco_gt = Path(args.output), load_coco(args.ann)
    results = results_of(coco_gt, args.ann, args.images, args.results)
    if not args.results:
        save_json(output / "results.json", results)
    train_gt = load_coco(args.train_ann) if args.train_ann else None
    train = (train_gt, results_of(train_gt, args.train_ann, args.train_images, args.train_results)) \
        if args.train_ann else None
    command = shlex.join(["python", "tools/analyze.py", *(sys.argv[1:] if argv is None else argv)])
    page = write_report(output, coco_gt, results, args.images, command=command, train=train,
                        score_thresh=args.score_thresh)
    print(f"{len(results)} detections analysed; report: {page}")


if __name__ == "__main__":
    run(main)
