"""Masks as sharp as the objects: the demo configuration trained on the edge shapes with the plain 28 x 28 mask
head and with the point-refined one (``model.roi_heads.mask_refine``), at the same iteration budget from the same
start, and evaluated side by side.

    python -m benchmarks.edges                       # what `make edges` runs
    python -m benchmarks.edges --weights output/demo/model_final.pth --iter 300   # both from a checkpoint instead

1. Data: the edge set of :mod:`maskrcnn.data.shapes` (sunbursts, gears and combs, up to 60 % of the short side
   across), ``NUM_TRAIN`` training and ``NUM_VAL`` validation images of 512-800 pixels (``--data``, reused when
   present).
2. Start: the configuration (``--config``, the demo's, with :data:`EDGE_SETTINGS`) trained from scratch with the
   plain head for ``--base-iter`` iterations (``base/``); or ``--weights``, a checkpoint to start from instead.
3. ``plain/`` and ``refined/``: both trained on from that start for ``--iter`` iterations with the same settings and
   data order, the refined one with a point head (its own initialisation; everything else loaded from the start).
4. Both evaluated on the validation split: mask AP, AP75, Boundary AP and box AP, written to ``edges.json`` under
   ``--output`` with each stage's minutes and printed as a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from maskrcnn.cli import run
from maskrcnn.config import load_config
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.trainer import train
from maskrcnn.fileio import save_json
from maskrcnn.precision import machine_summary

NUM_TRAIN, NUM_VAL = 300, 50  # images of the edge split: what trains in minutes on 2 cores, and a steady AP
IMAGE_SIDES = (512, 800)  # smallest and largest image side of the edge split, pixels
DATA_SEED = 2  # generation seed of the edge split (the basic demo set uses 0, the novel one 1)
INPUT_SIZE = 320  # the network's input (shortest side) in training and evaluation
# The demo configuration's settings that the edge split changes, each with why.
EDGE_SETTINGS = (
    f"model.input.min_size=[{INPUT_SIZE}]",  # large enough that the stride-4 level is finer than a 28 x 28 mask of
    # the larger objects (up to 0.6 x 320 = 192 px across: 48 cells of P2), small enough to train in minutes
    f"model.input.max_size={INPUT_SIZE * 8 // 5}",  # the split's images are up to 800 / 512 = 1.56 as long as wide
    f"model.input.min_size_test={INPUT_SIZE}",  # evaluated at the training size (the demo's +16 px tunes small shapes)
    f"model.input.max_size_test={INPUT_SIZE * 8 // 5}",
    "solver.ims_per_batch=4",  # 4 images of 320 px are about the pixels of the demo's 8 of 128-256 px, times 2.5
    "solver.warmup_iters=50",
    "train.log_period=20",
)
RUNS = ("plain", "refined")  # output sub-folder of each compared run


def compare_refinement(*, config: str | Path, data_dir: str | Path, output_dir: str | Path, base_iter: int,
                       max_iter: int, weights: Optional[str | Path] = None,
                       overrides: Sequence[str] = ()) -> Dict[str, object]:
    """Steps 1-4 of the module docstring. Returns (and writes to ``output_dir/edges.json``) ``plain`` and
    ``refined``, each ``mask_ap``, ``mask_ap75``, ``boundary_ap``, ``boundary_ap75``, ``box_ap``, ``train_minutes``
    (the training loop) and ``minutes`` (training and evaluation); ``start`` (the checkpoint both started from),
    ``base_minutes``, ``data_minutes``, ``minutes`` (all of it), ``iterations``, ``settings`` and ``machine``."""
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"checkpoint not found: {weights}")
    start_time = time.perf_counter()
    generate_shapes(data_dir, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=DATA_SEED, min_size=IMAGE_SIDES[0],
                    max_size=IMAGE_SIDES[1], categories="edges", progress=True)
    data_minutes = (time.perf_counter() - start_time) / 60
    common = [f"data.train_ann={data_dir}/annotations/instances_train.json", f"data.train_images={data_dir}/train",
              f"data.val_ann={data_dir}/annotations/instances_val.json", f"data.val_images={data_dir}/val",
              *EDGE_SETTINGS, *overrides]
    base_minutes = 0.0
    if weights is None:
        stage = time.perf_counter()
        base = output_dir / "base"
        train(load_config(config, [*common, f"solver.max_iter={base_iter}", f"train.checkpoint_period={base_iter}",
                                   f"train.output_dir={base}"]), resume=True)
        weights = base / "model_final.pth"
        base_minutes = (time.perf_counter() - stage) / 60
    results: Dict[str, object] = {}
    for name in RUNS:
        stage = time.perf_counter()
        cfg = load_config(config, [*common, f"model.weights={weights}", f"solver.max_iter={max_iter}",
                                   f"train.checkpoint_period={max_iter}", "train.eval_at_end=true",
                                   f"model.roi_heads.mask_refine={'true' if name == 'refined' else 'false'}",
                                   f"train.output_dir={output_dir / name}"])
        summary = train(cfg, resume=True)
        results[name] = {**edge_metrics(summary["eval"]), "train_minutes": summary["train_seconds"] / 60,
                         "minutes": (time.perf_counter() - stage) / 60}
    results.update({"start": str(weights), "base_minutes": base_minutes, "data_minutes": data_minutes,
                    "minutes": (time.perf_counter() - start_time) / 60,
                    "iterations": {"base": base_iter if base_minutes else 0, "compared": max_iter},
                    "settings": list(EDGE_SETTINGS) + list(overrides), "machine": machine_summary("cpu")})
    save_json(output_dir / "edges.json", results)
    return results


def edge_metrics(metrics: dict) -> Dict[str, float]:
    """The figures compared, from an evaluation's metrics (:func:`~maskrcnn.evaluation.coco_evaluator.evaluate`)."""
    return {"mask_ap": metrics["segm"]["AP"], "mask_ap75": metrics["segm"]["AP75"],
            "boundary_ap": metrics["boundary"]["AP"], "boundary_ap75": metrics["boundary"]["AP75"],
            "box_ap": metrics["bbox"]["AP"]}


