#!/usr/bin/env bash
# Run the whole test suite on CPU; sets up the Python environment first.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -k checkpoint   # extra arguments go to pytest
#
# The environment is the active virtualenv/conda env, else <repo>/.venv
# (created when missing); missing packages are installed with the `dev` extra.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=koen_sllm/launcher/setup_env.sh
source "$root/koen_sllm/launcher/setup_env.sh"
koen_setup_env dev
cd "$root"
# The checkout's package first, whether or not it is installed in this environment.
export PYTHONPATH="$KOEN_PYTHONPATH"
# pytest exits 5 when it collects nothing: an empty run is a failure here too.
exec "$KOEN_PYTHON" -m pytest "$@"
