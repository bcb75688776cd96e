"""Time of one weight-average update (``solver.ema_decay`` > 0) for the models of the given configurations.

    python -m benchmarks.ema_overhead [--config configs/maskrcnn_R18_FPN_small.yaml ...] [--repeats 20]

Prints, per configuration, the number of averaged values and the median milliseconds of
:meth:`maskrcnn.engine.ema.ModelEMA.update` on the CPU with the current torch thread count (``OMP_NUM_THREADS``);
compare it with the seconds per training iteration of the same model (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskrcnn.cli import run
from maskrcnn.config import load_config
from maskrcnn.engine.ema import ModelEMA
from maskrcnn.modeling.maskrcnn import build_model


def update_milliseconds(config_path: str, repeats: int) -> tuple:
    """``(floating-point values averaged, median ms per update)`` of the model of ``config_path``."""
    model = build_model(load_config(config_path, ["model.backbone.pretrained=false"]).model)  # shapes only
    ema = ModelEMA(model, 0.999)
    values = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    times = []
    for _ in range(repeats + 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        start = time.perf_counter()
        ema.update(model)
        times.append(time.perf_counter() - start)
    return values, 1000 * statistics.median(times[2:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["configs/maskrcnn_R18_FPN_small.yaml",
                                                        "configs/maskrcnn_R50_FPN.yaml"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for path in args.config:
        values, ms = update_milliseconds(path, args.repeats)
        print(f"{path}: {values / 1e6:.1f}M values averaged, {ms:.1f} ms per update")


if __name__ == "__main__":
    run(main)
