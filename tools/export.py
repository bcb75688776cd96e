"""Export a checkpoint's network to ONNX, for onnxruntime or OpenVINO.

    python tools/export.py --checkpoint output/train/model_final.pth --output output/model.onnx

The file takes a normalised, padded image batch and returns per image boxes, scores, labels and S x S
mask probabilities (see ``maskrcnn.deploy.export``); its metadata carries the class names, the input
normalisation and resize, and the thresholds. Run it with ``maskrcnn.deploy.runtime.ExportedPredictor``.
"""

import argparse

from maskrcnn.cli import run
from maskrcnn.deploy.export import export_onnx
from maskrcnn.predictor import Predictor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file written by training")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--score-thresh", type=float, default=0.05,
                        help="detections scoring below are dropped inside the graph")
    args = parser.parse_args(argv)
    predictor = Predictor.from_checkpoint(args.checkpoint, score_thresh=args.score_thresh)
    path = export_onnx(predictor.model, args.output, class_names=predictor.class_names,
                       label_to_cat_id=predictor.label_to_cat_id)
    print(f"exported {len(predictor.class_names)} classes to {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run(main)
