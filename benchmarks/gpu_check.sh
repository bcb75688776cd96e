#!/usr/bin/env bash
# The checks that need a GPU, in one run of a few minutes on one GPU (under 8 on an H100), from any folder:
#
#     bash benchmarks/gpu_check.sh [OUTPUT]        # figures to OUTPUT, default output/gpu_check.txt
#
# 1. the tests with CUDA variants (pytest -k cuda: paste, RoIAlign, predictor, mixed-precision training);
# 2. python -m benchmarks.benchmark --device cuda --quick: ours against torchvision, inference and training;
# 3. the demo, shortened: 64 shapes images, 100 iterations of configs/maskrcnn_R18_FPN_small.yaml on cuda,
#    timed in seconds per iteration.
# Each step's full output goes to OUTPUT's folder, gpu_check/<step>.log; OUTPUT gathers the figures. A step
# that fails is named there and the others still run; the exit status is 1 if any failed. Without a GPU
# it stops at once, with one line on stderr and exit status 1. PYTHON names the interpreter (default: the
# repository's .venv, else python3).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/output/gpu_check.txt}")
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: no CUDA GPU visible to $py (torch.cuda.is_available() is False): the GPU check needs one" >&2
    exit 1
fi

logs=$(dirname "$out")/gpu_check
mkdir -p "$logs"
cd "$root"
failed=()

step() {  # step NAME COMMAND...: run COMMAND with its output in $logs/NAME.log; remember a failure
    local name=$1 start=$SECONDS
    shift
    if "$@" >"$logs/$name.log" 2>&1; then
        echo "($name: $((SECONDS - start)) s, log $logs/$name.log)" >>"$out"
    else
        echo "FAILED: $name (exit status $?, after $((SECONDS - start)) s; log $logs/$name.log)" >>"$out"
        failed+=("$name")
    fi
}

{
    echo "GPU check of commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%Y-%m-%d %H:%M UTC')"
    "$py" -c "import torch; print(f'GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
    echo
    echo "== tests with CUDA variants (pytest -k cuda)"
} >"$out"
step cuda_tests "$py" -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_paste.py tests/test_roi_align.py \
    tests/test_predictor.py tests/test_trainer.py
tail -n 1 "$logs/cuda_tests.log" >>"$out"

printf '\n== python -m benchmarks.benchmark --device cuda --quick\n' >>"$out"
step benchmark "$py" -m benchmarks.benchmark --device cuda --quick
grep -v '^\[benchmark\]' "$logs/benchmark.log" >>"$out" || true

demo=$logs/demo
printf '\n== demo, shortened: 64 shapes images, 100 iterations of configs/maskrcnn_R18_FPN_small.yaml on cuda\n' >>"$out"
rm -rf "$demo/train"
step make_shapes "$py" tools/make_shapes.py --out "$demo/shapes" --num-train 64 --num-val 16
step train "$py" tools/train.py --config configs/maskrcnn_R18_FPN_small.yaml train.device=cuda \
    train.output_dir="$demo/train" solver.max_iter=100 solver.warmup_iters=20 train.log_period=20 \
    train.checkpoint_period=100 data.num_workers=4 \
    data.train_ann="$demo/shapes/annotations/instances_train.json" data.train_images="$demo/shapes/train" \
    data.val_ann="$demo/shapes/annotations/instances_val.json" data.val_images="$demo/shapes/val"
if [ -f "$demo/train/train_summary.json" ]; then
    "$py" - "$demo/train" >>"$out" <<'EOF'
import json, sys
from pathlib import Path

from maskrcnn.config import load_config

run = Path(sys.argv[1])
summary = json.loads((run / "train_summary.json").read_text())
precision = json.loads((run / "run_info.json").read_text())["precision"]["precision"]
cfg = load_config(run / "config.yaml")
print(f"{summary['train_seconds'] / summary['iteration']:.3f} s per iteration over all {summary['iteration']} "
      f"(warm-up included), {summary['train']['time']:.3f} s over the last {cfg.train.log_period}; "
      f"{cfg.solver.ims_per_batch} images per iteration, precision {precision}")
EOF
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}; figures in $out" >&2
    exit 1
fi
echo "figures in $out"
