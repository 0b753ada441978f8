#!/usr/bin/env bash
# Build the wheels the optional DeepSpeed backend needs, for a GPU machine without network.
#
#   benchmarks/build_deepspeed_wheel.sh                 # -> .whl/ (git-ignored)
#   DS_VERSION=0.19.8 PY_TARGET=3.12 benchmarks/build_deepspeed_wheel.sh
#
# Then, on the GPU machine, from the checkout that carries .whl/:
#   python3 -m pip install --no-index --find-links .whl deepspeed
#   python3 -c "import deepspeed; print(deepspeed.__version__)"
#
# What is built and why (docs/deepspeed.md has the details):
# - deepspeed is published as a source archive only; it is built here with
#   DS_BUILD_OPS=0, so the wheel is pure Python and compiles its C++/CUDA ops
#   just in time on first use. The project's default config needs none of them
#   (torch.optim.AdamW through "torch_adam"); CPU optimizer offload JIT-builds
#   DeepSpeedCPUAdam (needs a C++ compiler and ninja on the GPU machine).
# - its dependencies that the GPU image lacks: hjson, and pydantic with
#   pydantic-core (a compiled wheel, fetched for the image's Python and
#   platform), annotated-types, typing-inspection, typing-extensions.
#   The image already has torch, numpy, psutil, py-cpuinfo, msgpack, ninja,
#   nvidia-ml-py, einops, packaging and tqdm, so those are not carried.
set -euo pipefail

DS_VERSION="${DS_VERSION:-0.19.8}"
PY_TARGET="${PY_TARGET:-3.12}"              # python3 on the GPU image
PLATFORM="${PLATFORM:-manylinux2014_x86_64}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/.whl}"
PY="${PY:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

mkdir -p "$OUT"
echo "building deepspeed==$DS_VERSION (pure Python, ops compiled on first use) into $OUT"
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-cache-dir "deepspeed==$DS_VERSION" -w "$OUT"

echo "fetching the dependencies the GPU image lacks, for Python $PY_TARGET on $PLATFORM"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_TARGET" --platform "$PLATFORM" \
    -d "$OUT" hjson
# pydantic pins pydantic-core exactly; resolving pydantic with its dependencies for
# the target interpreter picks the matching compiled wheel.
"$PY" -m pip download --only-binary=:all: --python-version "$PY_TARGET" --platform "$PLATFORM" \
    --implementation cp -d "$OUT" "pydantic>=2,<3"

echo
echo "wheels in $OUT:"
(cd "$OUT" && ls -1 ./*.whl | sed 's|^\./||' && sha256sum ./*.whl | sed 's|\./||' >SHA256SUMS)
du -sh "$OUT" | awk '{print "total " $1}'
echo "install on the GPU machine: python3 -m pip install --no-index --find-links .whl deepspeed"
