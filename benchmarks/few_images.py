"""What large-scale jitter, copy-paste, repeat-factor sampling and the weight average buy with few training images.

    python -m benchmarks.few_images [key.sub=value ...] [--sizes 100] [--seeds 0 1] [--iters 300] [--val 200]
        [--configs baseline all ...] [--summary few_images.json]

Configuration overrides (of every run) come first: ``--sizes``, ``--seeds`` and ``--configs`` take the words after them.

Trains the demo configuration (configs/maskrcnn_R18_FPN_small.yaml) from scratch on the first N images of a
shapes training split, every run for the same number of iterations, and scores each on the same validation
images (the shapes validation split, balanced, generated once). The configurations (``CONFIGS``):

- on the balanced split: ``baseline`` (flips only, the demo's augmentation), each option alone (``lsj``,
  ``copy_paste``, ``ema``), ``copy_paste_ema`` and ``all`` (large-scale jitter, copy-paste, repeat-factor
  sampling and the weight average together);
- on the long-tailed split (its last category drawn a tenth as often as each other one): ``lt_baseline``,
  ``lt_rfs`` (repeat-factor sampling alone), ``lt_copy_paste``, ``lt_copy_paste_ema`` and ``lt_all``.

Every training keeps the weight average (``solver.ema_decay``), which does not feed back into training: a
configuration without it scores the checkpoint's ``raw_model`` (the weights a run without the average reaches),
one with it the average (``model``), so ``baseline`` and ``ema`` come from one training. A finished run whose
settings match is reused: rerun the command to go on after an interruption.

Per configuration and size: mask AP, box AP and the mask AP of the rare (last) category, in points (x100), as the
mean over seeds ± half their range; the mean change from the split's baseline, paired by seed; and the seconds
per training iteration and of data loading per iteration (``metrics.jsonl``'s ``time`` and ``data_time``, the
second half of each run). Prints a Markdown table and writes it with every run's figures as JSON (``--summary``,
under ``--output``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

import torch

from maskrcnn.cli import require_at_least, run
from maskrcnn.config import config_from_dict, load_config
from maskrcnn.data.shapes import CATEGORIES, generate_shapes
from maskrcnn.engine.logger import METRICS_FILE
from maskrcnn.engine.trainer import train
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import evaluate
from maskrcnn.fileio import read_checkpoint, save_json
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.precision import channels_last_is_faster, machine_summary, resolve_precision

SIZES = (50, 100, 200)  # training images a run may use (--sizes picks among them)
SCALE_JITTER = (0.1, 2.0)  # large-scale jitter range of Ghiasi et al. (2021)
# Repeat-factor threshold: in the long-tailed split's first 100 images the rare category is in 15 % of them and
# the others in 72-79 %, so 0.5 repeats the images holding the rare one sqrt(0.5 / 0.15) = 1.8 times on average
# and no other; in the balanced split (each category in 58-74 % of the first 50-200 images) it repeats nothing.
RFS_THRESHOLD = 0.5
# Below ~890 updates the warmup (1 + t) / (10 + t) stays under 0.99, so any decay from 0.99 up averages alike.
EMA_DECAY = 0.999
RARE_FRACTION = 0.1  # the long-tailed split draws its last category this often relative to each other one
RARE_CATEGORY = CATEGORIES[-1]["name"]
LOG_PERIOD = 10  # iterations per metrics.jsonl record

_LSJ = f"data.scale_jitter=[{SCALE_JITTER[0]},{SCALE_JITTER[1]}]"
# Each training's overrides over the configuration (every training also keeps the weight average).
TRAININGS = {
    "flips": [],
    "lsj": [_LSJ],
    "copy_paste": ["data.copy_paste=true"],
    "rfs": [f"data.repeat_factor_threshold={RFS_THRESHOLD}"],
    "lsj_cp_rfs": [_LSJ, "data.copy_paste=true", f"data.repeat_factor_threshold={RFS_THRESHOLD}"],
}


class Configuration(NamedTuple):
    split: str  # "balanced" or "long_tailed"
    training: str  # a key of TRAININGS
    average: bool  # score the weight average (else the trained weights)
    baseline: str  # the configuration it is compared with


CONFIGS = {
    "baseline": Configuration("balanced", "flips", False, "baseline"),
    "lsj": Configuration("balanced", "lsj", False, "baseline"),
    "copy_paste": Configuration("balanced", "copy_paste", False, "baseline"),
    "ema": Configuration("balanced", "flips", True, "baseline"),
    "copy_paste_ema": Configuration("balanced", "copy_paste", True, "baseline"),
    "all": Configuration("balanced", "lsj_cp_rfs", True, "baseline"),
    "lt_baseline": Configuration("long_tailed", "flips", False, "lt_baseline"),
    "lt_rfs": Configuration("long_tailed", "rfs", False, "lt_baseline"),
    "lt_copy_paste": Configuration("long_tailed", "copy_paste", False, "lt_baseline"),
    "lt_copy_paste_ema": Configuration("long_tailed", "copy_paste", True, "lt_baseline"),
    "lt_all": Configuration("long_tailed", "lsj_cp_rfs", True, "lt_baseline"),
}
SCORES = ("mask_ap", "box_ap", "rare_mask_ap", "rare_box_ap")  # of each scored model, 0-1


def generate_data(data_dir: Path, size: int, num_val: int) -> Dict[str, Path]:
    """The shapes folders (reused when present): ``val`` (``num_val`` validation images), ``balanced`` and
    ``long_tailed`` (``size`` training images each). The generator seeds every image by its split and index, so
    the first N training images of a split are the same whatever its length."""
    folders = {"val": data_dir / f"val_{num_val}", "balanced": data_dir / "balanced",
               "long_tailed": data_dir / "long_tailed"}
    generate_shapes(folders["val"], num_train=0, num_val=num_val)
    val = json.loads((folders["val"] / "annotations" / "instances_val.json").read_text())
    scored = {a["category_id"] for a in val["annotations"] if not a["iscrowd"]}
    missing = [c["name"] for c in val["categories"] if c["id"] not in scored]
    if missing:
        raise InputError(f"the {num_val} validation images hold no instance of {missing}: raise --val")
    for split, rare in (("balanced", 1.0), ("long_tailed", RARE_FRACTION)):
        generate_shapes(folders[split], num_train=size, num_val=0, rare_fraction=rare)
    return folders


def first_images(ann_file: Path, count: int, out_file: Path) -> Path:
    """``out_file``: the COCO file ``ann_file`` cut to its first ``count`` images and their annotations; written
    only when its content changes (so that its annotation cache stays valid)."""
    data = json.loads(ann_file.read_text())
    if len(data["images"]) < count:
        raise InputError(f"{ann_file} has {len(data['images'])} images, {count} asked for")
    data["images"] = data["images"][:count]
    keep = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    if not out_file.is_file() or json.loads(out_file.read_text()) != data:
        save_json(out_file, data)
    return out_file


def step_times(run_dir: Path) -> Dict[str, float]:
    """Mean seconds per training iteration (``time``) and of data loading per iteration (``data_time``) over the
    records of ``run_dir/metrics.jsonl`` that cover the run's second half (the first iterations of a bf16 run
    also create oneDNN's kernels for each new input shape), weighted by the iterations each record covers."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    records = [r for r in records if "time" in r]
    half = records[-1]["iteration"] / 2 if records else 0
    totals, iterations = {"time": 0.0, "data_time": 0.0}, 0
    for before, record in zip(records, records[1:]):
        if before["iteration"] >= half:
            span = record["iteration"] - before["iteration"]
            for key in totals:
                totals[key] += record[key] * span
            iterations += span
    if not iterations:
        raise InputError(f"{run_dir / METRICS_FILE} has {len(records)} training records, too few for its second half")
    return {key: value / iterations for key, value in totals.items()}


