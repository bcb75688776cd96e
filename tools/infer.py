"""Run a checkpoint on an image or a folder of images.

    python tools/infer.py --checkpoint output/train/model_final.pth --input photos/ --output output/infer

Writes, per image, ``<name>.png`` (masks, boxes and labels drawn over the image) and with
``--label-map`` ``<name>_labels.png`` (pixels coloured by class, with a legend), plus ``results.json``:
COCO result dicts for every image, whose ``image_id`` is the file name, or its number when the name is
all digits (COCO style, ``000000397133.jpg`` -> 397133), and whose ``category_id`` is the model label.

A video file (``.mp4``, ``.avi``, ``.mov``, ...) gives ``<name>.mp4`` (the overlay, same size and frame rate)
and ``<name>.jsonl`` (one line per frame: its COCO results, masks as RLE), frames run ``--batch-size`` at a time.

``results.json`` and the JSON lines hold every detection the model returns (``--score-thresh``, else the
checkpoint's own threshold); the overlays and label maps draw those scoring at least ``--draw-thresh``.

``--format labelme|cvat|label-studio`` also writes the detections as pre-annotations that tool imports, in
``<output>/<format>/`` (see docs/annotation-tools.md).
"""

import argparse
from pathlib import Path

from tqdm import tqdm

from maskrcnn.cli import require_at_least, run
from maskrcnn.config import DISPLAY_SCORE_THRESH
from maskrcnn.data.formats.preannotate import PREANNOTATION_FORMATS, PreannotationWriter
from maskrcnn.errors import InputError
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
    parser.add_argument("--draw-thresh", type=float, default=None,
                        help="overlays draw detections scoring at least this (default: the display threshold, "
                             "maskrcnn.config.DISPLAY_SCORE_THRESH)")
    parser.add_argument("--format", choices=PREANNOTATION_FORMATS, default=None,
                        help="also write the detections as pre-annotations for that tool, in <output>/<format>/")
    parser.add_argument("--classes", nargs="+", default=None, help="with --format: the classes to write (default: all)")
    parser.add_argument("--simplify", type=float, default=None,
                        help="with --format: polygon simplification tolerance in pixels (default 1; 0: exact outlines)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N"')
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="default: the checkpoint's model.precision (auto: bf16 where native, else fp32)")
    parser.add_argument("--label-map", action="store_true", help="also write a per-class label map per image")
    parser.add_argument("--batch-size", type=int, default=4, help="video frames per forward pass")
    args = parser.parse_args(argv)
    require_at_least(args, batch_size=1)

    source = Path(args.input)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    paths = image_files(source) if source.is_dir() else [source]
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision,
                                          score_thresh=args.score_thresh)
    print(predictor.resolved_precision.message)
    num_classes = len(predictor.class_names)
    output = Path(args.output)
    draw_thresh = DISPLAY_SCORE_THRESH if args.draw_thresh is None else args.draw_thresh
    if source.suffix.lower() in VIDEO_SUFFIXES:
        if args.format:
            raise InputError(f"--format writes pre-annotations of images; {source} is a video")
        done = detect_video(predictor, source, output, batch_size=args.batch_size, draw_thresh=draw_thresh)
        print(f"{done['frames']} frames, {done['frames_per_s']:.2f} frames/s; written to {output}")
        return
    preannotations = PreannotationWriter(args.format, output / args.format, class_names=predictor.class_names,
                                         classes=args.classes, tolerance=args.simplify,
                                         model_version=Path(args.checkpoint).name) if args.format else None
    results = []
    for path in tqdm(paths, desc="inference", unit="img", disable=len(paths) == 1):
        image = read_image(path)
        instances = predictor(image)
        shown = instances.filter(draw_thresh)
        save_png(output / f"{path.stem}.png", draw_instances(image, shown, score_thresh=None))
        if args.label_map:
            labels = sorted(set(shown.labels.tolist()))
            classes = label_map(shown.masks, shown.labels, num_classes, scores=shown.scores)
            save_png(output / f"{path.stem}_labels.png",
                     add_legend(classes, labels, [predictor.class_names[label - 1] for label in labels]))
        results.extend(instances.to_coco(int(path.stem) if path.stem.isdigit() else path.name))
        if preannotations is not None:
            preannotations.add(path, instances)
    save_json(output / "results.json", results)
    print(f"{len(paths)} images, {len(results)} detections; written to {output}")
    if preannotations is not None:
        print("\n".join(preannotations.finish().lines()))


if __name__ == "__main__":
    run(main)
