#!/usr/bin/env bash
# Compare training backends on the same model and data: DDP, DeepSpeed ZeRO-2, and
# ZeRO-2 with CPU optimizer offload. Reports tokens/s, MFU and peak GPU memory taken from
# each run's metrics.jsonl (median over the logged steps after the first two records).
#
#   benchmarks/bench_backends.sh                                  # 350m, 30 steps, 1 GPU, datasets/
#   benchmarks/bench_backends.sh --model-size 1.3b --batch-size 4 --num-gpus 2
#   BACKENDS="ddp zero2" benchmarks/bench_backends.sh --steps 50
#   benchmarks/bench_backends.sh --model-size tiny --max-seq-length 64 -- --vocab-size 400   # after --: trainer options
#
# Needs prepared data (scripts/run_preprocessing.sh) and, for the ZeRO rows, deepspeed.
# Work files go to ${BENCH_DIR:-outputs/bench_backends}; a summary table is printed and
# written to summary.md there. Runs save no checkpoints (--no-save-final); RUN_TIMEOUT
# (seconds, default 1800) bounds each run. This is a benchmark: nothing here asserts a speed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${KOEN_PYTHON:-python3}"
model="350m"; batch=8; steps=30; gpus=1; seq=2048; dataset="$root/datasets"; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; extra=("$@"); break ;;
    --model-size) model="$2"; shift 2 ;;
    --batch-size) batch="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --num-gpus) gpus="$2"; shift 2 ;;
    --max-seq-length) seq="$2"; shift 2 ;;
    --dataset-path) dataset="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "❌ unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
work="${BENCH_DIR:-$root/outputs/bench_backends}"
mkdir -p "$work"

# ZeRO-2 with the optimizer state in pinned CPU memory: the shipped config plus offload.
"$py" - "$root/configs/ds_config.json" "$work/ds_offload.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF

run_one() {  # name, extra trainer options...
  local name="$1"; shift
  local dir="$work/$name"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "=== $name: $model, batch $batch x $seq, $gpus GPU(s), $steps steps"
  if ! timeout "${RUN_TIMEOUT:-1800}" "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "$root/scripts/train_h100_dual.py" \
      --train --model-size "$model" --batch-size "$batch" --max-seq-length "$seq" --max-steps "$steps" \
      --dataset-path "$dataset" --output-dir "$dir/out" --logs-dir "$dir/logs" --log-steps 2 \
      --save-steps 100000 --no-save-initial --no-save-final --eval-batches 2 "$@" ${extra[@]+"${extra[@]}"} \
      > "$dir/console.log" 2>&1; then
    echo "    failed: see $dir/console.log"; tail -n 5 "$dir/console.log" | sed 's/^/    /'
  fi
}

for backend in ${BACKENDS:-ddp zero2 zero2-offload}; do
  case "$backend" in
    ddp) run_one ddp ;;
    zero2) run_one zero2 --deepspeed ;;
    zero2-offload) run_one zero2-offload --deepspeed "$work/ds_offload.json" ;;
    *) echo "❌ unknown backend $backend (ddp, zero2, zero2-offload)" >&2; exit 2 ;;
  esac
done

"$py" - "$work" <<'EOF'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = ["| backend | tokens/s (median) | MFU | peak GPU GiB | steps logged |", "|---|---:|---:|---:|---:|"]
for name in ("ddp", "zero2", "zero2-offload"):
    path = work / name / "logs" / "metrics.jsonl"
    if not path.exists():
        continue
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    train = [r for r in recs if r.get("type") == "train" and r.get("tokens_per_s")][2:]
    if not train:
        rows.append(f"| {name} | failed | | | 0 |"); continue
    tps = statistics.median(r["tokens_per_s"] for r in train)
    mfus = [r["mfu"] for r in train if r.get("mfu")]
    mem = max((r.get("mem_gib") or 0) for r in train)
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
    rows.append(f"| {name} | {tps:,.0f} | {mfu} | {mem:.1f} | {len(train)} |")
text = "\n".join(rows)
print(text)
(work / "summary.md").write_text(text + "\n")
EOF
