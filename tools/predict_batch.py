"""Batch inference over very many images, resumable: one row per image in Parquet (or JSONL) shards.

    python tools/predict_batch.py --input photos/ --checkpoint output/demo/model_final.pth --output output/rows
    python tools/predict_batch.py --input "shots/**/*.jpg" --onnx model.onnx --runtime openvino --output rows
    python tools/predict_batch.py --input paths.parquet --checkpoint m.pth --output rows --engine ray --actors 4

Rerun the same command after a stop: the images the shards cover are skipped. Each row holds the image's
path, height, width and detections (COCO results: category id, bbox, score, segmentation as RLE) or an
error. docs/batch-inference.md has the schema and running on a Ray cluster.
"""

import argparse

from maskrcnn.batch import BATCH_SIZE, ENGINES, FORMATS, SHARD_SIZE, ModelSpec, RayOptions, list_inputs, predict_batch
from maskrcnn.batch.local import READERS
from maskrcnn.batch.sources import PATH_COLUMN
from maskrcnn.cli import run
from maskrcnn.deploy.runtime import RUNTIMES
from maskrcnn.precision import PRECISIONS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a folder, a glob, a text file of paths or a .parquet file")
    parser.add_argument("--path-column", default=PATH_COLUMN, help="the image path column of a .parquet input")
    parser.add_argument("--recursive", action="store_true", help="a folder input: its whole tree")
    parser.add_argument("--output", required=True, help="folder of the shards (rerun on it to resume)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file written by training")
    model.add_argument("--onnx", help="exported model (ONNX, or OpenVINO int8 .xml)")
    parser.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES, help="what runs --onnx")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda" or "cuda:N" (a checkpoint)')
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="auto: bf16 where natively computed, else fp32 (default: the model's own)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="detections scoring below are dropped (default: the model's own)")
    parser.add_argument("--format", default="parquet", choices=FORMATS, help="shard format")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="images per shard, at least")
    parser.add_argument("--engine", default="local", choices=ENGINES, help="local: this process; ray: Ray Data")
    parser.add_argument("--readers", type=int, default=READERS, help="local: threads decoding images ahead")
    parser.add_argument("--address", default=None, help="ray: cluster to join (default: a local instance)")
    parser.add_argument("--actors", type=int, default=RayOptions.actors, help="ray: model replicas at once")
    parser.add_argument("--cpus-per-actor", type=float, default=RayOptions.cpus_per_actor, help="ray: CPUs each")
    parser.add_argument("--gpus-per-actor", type=float, default=RayOptions.gpus_per_actor, help="ray: GPUs each")
    args = parser.parse_args(argv)

    spec = ModelSpec(checkpoint=args.checkpoint, onnx=args.onnx, runtime=args.runtime, device=args.device,
                     precision=args.precision, score_thresh=args.score_thresh)
    ray = RayOptions(address=args.address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                     gpus_per_actor=args.gpus_per_actor)
    paths = list_inputs(args.input, path_column=args.path_column, recursive=args.recursive)
    done = predict_batch(paths, args.output, spec, engine=args.engine, output_format=args.format,
                         batch_size=args.batch_size, shard_size=args.shard_size, readers=args.readers, ray=ray)
    print(f"{done['images']} images: {done['done_before']} done before, {done['written']} now "
          f"({done['images_per_s']:.2f} images/s), {done['detections']} detections; {done['errors']} unreadable "
          f"(rows with an error); written to {args.output}")


if __name__ == "__main__":
    run(main)
