#!/usr/bin/env bash
# One node of a SLURM cluster, in the Pyxis/Enroot container built by scripts/setup_pyxis.sh:
# one torchrun with GPUS_PER_NODE processes through srun, attached to this terminal.
#
#   scripts/train_pyxis_singlenode.sh --train --batch-size 8            # any free node
#   scripts/train_pyxis_singlenode.sh gpu-a01 --train --batch-size 8    # on that node
#   CUDA_VERSION=12.9 scripts/train_pyxis_singlenode.sh --train         # the image built for CUDA 12.9
#   KOEN_CONTAINER_IMAGE=/fsx/images/koen.sqsh scripts/train_pyxis_singlenode.sh --test
#
# Arguments: an optional node name, then trainer options (python scripts/train_h100_dual.py
# --help). As in scripts/train.sbatch: without --test/--train it adds --train, without --resume
# it adds --resume auto, so running the same command again continues from the latest checkpoint.
# Several nodes: KOEN_CONTAINER_IMAGE=... sbatch scripts/train.sbatch (docs/clusters.md).
#
# Environment:
#   KOEN_CONTAINER_IMAGE  default: <repo>/koen-sllm-cuda$CUDA_VERSION.sqsh (scripts/setup_pyxis.sh's
#                   output), CUDA_VERSION defaulting to docker/Dockerfile's
#   KOEN_CONTAINER_MOUNTS, KOEN_CONTAINER_ARGS, KOEN_CONTAINER_PYTHON   as in scripts/train.sbatch
#   GPUS_PER_NODE   default 8: the GPUs srun asks for and the processes torchrun starts
#   NCCL_DEBUG (WARN), NCCL_IB_DISABLE (0), NCCL_SOCKET_IFNAME (^docker0,lo)
#   KOEN_SBATCH_DRY_RUN=1  print the srun command and exit (no SLURM needed)
set -euo pipefail

die() { printf '❌ %s\n' "$*" >&2; exit 2; }

ROOT="${KOEN_SLLM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$ROOT/scripts/train_h100_dual.py" ]] ||
  die "학습 스크립트를 찾을 수 없습니다 / scripts/train_h100_dual.py not found under '$ROOT': set KOEN_SLLM_ROOT to the checkout"
cd "$ROOT"  # relative paths in the options mean the same to this script and the trainer
# shellcheck source=koen_sllm/launcher/sbatch_lib.sh
source "$ROOT/koen_sllm/launcher/sbatch_lib.sh"

DRY_RUN="${KOEN_SBATCH_DRY_RUN:-0}"
NODE=""
if [[ $# -gt 0 && "$1" != -* ]]; then NODE="$1"; shift; fi

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
  die "GPUS_PER_NODE 에는 양의 정수가 필요합니다 / GPUS_PER_NODE needs a positive integer, got '$GPUS_PER_NODE'"
CUDA_VERSION="${CUDA_VERSION:-$(sed -n 's/^ARG CUDA_VERSION=//p' "$ROOT/docker/Dockerfile")}"
IMAGE="${KOEN_CONTAINER_IMAGE:-$ROOT/koen-sllm-cuda$CUDA_VERSION.sqsh}"

export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^docker0,lo}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

koen_trainer_args "$ROOT" "$@"
koen_container_setup "$ROOT" "$IMAGE" || exit 2
IMAGE="$KOEN_IMAGE"

CMD=("${KOEN_CONTAINER_PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node "$GPUS_PER_NODE"
  "$ROOT/scripts/train_h100_dual.py" "${KOEN_ARGS[@]}")
SRUN=(srun --job-name=koen-sllm --nodes 1 --ntasks 1 --gpus-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1)
if [[ -n "$NODE" ]]; then SRUN+=(--nodelist "$NODE"); fi
SRUN+=("${KOEN_CONTAINER_SRUN[@]}")

printf 'koen-sllm on one node%s: %s GPU(s), container %s\n' "${NODE:+ ($NODE)}" "$GPUS_PER_NODE" "$IMAGE"
printf 'mounts: %s\n' "$(IFS=,; printf '%s' "${KOEN_MOUNTS[*]}")${KOEN_CONTAINER_MOUNTS:+,$KOEN_CONTAINER_MOUNTS}"
printf 'NCCL_DEBUG=%s NCCL_IB_DISABLE=%s NCCL_SOCKET_IFNAME=%s\n' "$NCCL_DEBUG" "$NCCL_IB_DISABLE" "$NCCL_SOCKET_IFNAME"
printf 'launched with:\n%s\n' "$(koen_shquote "${SRUN[@]}" "${CMD[@]}")"
if [[ "$DRY_RUN" != 0 ]]; then
  exit 0
fi
command -v srun >/dev/null 2>&1 || die "srun 을 찾을 수 없습니다 / srun not found: run this on a SLURM login node (with the pyxis plugin)"

# Rank 0 also writes the console log that run_h100_dual.sh --status reads; container mounts
# need their sources to exist.
mkdir -p -- "$KOEN_LOGS_DIR" "${KOEN_CREATE[@]}"
koen_rotate_file "$KOEN_LOGS_DIR/training_console.log"
export KOEN_CONSOLE_LOG="$KOEN_LOGS_DIR/training_console.log"
koen_log_line "$KOEN_CONSOLE_LOG" "single node: $(koen_shquote "${SRUN[@]}" "${CMD[@]}")"
exec "${SRUN[@]}" "${CMD[@]}"
