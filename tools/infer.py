"""Run a checkpoint on an image or a folder of images.

    python tools/infer.py --checkpoint output/train/model_final.pth --input photos/ --output output/infer

Writes, per image, ``<name>.png`` (masks, boxes and labels drawn over the image) and with
``--label-map`` ``<name>_labels.png`` (pixels coloured by class, with a legend), plus ``results.json``:
COCO result dicts for every image, whose ``image_id`` is the file name, or its number when the name is
all digits (COCO style, ``000000397133.jpg`` -> 397133), and whose ``category_id`` is the model label.

A video file (``.mp4``, ``.avi``, ``.mov``, ...) gives ``<name>.mp4`` (the overlay, same size and frame rate)
and ``<name>.jsonl`` (one line per frame: its COCO results, masks as RLE), frames run ``--batch-size`` at a time.
"""

import argparse
from pathlib import Path

from tqdm import tqdm

from maskrcnn.cli import run
from maskrcnn.fileio import image_files, save_json
from maskrcnn.predictor import PRECISIONS, Predictor, read_image
from maskrcnn.video import VIDEO_SUFFIXES, detect_video
from maskrcnn.visualize import add_legend, draw_instances, label_map, save_png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    parser.add_argument("--input", required=True, help="an image file, a folder of images or a video file")
    parser.add_argument("--output", required=True, help="folder for the PNGs and results.json")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="detections scoring below are dropped (default: the checkpoint's roi_heads.score_thresh)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 where the CPU/GPU computes it natively, else fp32")
    parser.add_argument("--label-map", action="store_true", help="also write a per-class label map per image")
    parser.add_argument("--batch-size", type=int, default=4, help="video frames per forward pass")
    args = parser.parse_args(argv)

    source = Path(args.input)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    paths = image_files(source) if source.is_dir() else [source]
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision,
                                          score_thresh=args.score_thresh)
    print(predictor.resolved_precision.message)
    num_classes = len(predictor.class_names)
    output = Path(args.output)
    if source.suffix.lower() in VIDEO_SUFFIXES:
        done = detect_video(predictor, source, output, batch_size=args.batch_size, score_thresh=args.score_thresh)
        print(f"{done['frames']} frames, {done['frames_per_s']:.2f} frames/s; written to {output}")
        return
    results = []
    for path in tqdm(paths, desc="inference", unit="img", disable=len(paths) == 1):
        image = read_image(path)
        instances = predictor(image)
        save_png(output / f"{path.stem}.png", draw_instances(image, instances, score_thresh=None))
        if args.label_map:
            labels = sorted(set(instances.labels.tolist()))
            classes = label_map(instances.masks, instances.labels, num_classes, scores=instances.scores)
            save_png(output / f"{path.stem}_labels.png",
                     add_legend(classes, labels, [predictor.class_names[label - 1] for label in labels]))
        results.extend(instances.to_coco(int(path.stem) if path.stem.isdigit() else path.name))
    save_json(output / "results.json", results)
    print(f"{len(paths)} images, {len(results)} detections; written to {output}")


if __name__ == "__main__":
    run(main)
