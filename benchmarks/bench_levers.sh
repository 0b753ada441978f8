#!/usr/bin/env bash
# Throughput levers, one after another on the same GPU: each row is one
# benchmarks/bench_throughput.py --only ours run with one change against the baseline.
#
#   benchmarks/bench_levers.sh                         # 350m, batch 8 x 2048, the default lever set
#   LEVERS="base chunk liger-all" benchmarks/bench_levers.sh --model-size 1.3b --batch-size 4
#
# Levers: base (with a GPU-time profile), synced (the GPU synchronized around every step,
# as the training loop did for its clock until it timed step periods instead), late-update
# (the optimizer launched only after the host read the vote, the earlier order), chunk (--ce-chunk-tokens 4096),
# liger-all / liger-nolce (liger-kernel's RMSNorm, SwiGLU, RoPE, with / without its
# fused linear + cross-entropy; needs liger-kernel), fp32-residual (the residual stream in fp32,
# as transformers; bf16 is the default), expand-kv (K/V expanded to the query head count for
# cuDNN, the earlier path), cudagraphs (torch.compile mode reduce-overhead: the step replayed as
# CUDA graphs), pageable (batches in pageable host memory: what pinned memory and non-blocking
# copies save), seq1024-b16 / seq4096-b4 (the same tokens per step in shorter / longer sequences),
# b16, b16-accum2 (2 micro-batches of 16 per optimizer step), b16-cudagraphs,
# b32, b16-chunk, b32-chunk (larger
# micro-batches, which the chunked loss makes fit), cdtune (Inductor's coordinate-
# descent tuning of its Triton kernels), autotune-gemm (Inductor benchmarks Triton matmul
# templates against cuBLAS; compiles for minutes), no-size-asserts (Inductor's generated code
# without its per-input size checks), clip-separate (clip_grad_norm_'s own pass instead of the
# clip inside the fused update), cublaslt (matmuls through cuBLASLt), fp32-weights / b16-fp32-weights
# (fp32 weights cast by autocast with torch's fused AdamW, instead of bf16 weights with fp32 masters),
# fp32-moments (AdamW's moments in fp32 instead of the default bf16 of the master-weight optimizer),
# combo-kernels (Inductor launches independent small kernels as one), no-workspace (cuBLAS without
# its workspace, CUBLAS_WORKSPACE_CONFIG=:0:0), no-workspace-cudagraphs (both together: cuBLAS's
# statically scheduled matmuls with the step replayed as CUDA graphs), rope-forward-kernel (the
# q/k rotation's forward as the Triton kernel its backward uses), ce-kernel / ce-compiled (the
# loss and its gradient from one Triton pass, the default since it was measured / F.cross_entropy
# fused by Inductor, the earlier path), fa4 / fa4-cudagraphs (FlashAttention-4's kernels, --attn
# fa4, needing flash-attn-4 and a Hopper GPU / the same with the step replayed as CUDA graphs,
# which takes FA4's Python launch path off the host's critical path), fp8 / fp8-cudagraphs (--fp8
# tensorwise through torchao, needing torchao and an FP8 GPU / the same as CUDA graphs: its
# profiled step idled 7.3% of the time on an H100 at 1.3b). Each run has its own time
# limit (LEVER_TIMEOUT, default 300 s), so one failure or hang leaves the others. JSON per run and
# summary.md go to ${BENCH_DIR:-outputs/bench_levers}. A benchmark: nothing here asserts a speed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${KOEN_PYTHON:-python3}"
work="${BENCH_DIR:-$root/outputs/bench_levers}"
mkdir -p "$work"
common=(--only ours --quick "$@")
batch_args() {  # the batch size typed on the command line wins over a lever's
  local b="$1"; shift
  for a in "$@"; do
    if [ "$a" = "--batch-size" ]; then
      # said aloud: a row named b16 that ran another batch is easy to misread
      echo "    note: --batch-size typed on the command line replaces this lever's batch $b (see the summary's batch column)" >&2
      return 0
    fi
  done
  printf '%s\n' --batch-size "$b"
}

read -r -a levers <<< "${LEVERS:-base chunk liger-all liger-nolce b16-chunk cdtune}"

run_lever() {  # name, one environment assignment (or -), bench options...
  local name="$1" envs="$2"; shift 2
  echo "=== $name"
  rm -f "$work/$name.json"  # a failed run must not leave an earlier run's numbers in the summary
  local -a cmd=(timeout "${LEVER_TIMEOUT:-300}" "$py" "$root/benchmarks/bench_throughput.py" "${common[@]}" "$@"
                --json "$work/$name.json")
  if [ "$envs" != "-" ]; then cmd=(env "$envs" "${cmd[@]}"); fi
  if ! "${cmd[@]}" > "$work/$name.log" 2>&1; then
    echo "    failed or timed out: see $work/$name.log"; tail -n 4 "$work/$name.log" | sed 's/^/    /'
  else
    tail -n 12 "$work/$name.log" | grep -E "^(koen_sllm|GPU time|liger)" | sed 's/^/    /' || true
  fi
}