def score_checkpoint(path: Path, val_dir: Path, *, average: bool) -> Dict[str, float]:
    """``SCORES`` of the checkpoint's weight average (``average``) or trained weights on ``val_dir``'s
    validation split, in the precision and memory layout the trainer evaluates in."""
    checkpoint = read_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"])
    model = build_model(cfg.model)
    model.load_state_dict(checkpoint["model"] if average else checkpoint["raw_model"])
    if channels_last_is_faster("cpu")[0]:
        model.to(memory_format=torch.channels_last)
    resolved = resolve_precision(cfg.train.precision, "cpu", warn=False).precision
    metrics = evaluate(model.eval(), val_dir / "annotations" / "instances_val.json", val_dir / "val", device="cpu",
                       precision="bf16" if resolved == "bf16" else "fp32", iou_types=("bbox", "segm"),
                       num_workers=cfg.data.num_workers, verbose=False, class_names=checkpoint["class_names"],
                       label_to_cat_id=checkpoint["label_to_cat_id"])
    return {"mask_ap": metrics["segm"]["AP"], "box_ap": metrics["bbox"]["AP"],
            "rare_mask_ap": metrics["segm"]["per_category"][RARE_CATEGORY],
            "rare_box_ap": metrics["bbox"]["per_category"][RARE_CATEGORY]}


