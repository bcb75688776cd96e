"""Whether choosing the next images to label by the model's uncertainty and diversity (maskrcnn/active.py) beats
choosing them at random.

    python -m benchmarks.active_selection [key.sub=value ...] [--seeds 0 1] [--iters 300] [--val 200]
        [--start 100] [--step 100] [--rounds 3] [--pool 600] [--also uncertainty diversity]
        [--summary active_selection.json]

Data: the long-tailed shapes training split (its last category drawn a tenth as often as each other one, as
``benchmarks/few_images.py`` makes it): a pool people would be asked to label is rarely balanced. The first
``--start`` images are labelled; the next ``--pool`` are the unlabelled pool. Each of ``--rounds`` rounds adds
``--step`` images of the pool to the labelled set, chosen

- ``select``: by :func:`maskrcnn.active.select_images` with the previous round's model of the same chain
  (round 1: the round-0 model both chains share), over the images of the pool not labelled yet;
- ``random``: the next ``--step`` images of a permutation of the pool drawn once per seed (``numpy`` seeded
  with the seed);
- with ``--also``, either half of ``select`` alone, to tell what each buys: ``uncertainty`` (the most
  informative images, no diversity) and ``diversity`` (k-centre greedy on the embeddings alone, every image
  equally informative).

Every round trains the demo configuration (configs/maskrcnn_R18_FPN_small.yaml) from scratch for the same
``--iters`` iterations (seed ``train.seed``): a round's score then depends on its labelled images alone, not on
what earlier rounds happened to train, and every round costs the same. Each model is scored (mask AP, box AP,
rare-category mask AP) on the same balanced validation images (``--val``, generated once).

A finished run whose settings and labelled images match is reused, and so is a round's selection: rerun the
command to go on after an interruption. Prints a Markdown table per round: each strategy's mask AP as the
mean over seeds ± half their range, its paired difference from random, the rare category's mask AP and its
instances among the labelled images; writes it with every run's figures as JSON (``--summary``, under
``--output``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from benchmarks.few_images import (LOG_PERIOD, RARE_CATEGORY, RARE_FRACTION, _load_scores,
                                   generate_data, score_checkpoint)
from maskrcnn.active import (Selection, embeddings, informativeness, score_pool, select_images,
                             write_selection)
from maskrcnn.cli import require_at_least, run
from maskrcnn.config import RoIHeadsConfig, load_config
from maskrcnn.engine.trainer import train
from maskrcnn.errors import InputError
from maskrcnn.fileio import save_json
from maskrcnn.precision import machine_summary
from maskrcnn.predictor import Predictor

STRATEGIES = ("select", "random")  # always run; the goal compares them
ABLATIONS = ("uncertainty", "diversity")  # halves of select, run with --also
SPLIT = "long_tailed"


def labelled_subset(ann_file: Path, names: Sequence[str], out_file: Path) -> Path:
    """``out_file``: the COCO file ``ann_file`` cut to the images whose ``file_name`` is in ``names`` and their
    annotations; written only when its content changes (so that its annotation cache stays valid)."""
    data = json.loads(ann_file.read_text())
    wanted = set(names)
    data["images"] = [image for image in data["images"] if image["file_name"] in wanted]
    keep = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    if not out_file.is_file() or json.loads(out_file.read_text()) != data:
        save_json(out_file, data)
    return out_file


def rare_instances(ann_file: Path, names: Sequence[str]) -> int:
    """How many (non-crowd) instances of the rare category the images ``names`` of ``ann_file`` hold."""
    data = json.loads(ann_file.read_text())
    rare = next(c["id"] for c in data["categories"] if c["name"] == RARE_CATEGORY)
    wanted = set(names)
    ids = {image["id"] for image in data["images"] if image["file_name"] in wanted}
    return sum(1 for a in data["annotations"] if a["image_id"] in ids and a["category_id"] == rare
               and not a["iscrowd"])


def choose(strategy: str, *, seed: int, pool: List[str], labelled: List[str], step: int, round_dir: Path,
           previous_checkpoint: Path, image_dir: Path) -> List[str]:
    """The ``step`` pool images (file names) to add this round: see the module doc. A model-driven round's
    choice is kept in ``round_dir`` (``selected.txt``, ``selection.json``) and reused when it was made from
    the same checkpoint over the same remaining pool."""
    taken = set(labelled)
    remaining = [name for name in pool if name not in taken]
    if strategy == "random":
        order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
        return [name for name in order if name not in taken][:step]
    settings = {"checkpoint": str(previous_checkpoint), "budget": step, "score_thresh": RoIHeadsConfig.score_thresh,
                "remaining": remaining}
    saved = round_dir / "selection.json"
    if saved.is_file() and json.loads(saved.read_text())["settings"] == settings:
        return [Path(line).name for line in (round_dir / "selected.txt").read_text().splitlines()]
    predictor = Predictor.from_checkpoint(previous_checkpoint, score_thresh=RoIHeadsConfig.score_thresh)
    scored = score_pool(predictor, [image_dir / name for name in remaining])
    values = informativeness(scored)
    if strategy == "uncertainty":  # the most informative first, no distance: each one's distance is left at 1
        index = np.argsort(-values, kind="stable")[:step]
        chosen = Selection(index, np.ones(step), values[index])
    else:
        values = np.ones_like(values) if strategy == "diversity" else values
        chosen = select_images(values, embeddings(scored), step)
    write_selection(round_dir, scored, chosen, settings=settings, values=values)
    return [remaining[i] for i in chosen.index]


def run_benchmark(*, config: str, data_dir: str | Path, output_dir: str | Path, seeds: Sequence[int], iters: int,
                  num_val: int, start: int, step: int, rounds: int, pool_size: int, also: Sequence[str] = (),
                  overrides: Sequence[str] = (), summary: str = "active_selection.json") -> dict:
    """Train and score round 0 and every (strategy, round, seed) of select, random and ``also`` (among
    ``ABLATIONS``); returns (and writes to
    ``output_dir/summary``) ``{"settings", "machine", "runs": [...], "rows": summarize(...)}``.

    Each run's folder (``output_dir/round0_seed<seed>``, ``output_dir/<strategy>_round<r>_seed<seed>``) holds the
    trainer's outputs and ``scores.json``: ``settings`` (its overrides), ``images`` (the labelled file names),
    ``scores`` (``{"trained": few_images.SCORES}``), ``rare_instances`` and the training and scoring seconds;
    each model-driven round's choice is in ``output_dir/selections/<strategy>_round<r>_seed<seed>``.
    """
    unknown = [name for name in also if name not in ABLATIONS]
    if unknown:
        raise InputError(f"--also: unknown {unknown}; known: {list(ABLATIONS)}")
    strategies = [*STRATEGIES, *dict.fromkeys(also)]
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    folders = generate_data(data_dir, start + pool_size, num_val)
    ann_file, image_dir = folders[SPLIT] / "annotations" / "instances_train.json", folders[SPLIT] / "train"
    names = [image["file_name"] for image in json.loads(ann_file.read_text())["images"]][: start + pool_size]
    first, pool = names[:start], names[start:]
    runs = []
    for seed in seeds:
        record = train_and_score(config, output_dir / f"round0_seed{seed}", first, ann_file=ann_file,
                                 image_dir=image_dir, folders=folders, data_dir=data_dir, iters=iters, seed=seed,
                                 overrides=overrides, label=f"seed {seed}, round 0")
        runs += [{"strategy": strategy, "round": 0, "seed": seed, **record} for strategy in strategies]
        labelled = {strategy: list(first) for strategy in strategies}
        previous = {strategy: output_dir / f"round0_seed{seed}" / "model_final.pth" for strategy in strategies}
        for round_number in range(1, rounds + 1):
            for strategy in strategies:
                name = f"{strategy}_round{round_number}_seed{seed}"
                labelled[strategy] += choose(strategy, seed=seed, pool=pool, labelled=labelled[strategy], step=step,
                                             round_dir=output_dir / "selections" / name,
                                             previous_checkpoint=previous[strategy], image_dir=image_dir)
                record = train_and_score(config, output_dir / name, labelled[strategy], ann_file=ann_file,
                                         image_dir=image_dir, folders=folders, data_dir=data_dir, iters=iters,
                                         seed=seed, overrides=overrides,
                                         label=f"seed {seed}, {strategy} round {round_number}")
                runs.append({"strategy": strategy, "round": round_number, "seed": seed, **record})
                previous[strategy] = output_dir / name / "model_final.pth"
    result = {"settings": {"config": config, "seeds": list(seeds), "iters": iters, "num_val": num_val,
                           "start": start, "step": step, "rounds": rounds, "pool": pool_size, "split": SPLIT,
                           "rare_fraction": RARE_FRACTION, "rare_category": RARE_CATEGORY,
                           "score_thresh": RoIHeadsConfig.score_thresh, "strategies": strategies,
                           "overrides": list(overrides)},
              "machine": machine_summary("cpu"), "runs": runs, "rows": summarize(runs, seeds, rounds, strategies)}
    save_json(output_dir / summary, result)
    return result


def train_and_score(config: str, run_dir: Path, images: List[str], *, ann_file: Path, image_dir: Path,
                    folders: Dict[str, Path], data_dir: Path, iters: int, seed: int, overrides: Sequence[str],
                    label: str) -> dict:
    """Train from scratch on ``images`` (file names of ``ann_file``) into ``run_dir`` and score the trained
    weights on the validation images, or reuse a finished run of the same settings and images."""
    subset = labelled_subset(ann_file, images, data_dir / "subsets" / f"{run_dir.name}.json")
    settings = [f"data.train_ann={subset}", f"data.train_images={image_dir}",
                f"data.val_ann={folders['val'] / 'annotations' / 'instances_val.json'}",
                f"data.val_images={folders['val'] / 'val'}", f"solver.max_iter={iters}", f"train.seed={seed}",
                f"train.output_dir={run_dir}", f"train.checkpoint_period={iters}", "train.eval_period=0",
                "train.eval_at_end=false", f"train.log_period={LOG_PERIOD}", *overrides]
    record = _load_scores(run_dir, config, settings)
    if record is None or record.get("images") != list(images):
        print(f"{label}: training {iters} iterations on {len(images)} images", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        train(load_config(config, settings))
        trained = time.perf_counter() - start
        start = time.perf_counter()
        # No weight average (solver.ema_decay stays 0): the checkpoint's "model" holds the trained weights.
        scores = score_checkpoint(run_dir / "model_final.pth", folders["val"], average=True)
        record = {"config": config, "settings": settings, "images": list(images),
                  "scores": {"trained": scores}, "rare_instances": rare_instances(ann_file, images),
                  "train_seconds": trained, "score_seconds": time.perf_counter() - start}
        save_json(run_dir / "scores.json", record)
    s = record["scores"]["trained"]
    print(f"{label}: {len(images)} images ({record['rare_instances']} {RARE_CATEGORY}): mask AP "
          f"{100 * s['mask_ap']:.1f}, box AP {100 * s['box_ap']:.1f}, {RARE_CATEGORY} mask AP "
          f"{100 * s['rare_mask_ap']:.1f} (training {record['train_seconds'] / 60:.1f} min)", flush=True)
    return record


def spread(values: Sequence[float]) -> dict:
    """Per-seed ``values``, their mean and half their range."""
    return {"per_seed": list(values), "mean": statistics.fmean(values), "half_range": (max(values) - min(values)) / 2}


def summarize(runs: List[dict], seeds: Sequence[int], rounds: int,
              strategies: Sequence[str] = STRATEGIES) -> List[dict]:
    """One row per round: its labelled images; per strategy the mask AP, box AP, rare-category mask AP (0-1)
    and rare instances labelled, as :func:`spread` gives them; ``difference``: per strategy but random, its
    mask AP - random's, paired by seed."""
    by_key = {(r["strategy"], r["round"], r["seed"]): r for r in runs}
    rows = []
    for round_number in range(rounds + 1):
        row = {"round": round_number, "images": len(by_key[("select", round_number, seeds[0])]["images"]),
               "difference": {}}
        for strategy in strategies:
            found = [by_key[(strategy, round_number, seed)] for seed in seeds]
            row[strategy] = {key: spread([r["scores"]["trained"][key] for r in found])
                             for key in ("mask_ap", "box_ap", "rare_mask_ap")}
            row[strategy]["rare_instances"] = spread([r["rare_instances"] for r in found])
        for strategy in strategies:
            if strategy != "random":
                row["difference"][strategy] = spread([a - b for a, b in zip(row[strategy]["mask_ap"]["per_seed"],
                                                                            row["random"]["mask_ap"]["per_seed"])])
        rows.append(row)
    return rows


