"""Running a test module's GPU-kernel check in Triton's CPU interpreter. The interpreter is
switched on by an environment variable read when triton is imported, so the check runs in a
child process of its own."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (Linux dev extra)")


def run_in_interpreter(module: str, calls: str) -> None:
    """Import the test module ``<module>.py`` (found under tests/) as ``t`` in an interpreter child and
    run ``calls`` (Python statements using ``t`` and ``torch``); fails with the child's output unless
    they finish."""
    where = next((ROOT / "tests").rglob(f"{module}.py")).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "support")])}
    code = (f"import sys, torch; sys.path.insert(0, {str(where)!r}); import {module} as t; "
            f"{calls}; print('checks finished')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checks finished" in proc.stdout
