"""Start-up checks that every rank agrees on, with two CPU processes (gloo) and the real trainer.

A check that fails on rank 0 alone used to leave rank 1 at the next collective,
where it died with a gloo "Connection closed by peer" that hid the reason.
"""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from e2e_support import cpu_env, write_corpus
from koen_sllm.config import repo_root

pytestmark = pytest.mark.slow
TRAINER = repo_root() / "scripts" / "train_h100_dual.py"


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "koen_sllm.launcher.torchrun", "--standalone", "--nproc_per_node", "2",
                           str(TRAINER), *args], capture_output=True, text=True, env=cpu_env(), timeout=timeout)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: far too small for a checkpoint (root and mount privileges needed, else skipped)."""
    where = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.decode().strip() or 'no privilege'})")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_too_little_disk_is_reported_by_every_rank_with_the_reason(tmp_path, small_disk):
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data, docs=240, seed=7)
    res = torchrun("--train", "--max-steps", "2", "--dataset-path", str(data), "--output-dir", str(small_disk / "out"),
                   "--logs-dir", str(tmp_path / "logs"), "--vocab-size", "400", "--num-proc", "1")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Connection closed" not in out and "Traceback" not in out, out[-3000:]
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"training_rank_{rank}.log").read_text()
        assert "free on the disk holding" in log, f"rank {rank} does not name the reason:\n{log[-2000:]}"
    assert not list((small_disk / "out").glob("checkpoint-*")) and not (small_disk / "out" / "initial_model").exists()
