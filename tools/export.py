"""Export a checkpoint's network to ONNX, for onnxruntime or OpenVINO.

    python tools/export.py --checkpoint output/train/model_final.pth --output output/model.onnx
    python tools/export.py --checkpoint output/train/model_final.pth --output output/model.onnx \
        --int8-calibration data/shapes/train          # also output/model.int8.xml, for OpenVINO

The file takes a normalised, padded image batch and returns per image boxes, scores, labels and S x S
mask probabilities (see ``maskrcnn.deploy.export``); its metadata carries the class names, the input
normalisation and resize, and the thresholds. Run it with ``maskrcnn.deploy.runtime.ExportedPredictor``.
With ``--int8-calibration`` the backbone and FPN are also quantised to int8 on the first
``--calibration-count`` images of that folder (take them from the training split) and written as an
OpenVINO IR next to the ONNX file (``maskrcnn.deploy.quantize``; ``python -m benchmarks.int8_report`` measures its AP).
"""

import argparse

from maskrcnn.cli import require_at_least, run
from maskrcnn.deploy.export import export_onnx
from maskrcnn.deploy.quantize import quantize_int8
from maskrcnn.fileio import image_files
from maskrcnn.predictor import Predictor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="detections scoring below are dropped inside the graph (default: the checkpoint's "
                             "roi_heads.score_thresh)")
    parser.add_argument("--int8-calibration", help="folder of calibration images: also write an int8 OpenVINO IR")
    parser.add_argument("--calibration-count", type=int, default=100, help="calibration images used")
    args = parser.parse_args(argv)
    require_at_least(args, calibration_count=1)
    files = image_files(args.int8_calibration)[:args.calibration_count] if args.int8_calibration else []
    predictor = Predictor.from_checkpoint(args.checkpoint, score_thresh=args.score_thresh)
    path = export_onnx(predictor.model, args.output, class_names=predictor.class_names,
                       label_to_cat_id=predictor.label_to_cat_id)
    print(f"exported {len(predictor.class_names)} classes to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if files:
        int8 = quantize_int8(path, [str(f) for f in files], path.with_suffix(".int8.xml"))
        print(f"quantised the backbone and FPN to int8 on {len(files)} images: {int8} (OpenVINO)")


if __name__ == "__main__":
    run(main)