def run_benchmark(*, config: str, data_dir: str | Path, output_dir: str | Path, sizes: Sequence[int],
                  seeds: Sequence[int], iters: int, num_val: int, configs: Sequence[str],
                  overrides: Sequence[str] = (), summary: str = "few_images.json") -> dict:
    """Train and score every (size, seed, training) that ``configs`` need; returns (and writes to
    ``output_dir/summary``) ``{"settings", "machine", "runs": [...], "rows": summarize(...)}``.

    Each run's folder (``output_dir/<split>_<size>/<training>_seed<seed>``) holds the trainer's outputs and
    ``scores.json``: ``settings`` (its full override list), ``scores`` (``{"trained"|"average": SCORES}``),
    ``step`` (:func:`step_times`) and the training and scoring seconds.
    """
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise InputError(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    bad_sizes = [s for s in sizes if s not in SIZES]
    if bad_sizes:
        raise InputError(f"--sizes must be among {list(SIZES)}, got {bad_sizes}")
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    folders = generate_data(data_dir, max(sizes), num_val)
    wanted: Dict[tuple, set] = {}  # (split, size, training, seed) -> {"trained", "average"}
    for size in sizes:
        for name in configs:
            c = CONFIGS[name]
            for seed in seeds:
                wanted.setdefault((c.split, size, c.training, seed), set()).add("average" if c.average else "trained")
    runs = []
    for number, ((split, size, training, seed), models) in enumerate(wanted.items(), 1):
        run_dir = output_dir / f"{split}_{size}" / f"{training}_seed{seed}"
        ann = first_images(folders[split] / "annotations" / "instances_train.json", size,
                           data_dir / "subsets" / f"{split}_{size}.json")
        settings = [f"data.train_ann={ann}", f"data.train_images={folders[split] / 'train'}",
                    f"data.val_ann={folders['val'] / 'annotations' / 'instances_val.json'}",
                    f"data.val_images={folders['val'] / 'val'}", f"solver.max_iter={iters}",
                    f"solver.ema_decay={EMA_DECAY}", f"train.seed={seed}", f"train.output_dir={run_dir}",
                    f"train.checkpoint_period={iters}", "train.eval_period=0", "train.eval_at_end=false",
                    f"train.log_period={LOG_PERIOD}", *TRAININGS[training], *overrides]
        record = _load_scores(run_dir, config, settings)
        label = f"[{number}/{len(wanted)}] {split} {size} images, {training}, seed {seed}"
        if record is None:
            print(f"{label}: training {iters} iterations", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            start = time.perf_counter()
            train(load_config(config, settings))
            record = {"config": config, "settings": settings, "scores": {},
                      "train_seconds": time.perf_counter() - start, "score_seconds": 0.0,
                      "step": step_times(run_dir)}
        for model in sorted(models - set(record["scores"])):
            start = time.perf_counter()
            record["scores"][model] = score_checkpoint(run_dir / "model_final.pth", folders["val"],
                                                       average=model == "average")
            record["score_seconds"] += time.perf_counter() - start
        save_json(run_dir / "scores.json", record)
        scores = "; ".join(f"{model}: mask AP {100 * s['mask_ap']:.1f}, box AP {100 * s['box_ap']:.1f}, "
                           f"{RARE_CATEGORY} mask AP {100 * s['rare_mask_ap']:.1f}"
                           for model, s in sorted(record["scores"].items()))
        print(f"{label}: {scores} ({record['step']['time']:.3f} s/iteration, data {record['step']['data_time']:.3f}; "
              f"training {record['train_seconds'] / 60:.1f} min)", flush=True)
        runs.append({"split": split, "size": size, "training": training, "seed": seed, **record})
    result = {"settings": {"config": config, "sizes": list(sizes), "seeds": list(seeds), "iters": iters,
                           "num_val": num_val, "configs": list(configs), "overrides": list(overrides),
                           "scale_jitter": list(SCALE_JITTER), "rfs_threshold": RFS_THRESHOLD,
                           "ema_decay": EMA_DECAY, "rare_fraction": RARE_FRACTION, "rare_category": RARE_CATEGORY},
              "machine": machine_summary("cpu"), "runs": runs, "rows": summarize(runs, configs, sizes, seeds)}
    save_json(output_dir / summary, result)
    return result


def _load_scores(run_dir: Path, config: str, settings: List[str]):
    """The run's saved ``scores.json`` when it finished with the same configuration and overrides, else None."""
    path = run_dir / "scores.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("config") == config and record.get("settings") == settings else None


def summarize(runs: List[dict], configs: Sequence[str], sizes: Sequence[int], seeds: Sequence[int]) -> List[dict]:
    """One row per (configuration, size): per score the per-seed values, their mean, half their range, and the
    mean of the per-seed differences from the row's baseline configuration (None where that was not run); and
    the mean ``time`` and ``data_time`` per iteration of the configuration's trainings."""
    by_key = {(r["split"], r["size"], r["training"], r["seed"]): r for r in runs}

    def values(name: str, size: int) -> Dict[str, List[float]]:
        c = CONFIGS[name]
        model = "average" if c.average else "trained"
        return {k: [by_key[(c.split, size, c.training, seed)]["scores"][model][k] for seed in seeds] for k in SCORES}

    rows = []
    for name in [n for n in CONFIGS if n in configs]:
        c = CONFIGS[name]
        for size in sizes:
            own = values(name, size)
            base = values(c.baseline, size) if c.baseline in configs else None
            row = {"config": name, "split": c.split, "images": size, "training": c.training,
                   "average": c.average, "seeds": list(seeds)}
            for key, per_seed in own.items():
                row[key] = {"per_seed": per_seed, "mean": statistics.fmean(per_seed),
                            "half_range": (max(per_seed) - min(per_seed)) / 2,
                            "change": None if base is None else
                            statistics.fmean(a - b for a, b in zip(per_seed, base[key]))}
            steps = [by_key[(c.split, size, c.training, seed)]["step"] for seed in seeds]
            row["time"] = statistics.fmean(s["time"] for s in steps)
            row["data_time"] = statistics.fmean(s["data_time"] for s in steps)
            rows.append(row)
    return rows


def few_images_table(rows: List[dict]) -> str:
    """A Markdown table of ``summarize``'s rows: APs in points as mean ± half the range over seeds, the change
    from the split's baseline in brackets, and the seconds per iteration (data loading's share beside it)."""

    def cell(score: dict, with_change: bool) -> str:
        text = f"{100 * score['mean']:.1f} ± {100 * score['half_range']:.1f}"
        return f"{text} ({100 * score['change']:+.1f})" if with_change and score["change"] is not None else text

    lines = [f"| split | images | configuration | mask AP | box AP | {RARE_CATEGORY} (rare) mask AP "
             "| s / iteration (data) |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        with_change = CONFIGS[row["config"]].baseline != row["config"]
        cells = " | ".join(cell(row[key], with_change) for key in ("mask_ap", "box_ap", "rare_mask_ap"))
        lines.append(f"| {row['split'].replace('_', '-')} | {row['images']} | {row['config']} | {cells} "
                     f"| {row['time']:.3f} ({row['data_time']:.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/maskrcnn_R18_FPN_small.yaml", help="configuration of every run")
    parser.add_argument("--data", default="data/few_images", help="folder of the generated shapes splits")
    parser.add_argument("--output", default="output/few_images", help="folder of the runs and few_images.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100], help=f"training images, among {list(SIZES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (train.seed)")
    parser.add_argument("--iters", type=int, default=300, help="training iterations of every run")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"configurations to run, among {list(CONFIGS)} (default all)")
    parser.add_argument("--summary", default="few_images.json", help="file name of the JSON summary under --output")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="configuration overrides of every run")
    args = parser.parse_args(argv)
    require_at_least(args, iters=2 * LOG_PERIOD, val=1)
    result = run_benchmark(config=args.config, data_dir=args.data, output_dir=args.output, sizes=args.sizes,
                           seeds=args.seeds, iters=args.iters, num_val=args.val, configs=args.configs,
                           overrides=args.overrides, summary=args.summary)
    print(few_images_table(result["rows"]))


if __name__ == "__main__":
    run(main)