def edges_table(results: Dict[str, object]) -> str:
    """A Markdown table: the compared figures of the plain and the refined run, and refined - plain."""
    names = [("mask AP", "mask_ap"), ("mask AP75", "mask_ap75"), ("Boundary AP", "boundary_ap"),
             ("Boundary AP75", "boundary_ap75"), ("box AP", "box_ap"), ("training minutes", "train_minutes")]
    rows = ["| | plain 28 x 28 | point-refined | refined - plain |", "| --- | ---: | ---: | ---: |"]
    for label, key in names:
        plain, refined = results["plain"][key], results["refined"][key]
        rows.append(f"| {label} | {plain:.3f} | {refined:.3f} | {refined - plain:+.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/maskrcnn_R18_FPN_small.yaml", help="configuration of every run")
    parser.add_argument("--data", default="data/shapes_edges", help="folder of the edge split (made when missing)")
    parser.add_argument("--output", default="output/edges", help="folder of the runs and edges.json")
    parser.add_argument("--weights", help="start both runs from this checkpoint instead of training a start")
    parser.add_argument("--base-iter", type=int, default=600, help="iterations of the shared start (plain head)")
    parser.add_argument("--iter", type=int, default=300, help="iterations of each compared run")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="configuration overrides of every run")
    args = parser.parse_args(argv)
    results = compare_refinement(config=args.config, data_dir=args.data, output_dir=args.output,
                                 base_iter=args.base_iter, max_iter=args.iter, weights=args.weights,
                                 overrides=args.overrides)
    print(edges_table(results))
    print(f"{results['minutes']:.1f} minutes in all (data {results['data_minutes']:.1f}, start "
          f"{results['base_minutes']:.1f}, plain {results['plain']['minutes']:.1f}, refined "
          f"{results['refined']['minutes']:.1f}); "
          f"results in {Path(args.output) / 'edges.json'}")


if __name__ == "__main__":
    run(main)
