#!/usr/bin/env bash
# Korean/English sLLM training launcher (one host, DDP over 1-8 GPUs; CPU processes without a GPU).
#
#   ./run_h100_dual.sh                           # test mode: 10 steps, in the background (outputs/test, logs/test)
#   ./run_h100_dual.sh --train --batch-size 8    # full training run, in the background (outputs/, logs/)
#   ./run_h100_dual.sh --train                   # again after --stop: resumes with the recorded settings
#   ./run_h100_dual.sh --status | --stop         # watch / stop it (the stop saves a checkpoint)
#   ./run_h100_dual.sh --dry-run --train         # print the command and the resolved configuration
#
# Every option (the trainer's included) is parsed, defaulted and checked in one place,
# koen_sllm/launcher (options: --help or docs/launcher.md). That package needs only
# the standard library: it runs with any python3 >= 3.10 before the training
# environment exists, then sets that up through koen_sllm/launcher/setup_env.sh.
# Exit codes: 0 ok, 1 a run-time failure, 2 a bad option (nothing started), 3 --status: not running.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PY3="$(command -v python3 || true)"
if [[ -z "$PY3" ]] || ! "$PY3" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  printf '❌ Python 3.10 이상이 필요합니다 / python3 >= 3.10 not found: install it (e.g. sudo apt install python3 python3-venv)\n' >&2
  exit 1
fi
export KOEN_SLLM_ROOT="$ROOT"
# Not `python3 -m`: that puts the current directory first on sys.path, and a launcher started
# from inside another checkout would run that checkout's code.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY3" -c \
  'import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module("koen_sllm.launcher", run_name="__main__", alter_sys=True)' \
  "$ROOT" "$@"
