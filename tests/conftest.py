"""Shared set-up for every test: the helper modules and the benchmark scripts on the import path.

tests/
  unit/      one process, seconds each: modules and their contracts
  e2e/       real runs: torchrun with 2 CPU (gloo) processes, the launcher, kill-and-resume
  scripts/   the shell and Python entry points (launcher, setup_env, sbatch, benchmarks)
  support/   helpers the tests import (e2e_support, fp8_support, triton_interpreter), never tests themselves

GPU-only tests carry the ``gpu`` marker and skip themselves without a CUDA device.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "tests" / "support", ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
