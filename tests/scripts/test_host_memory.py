"""benchmarks/host_memory.py: the peak resident memory of a process tree, children included, and
a run stopped before it exhausts the machine. Linux only (it reads /proc)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from koen_sllm.config import repo_root

SCRIPT = repo_root() / "benchmarks" / "host_memory.py"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

spec = importlib.util.spec_from_file_location("host_memory", SCRIPT)
hm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hm)

# A parent that starts a child holding 300 MiB: the tree's peak counts the child.
CHILD = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
PARENT = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {CHILD!r}])"


def test_the_peak_counts_the_whole_tree(tmp_path):
    out = tmp_path / "mem.json"
    code = hm.main(["--json", str(out), "--interval", "0.1", "--", sys.executable, "-c", PARENT])
    rep = json.loads(out.read_text())
    assert code == 0 and rep["returncode"] == 0 and not rep["stopped_for_memory"]
    assert rep["peak_rss_gib"] >= 300 / 1024 and rep["min_available_gib"] > 0


def test_a_run_below_the_floor_is_stopped_and_reported(tmp_path):
    out = tmp_path / "mem.json"
    floor = hm.available_bytes() / hm.GIB + 1000  # always below: the first sample stops it
    code = hm.main(["--json", str(out), "--interval", "0.1", "--floor-gib", str(floor), "--",
                    sys.executable, "-c", "import time; time.sleep(60)"])
    rep = json.loads(out.read_text())
    assert rep["stopped_for_memory"] and rep["seconds"] < 30 and code != 0


def test_the_exit_code_is_the_commands(tmp_path):
    assert hm.main(["--json", str(tmp_path / "m.json"), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    with pytest.raises(SystemExit):
        hm.main(["--json", str(tmp_path / "m.json")])
