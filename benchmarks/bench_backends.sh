#!/usr/bin/env bash
# Compare training backends on the same model and data: DDP, DeepSpeed ZeRO-2 (with and without
# CPU optimizer offload) and ZeRO-3 (the shipped configs/ds_zero3_offload.json, and the same
# without its offloads). Reports tokens/s, MFU and peak GPU memory taken from each run's
# metrics.jsonl (median over the logged steps after the first two records) and the peak host
# memory of the run's whole process tree (benchmarks/host_memory.py, pinned buffers included).
#
#   benchmarks/bench_backends.sh                                  # 350m, 30 steps, 1 GPU, datasets/
#   benchmarks/bench_backends.sh --model-size 1.3b --batch-size 4 --num-gpus 2
#   BACKENDS="ddp zero2" benchmarks/bench_backends.sh --steps 50
#   BACKENDS="zero3-offload" benchmarks/bench_backends.sh --model-size 8b --batch-size 1 --steps 4
#   benchmarks/bench_backends.sh --model-size tiny --max-seq-length 64 -- --vocab-size 400   # after --: trainer options
#
# Backends: ddp, zero2, zero2-offload, zero3, zero3-offload, each also with "-eager" appended
# (--no-compile). Needs prepared data (scripts/run_preprocessing.sh) and, for the ZeRO rows,
# deepspeed. Work files go to ${BENCH_DIR:-outputs/bench_backends}; a summary table is printed
# and written to summary.md there. Runs save no checkpoints (--no-save-final); RUN_TIMEOUT
# (seconds, default 1800) bounds each run, and a run that would leave less than HOST_FLOOR_GIB
# (default 4) of host memory free is stopped and reported as not fitting.
# This is a benchmark: nothing here asserts a speed.
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
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "❌ unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
work="${BENCH_DIR:-$root/outputs/bench_backends}"
mkdir -p "$work"

# ZeRO-2 with the optimizer state in pinned CPU memory: the shipped config plus offload; and
# ZeRO-3 with everything on the GPU: the shipped ZeRO-3 file without its two offloads.
"$py" - "$root/configs" "$work" <<'PY'
import json, sys
src, work = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{src}/ds_config.json"))
cfg.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
json.dump(cfg, open(f"{work}/ds_offload.json", "w"), indent=2)
cfg = json.load(open(f"{src}/ds_zero3_offload.json"))
for key in ("offload_param", "offload_optimizer"):
    cfg["zero_optimization"][key] = {"device": "none"}
json.dump(cfg, open(f"{work}/ds_zero3.json", "w"), indent=2)
PY

run_one() {  # name, extra trainer options...
  local name="$1"; shift
  local dir="$work/$name"
  rm -rf "$dir"; mkdir -p "$dir"
  echo "=== $name: $model, batch $batch x $seq, $gpus GPU(s), $steps steps"
  if ! timeout "${RUN_TIMEOUT:-1800}" "$py" "$root/benchmarks/host_memory.py" --json "$dir/host_memory.json" \
      --floor-gib "${HOST_FLOOR_GIB:-4}" -- \
      "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" "$root/scripts/train_h100_dual.py" \
      --train --model-size "$model" --batch-size "$batch" --max-seq-length "$seq" --max-steps "$steps" \
      --dataset-path "$dataset" --output-dir "$dir/out" --logs-dir "$dir/logs" --log-steps 2 \
      --save-steps 100000 --no-save-initial --no-save-final --eval-batches 2 "$@" ${extra[@]+"${extra[@]}"} \
      > "$dir/console.log" 2>&1; then
    echo "    failed: see $dir/console.log"; tail -n 5 "$dir/console.log" | sed 's/^/    /'
  fi
}

names=()
for backend in ${BACKENDS:-ddp zero2 zero2-offload}; do
  base="${backend%-eager}"; eager=()
  [ "$base" != "$backend" ] && eager=(--no-compile)
  case "$base" in
    ddp) run_one "$backend" ${eager[@]+"${eager[@]}"} ;;
    zero2) run_one "$backend" --deepspeed ${eager[@]+"${eager[@]}"} ;;
    zero2-offload) run_one "$backend" --deepspeed "$work/ds_offload.json" ${eager[@]+"${eager[@]}"} ;;
    zero3) run_one "$backend" --deepspeed "$work/ds_zero3.json" ${eager[@]+"${eager[@]}"} ;;
    zero3-offload) run_one "$backend" --deepspeed "$root/configs/ds_zero3_offload.json" ${eager[@]+"${eager[@]}"} ;;
    *) echo "❌ unknown backend $backend (ddp, zero2, zero2-offload, zero3, zero3-offload; each with optional -eager)" >&2
       exit 2 ;;
  esac
  names+=("$backend")
done

"$py" - "$work" "${names[@]}" <<'PY'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = ["| backend | tokens/s (median) | MFU | peak GPU GiB | peak host GiB | steps logged |",
        "|---|---:|---:|---:|---:|---:|"]
for name in sys.argv[2:]:
    try:
        host = json.loads((work / name / "host_memory.json").read_text())
    except (OSError, ValueError):
        host = {}
    host_gib = f"{host['peak_rss_gib']:.1f}" if host else "?"
    path = work / name / "logs" / "metrics.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    train = [r for r in recs if r.get("type") == "train" and r.get("tokens_per_s")][2:]
    if not train:
        why = "did not fit host memory" if host.get("stopped_for_memory") else "failed"
        rows.append(f"| {name} | {why} | | | {host_gib} | 0 |")
        continue
    tps = statistics.median(r["tokens_per_s"] for r in train)
    mfus = [r["mfu"] for r in train if r.get("mfu")]
    mem = max((r.get("mem_gib") or 0) for r in train)
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
    rows.append(f"| {name} | {tps:,.0f} | {mfu} | {mem:.1f} | {host_gib} | {len(train)} |")
text = "\n".join(rows)
print(text)
(work / "summary.md").write_text(text + "\n")
PY
