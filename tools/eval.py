"""Evaluate a checkpoint on a COCO-format dataset: box and mask AP (overall and per category), images/s.

    python tools/eval.py --checkpoint output/train/model_final.pth \
        --ann data/shapes/annotations/instances_val.json --images data/shapes/val --output output/eval
    torchrun --nproc_per_node=2 tools/eval.py --device cuda --checkpoint ... --ann ... --images ...

Scores with pycocotools (default) or ``--backend faster-coco-eval`` (same numbers, faster on large sets).
Prints COCOeval's 12-number summaries and a per-category AP table, and writes ``metrics.json`` and
``results.json`` (COCO results) to ``--output`` (default: an ``eval`` folder next to the checkpoint).
"""

import argparse
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.distributed import cleanup, get_local_rank, init_distributed
from maskrcnn.evaluation.coco_evaluator import BACKENDS, evaluate
from maskrcnn.predictor import PRECISIONS, Predictor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    parser.add_argument("--ann", required=True, help="COCO instances json")
    parser.add_argument("--images", required=True, help="folder holding the images of --ann")
    parser.add_argument("--output", help="folder for metrics.json and results.json")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 where the CPU/GPU computes it natively, else fp32")
    parser.add_argument("--num-workers", type=int, default=2, help="image loading processes")
    parser.add_argument("--backend", default="pycocotools", choices=BACKENDS,
                        help="COCOeval implementation: pycocotools (the reference) or faster-coco-eval (same numbers, "
                             "C++ matching; pip install faster-coco-eval)")
    parser.add_argument("--annotation-cache-dir", help="folder for the annotations' cache file when the folder of "
                                                       "--ann is read-only (default: beside --ann)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value changes to the checkpoint's configuration, "
                        "e.g. model.input.min_size_test=144 model.roi_heads.score_thresh=0.01")
    args = parser.parse_args(argv)

    owns_group = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    device = f"cuda:{get_local_rank()}" if owns_group and args.device.startswith("cuda") else args.device
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, args.overrides, device=device, score_thresh=None,
                                              precision=args.precision)
        print(predictor.resolved_precision.message)
        output = Path(args.output) if args.output else Path(args.checkpoint).parent / "eval"
        metrics = evaluate(predictor.inference_model, args.ann, args.images, output, batch_size=args.batch_size,
                           precision=predictor.precision, num_workers=args.num_workers,
                           class_names=predictor.class_names, label_to_cat_id=predictor.label_to_cat_id,
                           backend=args.backend, annotation_cache_dir=args.annotation_cache_dir)
    finally:
        if owns_group:
            cleanup()
    if metrics is not None:
        print(f"{metrics['images']} images, {metrics['images_per_s']:.2f} images/s; "
              f"box AP {metrics['bbox']['AP']:.4f}, mask AP {metrics['segm']['AP']:.4f}; written to {output}")


if __name__ == "__main__":
    run(main)
