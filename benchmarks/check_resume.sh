#!/usr/bin/env bash
# Resume check on real hardware: train N steps saving a checkpoint at N/2, resume from that
# checkpoint into a fresh output folder, and compare the losses of steps N/2+1..N step by step.
#
#   benchmarks/check_resume.sh --steps 20 -- --model-size 350m --batch-size 8 --deepspeed
#   benchmarks/check_resume.sh --num-gpus 2 --steps 40 -- --model-size 350m
#
# Options after `--` go to train_h100_dual.py for both runs. Needs prepared data in
# --dataset-path (default datasets/). Work files in ${CHECK_DIR:-outputs/check_resume};
# prints the per-step losses side by side and the largest difference. Exit 0 when
# every step of the resumed run was logged, 1 otherwise.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${KOEN_PYTHON:-python3}"
steps=20; gpus=1; dataset="$root/datasets"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --num-gpus) gpus="$2"; shift 2 ;;
    --dataset-path) dataset="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "❌ unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$steps" -lt 2 ]; then echo "❌ --steps must be at least 2" >&2; exit 2; fi
half=$((steps / 2))
work="${CHECK_DIR:-$root/outputs/check_resume}"
rm -rf "$work"; mkdir -p "$work"

train() {  # name, extra options...
  local name="$1"; shift
  echo "=== $name"
  "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "$root/scripts/train_h100_dual.py" \
    --train --max-steps "$steps" --log-steps 1 --eval-batches 1 --no-save-initial --dataset-path "$dataset" \
    --output-dir "$work/$name/out" --logs-dir "$work/$name/logs" "$@" > "$work/$name.log" 2>&1 \
    || { echo "    failed: see $work/$name.log"; tail -n 5 "$work/$name.log" | sed 's/^/    /'; exit 1; }
}

train straight --save-steps "$half" --resume none "$@"
train resumed --save-steps 100000 --no-save-final --resume "$work/straight/out/checkpoint-$half" "$@"

"$py" - "$work" "$half" "$steps" "$root/benchmarks" <<'EOF'
import sys
from pathlib import Path
work, half, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from multi_gpu_summary import losses  # per-step losses from a run's metrics.jsonl

a, b = losses(work / "straight" / "logs"), losses(work / "resumed" / "logs")
print(f"{'step':>5} {'straight':>12} {'resumed':>12} {'diff':>10}")
worst = 0.0
for s in range(half + 1, steps + 1):
    if s in a and s in b:
        worst = max(worst, abs(a[s] - b[s]))
        print(f"{s:>5} {a[s]:>12.6f} {b[s]:>12.6f} {a[s] - b[s]:>10.2e}")
missing = [s for s in range(half + 1, steps + 1) if s not in b]
print(f"largest |difference| over steps {half + 1}-{steps}: {worst:.3g}" + (" (bit-identical)" if worst == 0 else ""))
if missing:
    print(f"❌ the resumed run logged no loss for steps {missing}")
    sys.exit(1)
EOF
