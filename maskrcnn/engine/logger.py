"""Training metrics on disk: a JSONL log, a loss-curve figure and, optionally, TensorBoard event files.

Files in ``output_dir``:
    metrics.jsonl   one JSON object per line. Training records carry ``iteration`` (optimizer steps
                    taken), ``total_loss`` and each ``loss_*`` term (means over the iterations since
                    the previous record), ``lr``, ``time`` and ``data_time`` (seconds per iteration);
                    evaluation records carry ``iteration`` and the evaluator's nested metrics.
    loss_curve.png  total and per-term losses against iteration (log scale), lr on a second axis.
    tensorboard/    event files, when enabled (needs the ``tensorboard`` package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import TrainConfig
from ..errors import InputError, MissingPackageError
from ..fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and redraws ``loss_curve.png`` on request.

    Args:
        output_dir: directory for the files (created if missing).
        start_iter: iterations already done. Records of an earlier run with ``iteration`` <= start_iter
            are kept (a resumed run continues the same log and curve); later ones are dropped, so that
            iterations redone after a resume appear once. 0 starts a fresh log.
        tensorboard: also write TensorBoard scalars to ``output_dir/tensorboard``; raises
            ``ImportError`` when the ``tensorboard`` package is missing.
    """

    def __init__(self, output_dir: str | Path, *, start_iter: int = 0, tensorboard: bool = TrainConfig.tensorboard):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.records: List[Dict] = []
        if start_iter > 0 and self.metrics_path.is_file():
            self.records = [r for r in read_records(self.metrics_path) if r["iteration"] <= start_iter]
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.metrics_path, lambda f: f.write(text.encode()))
        self._file = open(self.metrics_path, "a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingPackageError("train.tensorboard=true needs the tensorboard package "
                                  "(pip install tensorboard), or set train.tensorboard=false") from None
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=start_iter + 1)

    def log(self, record: Dict) -> None:
        """Append one record (a JSON-serialisable dict with an int ``iteration``) and flush it to disk."""
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in _flatten(record).items():
                if name != "iteration":
                    self._writer.add_scalar(name, value, record["iteration"])
            self._writer.flush()

    def plot(self) -> None:
        """Redraw ``loss_curve.png`` from the training records so far (atomically replaced)."""
        train = [r for r in self.records if "total_loss" in r]
        if not train:
            return
        iterations = [r["iteration"] for r in train]
        fig = Figure(figsize=(8, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        names = ["total_loss"] + sorted(k for k in train[-1] if k.startswith("loss_"))
        for name in names:
            ax.plot(iterations, [r.get(name, float("nan")) for r in train], label=name,
                    linewidth=2.0 if name == "total_loss" else 1.0)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(iterations, [r["lr"] for r in train], color="black", linestyle="--", linewidth=1.0, label="lr")
        lr_ax.set_ylabel("learning rate")
        lines = ax.get_lines() + lr_ax.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="upper right")
        fig.subplots_adjust(left=0.09, right=0.89, top=0.97, bottom=0.1)
        atomic_write(self.output_dir / CURVE_FILE, lambda f: fig.savefig(f, format="png"))

    def close(self) -> None:
        """Close the JSONL file and the TensorBoard writer."""
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def _flatten(record: Dict, prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested dict, keyed ``outer/inner``."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def read_records(path: Path) -> List[Dict]:
    """The records of a ``metrics.jsonl`` file. A last line cut short (the run was killed while writing
    it) is left out; a malformed line before it is a ValueError naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise InputError(f"{path}, line {number}: not a JSON record") from None
    return records
