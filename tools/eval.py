"""Evaluate a checkpoint, or its results, on a COCO-format dataset: box, mask and Boundary AP (overall and per
category), images/s.

    python tools/eval.py --checkpoint output/train/model_final.pth \
        --ann data/shapes/annotations/instances_val.json --images data/shapes/val --output output/eval
    torchrun --nproc_per_node=2 tools/eval.py --device cuda --checkpoint ... --ann ... --images ...
    python tools/eval.py --results output/rows --ann ... --images ...   # or --results output/eval/results.json

Scores with pycocotools (default) or ``--backend faster-coco-eval`` (same numbers, faster on large sets).
Prints COCOeval's 12-number summaries and a per-category AP table, and writes ``metrics.json`` and
``results.json`` (COCO results) to ``--output`` (default: an ``eval`` folder next to the checkpoint).
``--results`` scores a results json or a batch output folder of ``tools/predict_batch.py`` (its rows matched
to the images by their path below ``--images``, or by file name without it) instead of running a checkpoint,
and writes ``metrics.json`` to ``--output`` where one is given.
"""

import argparse
from pathlib import Path

from maskrcnn.batch.results import load_results
from maskrcnn.cli import require_at_least, run
from maskrcnn.config import DataConfig
from maskrcnn.distributed import cleanup, get_local_rank, init_distributed
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import BACKENDS, evaluate, evaluate_results, load_coco
from maskrcnn.fileio import save_json
from maskrcnn.predictor import PRECISIONS, Predictor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint file written by training")
    parser.add_argument("--results", help="COCO results json or batch output folder to score (instead of a checkpoint)")
    parser.add_argument("--ann", required=True, help="COCO instances json")
    parser.add_argument("--images", help="folder holding the images of --ann (needed with --checkpoint)")
    parser.add_argument("--output", help="folder for metrics.json and results.json")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="default: the checkpoint's model.precision (auto: bf16 where native, else fp32)")
    parser.add_argument("--num-workers", type=int, default=DataConfig.num_workers, help="image loading processes")
    parser.add_argument("--backend", default="pycocotools", choices=BACKENDS,
                        help="COCOeval implementation: pycocotools (the reference) or faster-coco-eval (same numbers, "
                             "C++ matching; pip install faster-coco-eval)")
    parser.add_argument("--annotation-cache-dir", help="folder for the annotations' cache file when the folder of "
                                                       "--ann is read-only (default: beside --ann)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value changes to the checkpoint's configuration, "
                        "e.g. model.input.min_size_test=144 model.roi_heads.score_thresh=0.01")
    args = parser.parse_args(argv)
    require_at_least(args, batch_size=1, num_workers=0)
    if (args.checkpoint is None) == (args.results is None) or (args.checkpoint and not args.images):
        raise InputError("give --checkpoint with --images (to run the model) or --results (a results json or "
                         "batch output folder)")
    if args.results:
        coco_gt = load_coco(args.ann, args.backend)
        metrics = evaluate_results(coco_gt, load_results(args.results, coco_gt, args.images), backend=args.backend)
        output = Path(args.output) if args.output else None
        if output:
            save_json(output / "metrics.json", metrics)
    else:
        metrics, output = evaluate_checkpoint(args)
    if metrics is not None:
        print((f"{metrics['images']} images, {metrics['images_per_s']:.2f} images/s; " if "images" in metrics else "")
              + f"box AP {metrics['bbox']['AP']:.4f}, mask AP {metrics['segm']['AP']:.4f}"
              + (f", boundary AP {metrics['boundary']['AP']:.4f}" if "boundary" in metrics else "")
              + (f"; written to {output}" if output else ""))


def evaluate_checkpoint(args):
    """Run the checkpoint on the images and score it (on every process under torchrun; metrics on rank 0)."""
    owns_group = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{get_local_rank()}" if owns_group and args.device.startswith("cuda") else args.device
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, args.overrides, device=device, score_thresh=None,
                                              precision=args.precision)
        print(predictor.resolved_precision.message)
        output = Path(args.output) if args.output else Path(args.checkpoint).parent / "eval"
        return evaluate(predictor.inference_model, args.ann, args.images, output, batch_size=args.batch_size,
                        precision=predictor.precision, num_workers=args.num_workers,
                        class_names=predictor.class_names, label_to_cat_id=predictor.label_to_cat_id,
                        backend=args.backend, annotation_cache_dir=args.annotation_cache_dir), output
    finally:
        if owns_group:
            cleanup()


if __name__ == "__main__":
    run(main)