def goal(rows: List[dict]) -> str:
    """Whether select reaches random's last-round mask AP (mean over seeds) at least a round earlier (round 0,
    shared by both, does not count), or gains at least 3 points over it at the last round."""
    target, last = rows[-1]["random"]["mask_ap"]["mean"], rows[-1]
    reached = next((row["round"] for row in rows[1:] if row["select"]["mask_ap"]["mean"] >= target), None)
    difference = last["difference"]["select"]
    gain = 100 * difference["mean"]
    earlier = reached is not None and reached < last["round"]
    verdict = "met" if earlier or gain >= 3 else "not met"
    where = f"at round {reached}" if reached is not None else "at no round"
    return (f"goal {verdict}: select reaches random's round-{last['round']} mask AP ({100 * target:.1f}) {where}; "
            f"round-{last['round']} difference {gain:+.1f} ± {100 * difference['half_range']:.1f} points")


def selection_table(rows: List[dict]) -> str:
    """A Markdown table of :func:`summarize`'s rows: APs in points, mean ± half the range over seeds; per
    strategy its mask AP, then each one's paired difference from random, the rare category's mask AP and its
    instances among the labelled images (mean over seeds)."""

    def cell(score: dict) -> str:
        return f"{100 * score['mean']:.1f} ± {100 * score['half_range']:.1f}"

    strategies = [key for key in rows[0] if key not in ("round", "images", "difference")]
    others = list(rows[0]["difference"])
    header = (["round", "labelled images"] + [f"mask AP {s}" for s in strategies]
              + [f"{s} - random (paired)" for s in others] + [f"{RARE_CATEGORY} mask AP {s}" for s in strategies]
              + [f"{RARE_CATEGORY} instances {' / '.join(strategies)}"])
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for row in rows:
        cells = ([str(row["round"]), str(row["images"])] + [cell(row[s]["mask_ap"]) for s in strategies]
                 + [cell(row["difference"][s]) for s in others] + [cell(row[s]["rare_mask_ap"]) for s in strategies]
                 + [" / ".join(f"{row[s]['rare_instances']['mean']:.0f}" for s in strategies)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/maskrcnn_R18_FPN_small.yaml", help="configuration of every run")
    parser.add_argument("--data", default="data/active_selection", help="folder of the generated shapes splits")
    parser.add_argument("--output", default="output/active_selection", help="folder of the runs and the summary")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (train.seed)")
    parser.add_argument("--iters", type=int, default=300, help="training iterations of every run")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--start", type=int, default=100, help="labelled images before the first round")
    parser.add_argument("--step", type=int, default=100, help="images added per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of adding images")
    parser.add_argument("--pool", type=int, default=600, help="unlabelled images to choose from")
    parser.add_argument("--also", nargs="+", default=[], choices=ABLATIONS, metavar="NAME",
                        help=f"also run these halves of select, among {list(ABLATIONS)}")
    parser.add_argument("--summary", default="active_selection.json",
                        help="file name of the JSON summary under --output")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="configuration overrides of every run")
    args = parser.parse_args(argv)
    require_at_least(args, iters=2 * LOG_PERIOD, val=1, start=1, step=1, rounds=1, pool=args.step * args.rounds)
    result = run_benchmark(config=args.config, data_dir=args.data, output_dir=args.output, seeds=args.seeds,
                           iters=args.iters, num_val=args.val, start=args.start, step=args.step, rounds=args.rounds,
                           pool_size=args.pool, also=args.also, overrides=args.overrides,
                           summary=args.summary)
    print(selection_table(result["rows"]))
    print(goal(result["rows"]))


if __name__ == "__main__":
    run(main)
