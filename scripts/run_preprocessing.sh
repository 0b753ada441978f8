#!/usr/bin/env bash
# Prepare training data: mix JSONL/txt corpora, train the tokenizer, write token files.
#
#   scripts/run_preprocessing.sh --recipe1 data/ko/*.jsonl data/en/     # Korean 0.6 / English 0.4
#   scripts/run_preprocessing.sh --recipe1                              # reads datasets/raw/
#   scripts/run_preprocessing.sh --mix natural corpus.txt --vocab-size 16000
#   scripts/run_preprocessing.sh --help                                 # every option
#
# Same as `python -m koen_sllm.data.prepare ...` from this checkout (docs/data.md). Works from any
# directory: relative input paths follow the current directory, default outputs go to
# <repo>/datasets/. Uses <repo>/.venv/bin/python when it exists, else python3 on PATH.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd -- "${script_dir}/.." && pwd -P)

if [[ -x "${repo_root}/.venv/bin/python" ]]; then
    python_bin="${repo_root}/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
    python_bin=$(command -v python3)
else
    echo "error: no Python found: create ${repo_root}/.venv (python3 -m venv .venv) or install python3" >&2
    exit 127
fi

# Import koen_sllm from this checkout even when it is not installed.
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${python_bin}" -m koen_sllm.data.prepare "$@"
