"""Time and peak memory of tiled inference on one large image (8000 x 6000 by default).

    python -m benchmarks.bench_tiling --config configs/maskrcnn_R18_FPN_small.yaml
    python -m benchmarks.bench_tiling --width 2000 --height 1500 --tile-size 256 --tile-overlap 64

Builds the configuration's model with seeded random weights (nothing is downloaded), draws a synthetic
image of ellipses and runs ``Predictor(..., tile_size, tile_overlap)`` on it in a fresh process; prints the
seconds, the peak resident set size against the size before the call, and the detection count. See
:func:`benchmarks.scale.tiled_inference_figures`.
"""

import argparse
import json

from maskrcnn.cli import run

from .scale import tiled_inference_figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/maskrcnn_R18_FPN_small.yaml", help="YAML of the model")
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--tile-size", type=int, default=512, help="tile side in pixels (the model's input size)")
    parser.add_argument("--tile-overlap", type=int, default=128, help="pixels shared by neighbouring tiles")
    parser.add_argument("--tiles-per-batch", type=int, default=4, help="tiles per forward pass")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="detections scoring below are dropped (default: the config's roi_heads.score_thresh)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    figures = tiled_inference_figures(args.config, height=args.height, width=args.width, tile_size=args.tile_size,
                                      tile_overlap=args.tile_overlap, tiles_per_batch=args.tiles_per_batch,
                                      score_thresh=args.score_thresh, threads=args.threads)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.width} x {args.height} image, {figures['tiles']} tiles of {args.tile_size} px "
          f"(overlap {args.tile_overlap}), {args.tiles_per_batch} per batch: {figures['seconds']:.1f} s, "
          f"{figures['detections']} detections")
    print(f"peak RSS {figures['peak_rss_mb']:.0f} MiB, {figures['peak_rss_mb'] - figures['baseline_rss_mb']:.0f} MiB "
          f"above the {figures['baseline_rss_mb']:.0f} MiB before the call (model, uint8 image); the float image "
          f"alone is {figures['image_float_mb']:.0f} MiB, one full-size canvas per detection would be "
          f"{figures['full_canvas_per_detection_mb']:.0f} MiB")


if __name__ == "__main__":
    run(main)
