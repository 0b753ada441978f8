"""benchmarks/multi_gpu_checks.sh rehearsed on CPU: two gloo processes stand in for two GPUs."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from e2e_support import cpu_env, write_corpus
from koen_sllm.config import repo_root

pytestmark = pytest.mark.slow

ROOT = repo_root()


def checks(tmp_path, data, parts: str, steps: int) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "multi_gpu_checks.sh"), "--num-gpus", "2", "--model-size", "tiny",
         "--batch-size", "2", "--max-seq-length", "64", "--steps", str(steps), "--dataset-path", str(data),
         "--", "--vocab-size", "400", "--num-proc", "1", "--learning-rate", "2e-3"],
        capture_output=True, text=True, timeout=900,
        env=cpu_env(KOEN_PYTHON=sys.executable, CHECK_DIR=str(tmp_path / "checks"), PARTS=parts, PART_TIMEOUT="300"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "did not finish" not in proc.stdout, proc.stdout
    return proc.stdout


def test_multi_gpu_checks_rehearsal_on_two_cpu_processes(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_corpus(tmp_path / "data")
    parts = "scaling curves buckets" + (" deepspeed" if importlib.util.find_spec("deepspeed") else "")
    out = checks(tmp_path, data, parts, steps=40)
    assert re.search(r"2 GPUs / 1 GPU: \*\*\d+\.\d\dx\*\*", out), out
    buckets = re.findall(r"^\| (5|25|100) \| [\d,]+ \| (\d\.\d{3})x \|$", out, re.M)
    assert [mb for mb, _ in buckets] == ["25", "5", "100"] and buckets[0][1] == "1.000", out
    same_batch = re.search(r"per-step \|loss difference\| mean (\S+), max (\S+);", out)
    assert same_batch and float(same_batch.group(2)) < 1e-4, out  # fp32 on CPU: equal up to summation order
    assert "## Launcher" in out and "no checkpoint from --stop found" in out  # that part was not asked for

    # Long enough that --status and --stop land while it runs (tiny steps take ~50 ms here; the stop
    # came near step 210 of 300 on the 2-core machine, so 400 leaves room on a slower one).
    out = checks(tmp_path, data, "launcher", steps=400)
    assert re.search(r"--status: .*training is running: PID \d+", out), out
    assert "per-rank logs: training_rank_0.log, training_rank_1.log" in out
    stopped = re.search(r"--stop saved checkpoint-(\d+); the resumed run went on to step 400", out)
    assert stopped and 0 < int(stopped.group(1)) < 400, out
    assert "max |loss difference| 0.00e+00 (bit-identical)" in out, out
    summary = (tmp_path / "checks" / "summary.md").read_text()
    assert summary.startswith("# Multi-GPU checks (2 GPUs)") and "2 GPUs / 1 GPU" in summary  # earlier parts kept
