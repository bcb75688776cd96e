"""What starting from trained weights buys: one training from scratch and one from a checkpoint, same
configuration and iterations, on a small dataset of classes the checkpoint has never seen.

The dataset is the novel shapes set (stars, hexagons, crosses; see :mod:`maskrcnn.data.shapes`),
``NUM_TRAIN`` training and ``NUM_VAL`` validation images. Both runs evaluate every ``eval_period``
iterations; :func:`evaluation_progress` reads mask and box AP and the training minutes up to each
evaluation from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from maskrcnn.config import load_config
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.logger import METRICS_FILE
from maskrcnn.engine.trainer import train
from maskrcnn.fileio import save_json

NUM_TRAIN, NUM_VAL = 100, 100  # images of the novel shapes split
DATA_SEED = 1  # generation seed of the novel split (the basic demo set uses 0)
RUNS = ("scratch", "weights")  # output sub-folder of each run


def compare_transfer(*, config: str | Path, checkpoint: str | Path, data_dir: str | Path, output_dir: str | Path,
                     max_iter: int, eval_period: int, overrides: Sequence[str] = ()) -> Dict[str, List[Dict]]:
    """Generate the novel split (reused when present), train from scratch and from ``checkpoint`` with
    ``config`` (then ``overrides``) for ``max_iter`` iterations, evaluating every ``eval_period``.

    Returns ``{"scratch": progress, "weights": progress}`` (see :func:`evaluation_progress`), also
    written to ``output_dir/transfer.json``.
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (make demo writes output/demo/model_final.pth)")
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    generate_shapes(data_dir, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=DATA_SEED, categories="novel",
                    progress=True)
    common = [f"data.train_ann={data_dir}/annotations/instances_train.json", f"data.train_images={data_dir}/train",
              f"data.val_ann={data_dir}/annotations/instances_val.json", f"data.val_images={data_dir}/val",
              f"solver.max_iter={max_iter}", f"train.eval_period={eval_period}",
              f"train.checkpoint_period={max_iter}", *overrides]
    results = {}
    for run in RUNS:
        extra = [f"model.weights={checkpoint}"] if run == "weights" else []
        cfg = load_config(config, [*common, f"train.output_dir={output_dir / run}", *extra])
        train(cfg)
        results[run] = evaluation_progress(output_dir / run)
    save_json(output_dir / "transfer.json", results)
    return results


def evaluation_progress(run_dir: str | Path) -> List[Dict]:
    """One entry per evaluation record of ``run_dir/metrics.jsonl``: ``iteration``, ``minutes`` (training
    time up to it: the logged seconds per iteration times the iterations each record covers; evaluation
    time excluded), ``mask_ap`` and ``box_ap``."""
    records = [json.loads(line) for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines() if line.strip()]
    progress, seconds, last_iter = [], 0.0, 0
    for record in records:
        if "segm" in record:
            progress.append({"iteration": record["iteration"], "minutes": seconds / 60,
                             "mask_ap": record["segm"]["AP"], "box_ap": record["bbox"]["AP"]})
        elif "time" in record:
            seconds += record["time"] * (record["iteration"] - last_iter)
            last_iter = record["iteration"]
    return progress


def transfer_table(results: Dict[str, List[Dict]]) -> str:
    """A Markdown table: per evaluated iteration count, mask AP / box AP and training minutes of each run."""
    rows = ["| iterations | from scratch: mask AP / box AP | minutes | from the demo weights: mask AP / box AP "
            "| minutes |", "| ---: | ---: | ---: | ---: | ---: |"]
    for scratch, weights in zip(results["scratch"], results["weights"]):
        rows.append(f"| {scratch['iteration']} | {scratch['mask_ap']:.3f} / {scratch['box_ap']:.3f} | "
                    f"{scratch['minutes']:.1f} | {weights['mask_ap']:.3f} / {weights['box_ap']:.3f} | "
                    f"{weights['minutes']:.1f} |")
    return "\n".join(rows)
