"""Show, from a trained checkpoint and one annotated image, how Mask R-CNN learns masks.

    python tools/explain.py --checkpoint output/demo/model_final.pth --shapes \
        [--log output/demo/metrics.jsonl] [--metrics output/demo/metrics.json] [--output output/explain]
    python tools/explain.py --checkpoint model.pth --image val/000042.jpg --ann instances_val.json

    python tools/explain.py --refinement --checkpoint output/edges/refined/model_final.pth \
        --image data/shapes_edges/val/000003.jpg --ann data/shapes_edges/annotations/instances_val.json

Writes the figures input_gt.png, fpn_levels.png, rpn_anchors.png, rpn_proposals.png, mask_targets.png,
mask_gradients.png, paste.png, final.png, generalisation.png and a page explain.md tying them together.
With --shapes the image comes from the training split of the shapes dataset and the held-out image from its
validation split; with --image, a held-out image needs --heldout-ann and --heldout-images. --refinement (a model
with a point head) writes refinement.png alone: the largest detection's 28x28 and refined masks, and the points.
"""

import argparse
from pathlib import Path

from maskrcnn.cli import require_at_least, run
from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.diagnostics.figures import explain_checkpoint, mask_caption
from maskrcnn.diagnostics.refinement import explain_refinement, refinement_caption
from maskrcnn.diagnostics.trace import locate_image
from maskrcnn.errors import InputError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="the image file to explain (needs --ann)")
    source.add_argument("--shapes", action="store_true", help="explain an image of the synthetic shapes dataset")
    parser.add_argument("--ann", help="COCO instances json holding --image")
    parser.add_argument("--image-id", type=int, help="COCO id of the image (default: found by file name with "
                                                     "--image; the first with two or more instances with --shapes)")
    parser.add_argument("--shapes-dir", default="data/shapes", help="the shapes dataset folder")
    parser.add_argument("--refinement", action="store_true", help="write refinement.png alone (a refined model)")
    parser.add_argument("--heldout-image-id", type=int, help="COCO id of the held-out image (default: the first "
                                                             "with two or more instances)")
    parser.add_argument("--heldout-ann", help="COCO json of held-out images (with --image)")
    parser.add_argument("--heldout-images", help="folder of the held-out images (with --image)")
    parser.add_argument("--log", help="training metrics.jsonl, for the loss curve")
    parser.add_argument("--metrics", help="metrics.json with the validation AP (evaluation or training summary)")
    parser.add_argument("--output", default="output/explain", help="folder for the figures and explain.md "
                                                                     "(default: output/explain)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--score-thresh", type=float, default=DISPLAY_SCORE_THRESH,
                        help="detections drawn score at least this")
    parser.add_argument("--num-rois", type=int, default=4, help="positive RoIs shown in mask_targets.png")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling of anchors and RoIs")
    args = parser.parse_args(argv)
    require_at_least(args, num_rois=1)

    if args.shapes:
        shapes = Path(args.shapes_dir)
        ann, images, image_id, label = shapes / "annotations" / "instances_train.json", shapes / "train", \
            args.image_id, "training image"
        heldout_ann, heldout_images = shapes / "annotations" / "instances_val.json", shapes / "val"
    else:
        if args.ann is None:
            raise InputError("--image needs --ann")
        image = Path(args.image)
        if not image.is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        image_id, images = locate_image(args.ann, image, args.image_id)
        ann, label = args.ann, "explained image"
        heldout_ann, heldout_images = args.heldout_ann, args.heldout_images
    if args.refinement:
        view = explain_refinement(args.checkpoint, ann_file=ann, image_dir=images, image_id=image_id,
                                  output_dir=args.output, device=args.device, score_thresh=args.score_thresh)
        print(refinement_caption(view, view["class_names"]))
        print(f"{view['file']} written")
        return
    result = explain_checkpoint(args.checkpoint, ann_file=ann, image_dir=images, image_id=image_id,
                                heldout_ann=heldout_ann, heldout_images=heldout_images,
                                heldout_image_id=args.heldout_image_id, log=args.log, metrics=args.metrics,
                                output_dir=args.output, device=args.device, score_thresh=args.score_thresh,
                                num_rois=args.num_rois, seed=args.seed, image_label=label)
    print(mask_caption(result))
    print(f"image id {result['image_id']}: {len(result['files'])} files written to {args.output}")


if __name__ == "__main__":
    run(main)
