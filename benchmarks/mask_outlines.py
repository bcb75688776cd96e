"""Where the demo's mask outlines come from: the plain 28 x 28 head, the same head trained with more weight on
its targets' outlines (``model.roi_heads.mask_outline_weight``), the point-refined head
(``model.roi_heads.mask_refine``) and both, each trained as ``make demo`` trains over several seeds.

    python -m benchmarks.mask_outlines [--variants plain outline4 refined refined_outline4] [--seeds 0 1]
        [--output output/mask_outlines] [key.sub=value ...]

Every run is the demo's training (``configs/maskrcnn_R18_FPN_small.yaml`` on ``data/shapes``, made first when
missing) with ``train.seed`` and the variant's settings (``VARIANTS``), into ``<output>/<variant>_s<seed>``;
the trained checkpoint is then scored as ``tools/eval.py`` scores it, on the 200 validation images
(``metrics.json`` beside it). A run whose checkpoint holds the same configuration (its output folder aside) is
not trained again, and one with a ``metrics.json`` newer than its checkpoint is not scored again: rerun the
command to go on after an interruption, or copy a ``make demo`` folder in as ``plain_s0``.

Prints a Markdown table: per variant, mask AP, mask AP75, Boundary AP, Boundary AP on large objects and box
AP, as the mean over seeds ± half their range, and the mean change from ``plain`` paired by seed; writes it with
every run's figures as JSON (``--summary``, under ``--output``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from maskrcnn.cli import run
from maskrcnn.config import config_from_dict, config_to_dict, load_config
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.trainer import train
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import evaluate
from maskrcnn.fileio import read_checkpoint, read_json, save_json
from maskrcnn.precision import machine_summary
from maskrcnn.predictor import Predictor

DEMO_CONFIG = "configs/maskrcnn_R18_FPN_small.yaml"
VARIANTS: Dict[str, tuple] = {
    "plain": (),
    "outline2": ("model.roi_heads.mask_outline_weight=2",),
    "outline4": ("model.roi_heads.mask_outline_weight=4",),
    "outline8": ("model.roi_heads.mask_outline_weight=8",),
    "refined": ("model.roi_heads.mask_refine=true",),
    "refined_outline4": ("model.roi_heads.mask_refine=true", "model.roi_heads.mask_outline_weight=4"),
    "refined_outline8": ("model.roi_heads.mask_refine=true", "model.roi_heads.mask_outline_weight=8"),
}
FIGURES = (("mask AP", "segm", "AP"), ("mask AP75", "segm", "AP75"), ("Boundary AP", "boundary", "AP"),
           ("Boundary AP, large", "boundary", "APl"), ("box AP", "bbox", "AP"))


def train_and_score(run_dir: Path, settings: Sequence[str], data_dir: Path) -> dict:
    """Train the demo configuration with ``settings`` into ``run_dir`` (unless its checkpoint already holds that
    configuration) and score it on ``data_dir``'s validation split (unless already scored) -> the metrics."""
    cfg = load_config(DEMO_CONFIG, [*settings, f"train.output_dir={run_dir}"])
    checkpoint = run_dir / "model_final.pth"
    expected = config_to_dict(cfg)
    expected["train"].pop("output_dir")
    if checkpoint.is_file():
        found = config_to_dict(config_from_dict(read_checkpoint(checkpoint)["config"]))  # defaults filled in
        found["train"].pop("output_dir")
        if found != expected:
            raise InputError(f"{checkpoint} was trained with other settings than {' '.join(settings)}: move it away")
    else:
        print(f"{run_dir.name}: training ({' '.join(settings) or 'the demo configuration'})", flush=True)
        train(cfg, resume=True)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and metrics_file.stat().st_mtime > checkpoint.stat().st_mtime:
        return read_json(metrics_file, "metrics", dict)
    predictor = Predictor.from_checkpoint(checkpoint, score_thresh=None)
    return evaluate(predictor.inference_model, data_dir / "annotations" / "instances_val.json", data_dir / "val",
                    run_dir, precision=predictor.precision, class_names=predictor.class_names,
                    label_to_cat_id=predictor.label_to_cat_id, num_workers=cfg.data.num_workers, verbose=False)


def summarize(runs: Dict[str, Dict[int, dict]]) -> List[dict]:
    """Per variant and figure: per-seed values, mean, half range, and the mean change from ``plain`` over the
    seeds both have."""
    rows = []
    for variant, by_seed in runs.items():
        row = {"variant": variant, "seeds": sorted(by_seed)}
        for label, iou_type, key in FIGURES:
            values = [by_seed[seed][iou_type][key] for seed in sorted(by_seed)]
            figure = {"per_seed": values, "mean": statistics.fmean(values),
                      "half_range": (max(values) - min(values)) / 2}
            paired = [by_seed[s][iou_type][key] - runs["plain"][s][iou_type][key]
                      for s in sorted(by_seed) if variant != "plain" and s in runs.get("plain", {})]
            if paired:
                figure["change"] = statistics.fmean(paired)
            row[label] = figure
        rows.append(row)
    return rows


def outlines_table(rows: List[dict]) -> str:
    """The Markdown table of :func:`summarize`'s rows, APs in points."""
    lines = ["| variant | seeds | " + " | ".join(label for label, _, _ in FIGURES) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in FIGURES) + " |"]
    for row in rows:
        cells = []
        for label, _, _ in FIGURES:
            figure = row[label]
            cell = f"{100 * figure['mean']:.1f} ± {100 * figure['half_range']:.1f}"
            if "change" in figure:
                cell += f" ({100 * figure['change']:+.1f})"
            cells.append(cell)
        lines.append(f"| {row['variant']} | {', '.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="runs to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="train.seed of each run")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="the demo's shapes data (made if missing)")
    parser.add_argument("--output", type=Path, default=Path("output/mask_outlines"), help="folder of the runs")
    parser.add_argument("--summary", default="mask_outlines.json", help="file name of the figures, under --output")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="configuration overrides of every run")
    args = parser.parse_args(argv)
    generate_shapes(args.data, progress=True)
    settings = [f"data.train_ann={args.data}/annotations/instances_train.json", f"data.train_images={args.data}/train",
                f"data.val_ann={args.data}/annotations/instances_val.json", f"data.val_images={args.data}/val"]
    runs: Dict[str, Dict[int, dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            metrics = train_and_score(args.output / f"{variant}_s{seed}",
                                      [*settings, f"train.seed={seed}", *VARIANTS[variant], *args.overrides], args.data)
            runs.setdefault(variant, {})[seed] = metrics
    rows = summarize(runs)
    print(outlines_table(rows))
    save_json(args.output / args.summary, {"rows": rows, "machine": machine_summary("cpu"),
                                           "overrides": args.overrides})


if __name__ == "__main__":
    run(main)
