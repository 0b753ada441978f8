#!/usr/bin/env bash
# The multi-GPU checks in one go, on one host with N GPUs (or N CPU processes as a rehearsal):
#   scaling   DDP tokens/s on N GPUs against 1 GPU (bench_backends.sh, same model and batch)
#   curves    the same global batch on 1 GPU (accumulating N micro-batches) and on N GPUs:
#             per-step losses side by side
#   launcher  ./run_h100_dual.sh --train in the background on N GPUs, --status, --stop (which
#             saves), a resume to the end, and its losses against a straight launcher run
#   deepspeed ZeRO-2 against DDP on N GPUs: tokens/s and peak memory per GPU
#   buckets   DDP on N GPUs with 5 and 100 MB gradient buckets (BUCKETS_MB) against the
#             default 25 MB of the scaling part (not in the default PARTS)
#
#   benchmarks/multi_gpu_checks.sh                                   # 2 GPUs, 350m, batch 8, datasets/
#   PARTS="scaling curves" benchmarks/multi_gpu_checks.sh --steps 200
#   PARTS="scaling buckets" benchmarks/multi_gpu_checks.sh --steps 30
#   benchmarks/multi_gpu_checks.sh --model-size tiny --max-seq-length 64 --steps 8 -- --vocab-size 400
#
# Options after `--` go to every training run. Needs prepared data in --dataset-path
# (scripts/run_preprocessing.sh) and, for the deepspeed part, the deepspeed package.
# Work files in ${CHECK_DIR:-outputs/multi_gpu_checks}; a summary is printed at the end and
# written to summary.md there. PART_TIMEOUT (seconds, default 900) bounds each run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${KOEN_PYTHON:-python3}"
gpus=2; model=350m; batch=8; seq=2048; steps=200; dataset="$root/datasets"; extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --num-gpus) gpus="$2"; shift 2 ;;
    --model-size) model="$2"; shift 2 ;;
    --batch-size) batch="$2"; shift 2 ;;
    --max-seq-length) seq="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --dataset-path) dataset="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "❌ unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$gpus" -lt 2 ] || [ "$steps" -lt 4 ]; then
  echo "❌ --num-gpus must be at least 2 and --steps at least 4" >&2; exit 2
fi
work="${CHECK_DIR:-$root/outputs/multi_gpu_checks}"
mkdir -p "$work"
read -r -a parts <<< "${PARTS:-scaling curves launcher deepspeed}"
limit="${PART_TIMEOUT:-900}"
common=(--model-size "$model" --batch-size "$batch" --max-seq-length "$seq" --dataset-path "$dataset"
        --no-save-initial)

torchrun_train() {  # nproc, name, trainer options...
  local n="$1" name="$2"; shift 2
  rm -rf "${work:?}/$name"
  timeout "$limit" "$py" -m torch.distributed.run --standalone --nproc_per_node "$n" "$root/scripts/train_h100_dual.py" \
    --train "${common[@]}" --output-dir "$work/$name/out" --logs-dir "$work/$name/logs" "$@" \
    ${extra[@]+"${extra[@]}"} > "$work/$name.log" 2>&1 \
    || { echo "    $name failed: see $work/$name.log"; tail -n 4 "$work/$name.log" | sed 's/^/    /'; return 1; }
}

launcher() {  # launcher options... (the run's folders are fixed below)
  timeout "$limit" bash "$root/run_h100_dual.sh" "$@"
}

part_scaling() {
  for n in 1 "$gpus"; do
    BENCH_DIR="$work/scaling-$n" BACKENDS=ddp RUN_TIMEOUT="$limit" bash "$root/benchmarks/bench_backends.sh" \
      --model-size "$model" --batch-size "$batch" --max-seq-length "$seq" --steps "$steps" --num-gpus "$n" \
      --dataset-path "$dataset" -- ${extra[@]+"${extra[@]}"} | tail -n 1
  done
}

part_curves() {
  torchrun_train 1 "curve-1" --grad-accum "$gpus" --max-steps "$steps" --log-steps 1 --no-save-final --eval-batches 2
  torchrun_train "$gpus" "curve-$gpus" --grad-accum 1 --max-steps "$steps" --log-steps 1 --no-save-final --eval-batches 2
}

