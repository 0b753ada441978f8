#!/usr/bin/env bash
# Builds the training image (docker/Dockerfile) and imports it for Pyxis/Enroot as a squashfs
# file that `srun --container-image` (scripts/train.sbatch, scripts/train_pyxis_singlenode.sh)
# starts on every node. Run it on a machine with Docker and enroot, from this checkout.
#
#   scripts/setup_pyxis.sh                        # -> koen-sllm-cuda12.8.sqsh in the checkout
#   CUDA_VERSION=13.0 scripts/setup_pyxis.sh      # another CUDA: -> koen-sllm-cuda13.0.sqsh
#   scripts/setup_pyxis.sh --target deepspeed     # with DeepSpeed: -> koen-sllm-deepspeed-cuda12.8.sqsh
#   scripts/setup_pyxis.sh --output /fsx/images/koen.sqsh   # a shared filesystem every node sees
#   scripts/setup_pyxis.sh --dry-run              # print the commands, run nothing
#
# Options: --dry-run, --target NAME (a stage of docker/Dockerfile: train, the default, or
# deepspeed), --output FILE, --tag NAME (the Docker image name), -h/--help.
# Environment: CUDA_VERSION, TORCH_VERSION (defaults: the ARG lines of docker/Dockerfile; the
# pair must be a pytorch/pytorch:<torch>-cuda<cuda>-cudnn9-runtime tag), BASE_FLAVOR (runtime
# or devel). The file is written next to its final name and renamed, so a job starting
# meanwhile reads the old image or the new one, never half of one.
set -euo pipefail

die() { printf '❌ %s\n' "$*" >&2; exit 2; }   # a bad option or value: nothing was run
fail() { printf '❌ %s\n' "$*" >&2; exit 1; }  # a missing tool or a failed step

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="$ROOT/docker/Dockerfile"
# shellcheck source=koen_sllm/launcher/sbatch_lib.sh
source "$ROOT/koen_sllm/launcher/sbatch_lib.sh"
[[ -f "$DOCKERFILE" ]] || die "Dockerfile 이 없습니다 / $DOCKERFILE not found"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

dockerfile_default() { sed -n "s/^ARG $1=//p" "$DOCKERFILE" | head -n 1; }

DRY_RUN=0 TARGET="" OUTPUT="" TAG=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --target) [[ $# -ge 2 ]] || die "--target 에 값이 필요합니다 / --target needs a stage name (train or deepspeed)"; TARGET="$2"; shift ;;
    --target=*) TARGET="${1#*=}" ;;
    --output) [[ $# -ge 2 ]] || die "--output 에 값이 필요합니다 / --output needs a file name"; OUTPUT="$2"; shift ;;
    --output=*) OUTPUT="${1#*=}" ;;
    --tag) [[ $# -ge 2 ]] || die "--tag 에 값이 필요합니다 / --tag needs an image name"; TAG="$2"; shift ;;
    --tag=*) TAG="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) die "알 수 없는 옵션 / unknown option '$1': see scripts/setup_pyxis.sh --help" ;;
  esac
  shift
done

CUDA_VERSION="${CUDA_VERSION:-$(dockerfile_default CUDA_VERSION)}"
TORCH_VERSION="${TORCH_VERSION:-$(dockerfile_default TORCH_VERSION)}"
BASE_FLAVOR="${BASE_FLAVOR:-$(dockerfile_default BASE_FLAVOR)}"
[[ "$CUDA_VERSION" =~ ^[0-9]+\.[0-9]+$ ]] ||
  die "CUDA_VERSION 형식이 잘못되었습니다 / CUDA_VERSION must look like 12.8, got '$CUDA_VERSION'"
[[ "$TORCH_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
  die "TORCH_VERSION 형식이 잘못되었습니다 / TORCH_VERSION must look like 2.11.0, got '$TORCH_VERSION'"
[[ "$BASE_FLAVOR" == runtime || "$BASE_FLAVOR" == devel ]] ||
  die "BASE_FLAVOR 는 runtime 또는 devel 입니다 / BASE_FLAVOR must be runtime or devel, got '$BASE_FLAVOR'"
if [[ -n "$TARGET" ]] && ! grep -qE "^FROM .* AS $TARGET\$" "$DOCKERFILE"; then
  die "알 수 없는 빌드 대상 / --target '$TARGET' is not a stage of docker/Dockerfile: use train or deepspeed"
fi

variant="${TARGET:-train}"
suffix="cuda$CUDA_VERSION"
[[ "$BASE_FLAVOR" == devel ]] && suffix+="-devel"
if [[ "$variant" == train ]]; then name="koen-sllm"; else name="koen-sllm-$variant"; fi
TAG="${TAG:-$name:$TORCH_VERSION-$suffix}"
OUTPUT="$(realpath -m -s -- "${OUTPUT:-$ROOT/$name-$suffix.sqsh}")"
PARTIAL="$OUTPUT.partial"

BUILD=(docker build -f "$DOCKERFILE" --build-arg "CUDA_VERSION=$CUDA_VERSION" --build-arg "TORCH_VERSION=$TORCH_VERSION"
  --build-arg "BASE_FLAVOR=$BASE_FLAVOR")
if [[ -n "$TARGET" ]]; then BUILD+=(--target "$TARGET"); fi
BUILD+=(-t "$TAG" "$ROOT")
IMPORT=(enroot import --output "$PARTIAL" "dockerd://$TAG")
PUBLISH=(mv -f -- "$PARTIAL" "$OUTPUT")

printf 'image: %s (torch %s, CUDA %s, %s base) -> %s\n' "$TAG" "$TORCH_VERSION" "$CUDA_VERSION" "$BASE_FLAVOR" "$OUTPUT"
printf '%s\n' "$(koen_shquote "${BUILD[@]}")" "$(koen_shquote "${IMPORT[@]}")" "$(koen_shquote "${PUBLISH[@]}")"
if [[ "$DRY_RUN" != 0 ]]; then
  exit 0
fi

command -v docker >/dev/null 2>&1 ||
  fail "docker 를 찾을 수 없습니다 / docker not found: run this where Docker is installed and usable by you (or --dry-run to see the commands)"
command -v enroot >/dev/null 2>&1 ||
  fail "enroot 를 찾을 수 없습니다 / enroot not found: install it (https://github.com/NVIDIA/enroot) or run this on a node that has it"
[[ -d "$(dirname -- "$OUTPUT")" ]] ||
  die "출력 폴더가 없습니다 / the folder of --output $(koen_shquote "$OUTPUT") does not exist"

"${BUILD[@]}" || fail "이미지 빌드 실패 / docker build failed (see its output above)"
rm -f -- "$PARTIAL"
"${IMPORT[@]}" || { rm -f -- "$PARTIAL"; fail "enroot import 실패 / enroot import failed (see its output above)"; }
"${PUBLISH[@]}"
printf '✅ %s\n   KOEN_CONTAINER_IMAGE=%s sbatch scripts/train.sbatch --train\n' "$OUTPUT" "$(koen_shquote "$OUTPUT")"