for lever in "${levers[@]}"; do
  case "$lever" in
    base) run_lever base - --profile ;;
    synced) run_lever synced - --sync-each-step ;;
    late-update) run_lever late-update - --update-after-vote ;;
    chunk) run_lever chunk - --ce-chunk-tokens 4096 --profile ;;
    liger-all) run_lever liger-all - --liger all ;;
    liger-nolce) run_lever liger-nolce - --liger rmsnorm,swiglu,rope ;;
    fp32-residual) run_lever fp32-residual - --fp32-residual --profile ;;
    expand-kv) run_lever expand-kv - --expand-kv ;;
    cudagraphs) run_lever cudagraphs - --compile-mode reduce-overhead --profile ;;
    pageable) run_lever pageable - --pageable-batches ;;
    seq1024-b16) run_lever seq1024-b16 - --seq-len 1024 --batch-size 16 ;;
    seq4096-b4) run_lever seq4096-b4 - --seq-len 4096 --batch-size 4 ;;
    b16-accum2) mapfile -t b < <(batch_args 16 "$@"); run_lever b16-accum2 - "${b[@]}" --grad-accum 2 ;;
    b16-cudagraphs) mapfile -t b < <(batch_args 16 "$@"); run_lever b16-cudagraphs - "${b[@]}" --compile-mode reduce-overhead ;;
    b32) mapfile -t b < <(batch_args 32 "$@"); run_lever b32 - "${b[@]}" ;;
    b16) mapfile -t b < <(batch_args 16 "$@"); run_lever b16 - "${b[@]}" ;;
    b16-chunk) mapfile -t b < <(batch_args 16 "$@"); run_lever b16-chunk - "${b[@]}" --ce-chunk-tokens 4096 ;;
    b32-chunk) mapfile -t b < <(batch_args 32 "$@"); run_lever b32-chunk - "${b[@]}" --ce-chunk-tokens 4096 ;;
    cdtune) run_lever cdtune "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1" ;;
    autotune-gemm) run_lever autotune-gemm "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1" ;;
    no-size-asserts) run_lever no-size-asserts "TORCHINDUCTOR_SIZE_ASSERTS=0" ;;
    clip-separate) run_lever clip-separate - --clip-separate --profile ;;
    cublaslt) run_lever cublaslt "TORCH_BLAS_PREFER_CUBLASLT=1" --profile ;;
    fp32-weights) run_lever fp32-weights - --fp32-weights --profile ;;
    fp32-moments) run_lever fp32-moments - --fp32-moments --profile ;;
    b16-fp32-weights) mapfile -t b < <(batch_args 16 "$@"); run_lever b16-fp32-weights - "${b[@]}" --fp32-weights ;;
    no-workspace-cudagraphs) run_lever no-workspace-cudagraphs "CUBLAS_WORKSPACE_CONFIG=:0:0" --compile-mode reduce-overhead --profile ;;
    combo-kernels) run_lever combo-kernels "TORCHINDUCTOR_COMBO_KERNELS=1" --profile ;;
    no-workspace) run_lever no-workspace "CUBLAS_WORKSPACE_CONFIG=:0:0" --profile ;;
    rope-forward-kernel) run_lever rope-forward-kernel - --rope-forward kernel --profile ;;
    ce-kernel) run_lever ce-kernel - --cross-entropy kernel --profile ;;
    ce-compiled) run_lever ce-compiled - --cross-entropy compiled --profile ;;
    fa4) run_lever fa4 - --attn fa4 --profile ;;
    fa4-cudagraphs) run_lever fa4-cudagraphs - --attn fa4 --compile-mode reduce-overhead --profile ;;
    fp8) run_lever fp8 - --fp8 tensorwise --profile ;;
    fp8-cudagraphs) run_lever fp8-cudagraphs - --fp8 tensorwise --compile-mode reduce-overhead --profile ;;
    *) echo "❌ unknown lever $lever" >&2; exit 2 ;;
  esac
done

"$py" - "$work" "${levers[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, names = Path(sys.argv[1]), sys.argv[2:]
rows = ["| lever | batch x seq | tokens/s | MFU | peak GiB | vs base |", "|---|---:|---:|---:|---:|---:|"]
base = None
for name in names:
    path = work / f"{name}.json"
    if not path.exists():
        rows.append(f"| {name} | | failed | | | |"); continue
    rep = json.loads(path.read_text())
    r = rep["results"][0]
    base = base or (r["tokens_per_s"] if name == "base" else None)
    ratio = f"{r['tokens_per_s'] / base:.3f}x" if base else ""
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    accum = int(rep["args"].get("grad_accum", 1))
    batch = f"{rep['args']['batch_size']}" + (f" (x {accum} accum)" if accum > 1 else "") + f" x {rep['args']['seq_len']}"
    rows.append(f"| {name} | {batch} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | {ratio} |")
text = "\n".join(rows)
(work / "summary.md").write_text(text + "\n")
print(text)
EOF
