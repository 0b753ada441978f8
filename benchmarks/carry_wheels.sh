#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network: torchtitan and what it imports beyond that
# machine's own packages (torch 2.11, transformers, tensorboard, tokenizers, fsspec), torchao for
# --fp8, and pytest. Downloaded here for Python 3.12 on x86-64 into .carry/whl (git-ignored);
# installed there without an index:
#
#   benchmarks/carry_wheels.sh                       # here, with network
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl   # there
#   export PYTHONPATH=/tmp/site
#
# FA4=1 adds --attn fa4's packages into .carry/fa4 (their own folder: the CUTLASS DSL's CUDA 13
# library wheel alone is 92 MB): flash-attn-4 4.0.0b40, the CUTLASS DSL 4.8.1 for CUDA 13 (the
# machine's torch is built for CUDA 13), quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext. There,
# also put the DSL's own packages on the path (pip's .pth file is not read from a --target folder):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/fa4 .carry/fa4/*.whl
#   export PYTHONPATH=/tmp/site:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
#
# torchtitan 0.2.2, not the newest (0.3.0): 0.3.0 pairs with torch 2.14 and fails to import on
# torch 2.11 (torch.distributed.fsdp has no DataParallelMeshDims); 0.2.2 is the newest release
# that imports and trains there (benchmarks/bench_torchtitan.py). Its other requirements are not
# imported on the Llama path it runs: datasets (a stand-in answers its module-level import),
# einops, pillow, tomli (Python 3.12 has tomllib). typing_extensions: tyro needs 4.13 or newer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.carry/whl}"
mkdir -p "$dest"
py="${PYTHON:-python3}"

pure=(
    torchtitan==0.2.2
    tyro==1.0.17
    docstring-parser==0.18.0
    typeguard==4.6.1
    torchdata==0.11.0
    typing-extensions==4.16.0
    pytest==9.2.0
    iniconfig==2.3.1
    pluggy==1.7.0
)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$dest" "${pure[@]}"
# torchao ships compiled kernels: a manylinux wheel (cp310-abi3 serves 3.12).
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" torchao==0.18.0
if [ "${FA4:-0}" = 1 ]; then
    fa4="$root/.carry/fa4"
    mkdir -p "$fa4"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
        -d "$fa4" flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
        apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
    du -sh "$fa4"
fi
ls -l "$dest"
du -sh "$dest"