part_launcher() {
  local dir="$work/launcher" stop_at=$((steps / 2))
  rm -rf "$dir"; mkdir -p "$dir"
  local -a opts=(--train --num-gpus "$gpus" --model-size "$model" --batch-size "$batch" --max-seq-length "$seq"
                 --max-steps "$steps" --save-steps 1000000 --no-save-initial --dataset-path "$dataset")
  local -a tail_opts=(-- --log-steps 1 --eval-batches 2 ${extra[@]+"${extra[@]}"})
  echo "    straight run (foreground)"
  launcher "${opts[@]}" --foreground --output-dir "$dir/straight/out" --logs-dir "$dir/straight/logs" \
    "${tail_opts[@]}" > "$dir/straight.log" 2>&1 || { echo "    failed: see $dir/straight.log"; return 1; }
  echo "    background run, stopped after step $stop_at"
  launcher "${opts[@]}" --output-dir "$dir/stopped/out" --logs-dir "$dir/stopped/logs" "${tail_opts[@]}" \
    > "$dir/start.log" 2>&1 || { echo "    failed to start: see $dir/start.log"; return 1; }
  local console="$dir/stopped/logs/training_console.log" waited=0
  # Wait for step N/2 (or for the run to end early: no PID file any more).
  until [ "$(grep -oE "step [0-9]+/$steps" "$console" 2>/dev/null | tail -n 1 | grep -oE '^step [0-9]+' \
             | grep -oE '[0-9]+' || echo 0)" -ge "$stop_at" ]; do
    sleep 1; waited=$((waited + 1))
    if [ ! -f "$dir/stopped/logs/training.pid" ]; then echo "    the run ended before step $stop_at"; break; fi
    if [ "$waited" -ge "$limit" ]; then echo "    no step $stop_at within ${limit}s"; break; fi
  done
  launcher --status --logs-dir "$dir/stopped/logs" > "$dir/status.log" 2>&1 || true
  KOEN_STOP_TIMEOUT="$limit" timeout "$limit" bash "$root/run_h100_dual.sh" --stop --logs-dir "$dir/stopped/logs" \
    > "$dir/stop.log" 2>&1 || true
  echo "    resumed run (foreground, --resume auto)"
  launcher "${opts[@]}" --foreground --output-dir "$dir/stopped/out" --logs-dir "$dir/stopped/logs" "${tail_opts[@]}" \
    > "$dir/resume.log" 2>&1 || { echo "    failed: see $dir/resume.log"; return 1; }
}

part_deepspeed() {
  BENCH_DIR="$work/deepspeed" BACKENDS="ddp zero2" RUN_TIMEOUT="$limit" bash "$root/benchmarks/bench_backends.sh" \
    --model-size "$model" --batch-size "$batch" --max-seq-length "$seq" --steps "$steps" --num-gpus "$gpus" \
    --dataset-path "$dataset" -- ${extra[@]+"${extra[@]}"} | tail -n 3
}

part_buckets() {
  local mb
  for mb in ${BUCKETS_MB:-5 100}; do
    BENCH_DIR="$work/buckets-$mb" BACKENDS=ddp RUN_TIMEOUT="$limit" bash "$root/benchmarks/bench_backends.sh" \
      --model-size "$model" --batch-size "$batch" --max-seq-length "$seq" --steps "$steps" --num-gpus "$gpus" \
      --dataset-path "$dataset" -- --ddp-bucket-mb "$mb" ${extra[@]+"${extra[@]}"} | tail -n 1
  done
}

for part in "${parts[@]}"; do
  case "$part" in
    scaling|curves|launcher|deepspeed|buckets) echo "=== $part: $model, batch $batch x $seq, $gpus GPUs, $steps steps"
                                               "part_$part" || echo "    ($part did not finish)" ;;
    *) echo "❌ unknown part $part (scaling, curves, launcher, deepspeed, buckets)" >&2; exit 2 ;;
  esac
done

"$py" "$root/benchmarks/multi_gpu_summary.py" "$work" "$gpus" | tee "$work/summary.md"
