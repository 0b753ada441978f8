"""The launcher with the real trainer: CPU processes (gloo), a tiny model, a small generated corpus.

Two runs: one in the foreground (exit code, rotation of an earlier run's logs,
per-rank log files, console log through KOEN_CONSOLE_LOG) and one in the
background that --status watches and --stop ends with a final checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support import cpu_env, write_corpus
from koen_sllm.config import repo_root

pytestmark = pytest.mark.slow

ROOT = repo_root()
LAUNCHER = ROOT / "scripts" / "run_h100_dual.sh"

try:  # the trainer pulls in every module of the package
    import koen_sllm.trainer  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the checkout
    pytest.skip(f"the trainer cannot be imported yet ({type(exc).__name__}: {exc})", allow_module_level=True)


def launcher_env(**extra: str) -> dict[str, str]:
    env = cpu_env()
    for name in ("KOEN_TEST_GPU_COUNT", "KOEN_STOP_TIMEOUT", "CONDA_PREFIX"):
        env.pop(name, None)
    env.update(extra)
    return env


def run(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHER), *args], capture_output=True, text=True,
                          env=env or launcher_env(), timeout=timeout)


def corpus(folder: Path, docs: int = 240) -> Path:
    """A small deterministic Korean/English JSONL corpus (enough for a tokenizer and a few steps)."""
    folder.mkdir(parents=True)
    return write_corpus(folder, docs=docs, seed=7) / "mixed_pretraining.jsonl"


def common_args(tmp_path: Path) -> list[str]:
    return ["--dataset-path", str(tmp_path / "data set"), "--output-dir", str(tmp_path / "out dir"),
            "--logs-dir", str(tmp_path / "logs dir"), "--num-gpus", "2", "--no-install",
            "--", "--vocab-size", "400", "--num-proc", "1"]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return not re.search(r"^State:\s+Z", state, re.M)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def latest_checkpoint(out: Path):
    from koen_sllm.checkpoint.store import resolve_resume

    return resolve_resume("auto", out)


def test_foreground_run_rotates_logs_and_writes_per_rank_files(tmp_path):
    corpus(tmp_path / "data set")
    logs = tmp_path / "logs dir"
    logs.mkdir()
    (logs / "training_console.log").write_text("earlier console\n")
    (logs / "training_rank_1.log").write_text("earlier rank 1\n")
    res = run("--test", "--max-steps", "3", "--foreground", *common_args(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the run finished (exit 0)" in res.stdout
    assert (logs / "training_console.log.1").read_text() == "earlier console\n"
    assert (logs / "training_rank_1.log.1").read_text() == "earlier rank 1\n"
    for r in (0, 1):
        assert (logs / f"training_rank_{r}.log").stat().st_size > 0
        assert (logs / f"training_detail_rank_{r}.log").stat().st_size > 0
    console = (logs / "training_console.log").read_text()
    assert re.search(r"^\[[\d: -]+\] \[launcher\] command: .*koen_sllm\.launcher\.torchrun", console, re.M)
    assert "step 3/3 | loss " in console and "Training complete" in console
    assert "the run exited with code 0" in console
    assert not (logs / "training.pid").exists()
    assert latest_checkpoint(tmp_path / "out dir").name == "checkpoint-3"


def test_background_run_status_and_stop_with_a_final_checkpoint(tmp_path):
    corpus(tmp_path / "data set")
    logs, out = tmp_path / "logs dir", tmp_path / "out dir"
    res = run("--test", "--max-steps", "100000", "--save-steps", "100000", "--no-save-initial", *common_args(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "started in the background" in res.stdout and "tail -f" in res.stdout
    pid = json.loads((logs / "training.pid").read_text())["pid"]
    assert f"ps -p {pid}" in res.stdout and f"kill {pid}" in res.stdout
    try:
        console = logs / "training_console.log"
        wait_for(lambda: "| loss " in console.read_text(), 180, "the first progress line")
        assert latest_checkpoint(out) is None  # nothing saved yet: the stop must save

        status = run("--status", "--logs-dir", str(logs))
        assert status.returncode == 0, status.stdout
        assert f"running: PID {pid}" in status.stdout and re.search(r"step \d+/100000 \| loss [\d.]+", status.stdout)

        again = run("--test", *common_args(tmp_path))
        assert again.returncode == 1 and f"PID {pid}" in again.stderr  # refused while running

        stop = run("--stop", "--logs-dir", str(logs), env=launcher_env(KOEN_STOP_TIMEOUT="180"))
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "the run has ended" in stop.stdout and not alive(pid)
        assert not (logs / "training.pid").exists()
        assert "Training stopped" in console.read_text()
        ckpt = latest_checkpoint(out)
        assert ckpt is not None, "no checkpoint after --stop"
        assert Path(ckpt).name.startswith("checkpoint-")
        info = json.loads((Path(ckpt) / "training_info.json").read_text())
        assert info["step"] >= 1 and f"checkpoint-{info['step']}" == Path(ckpt).name
    finally:
        if alive(pid):
            os.kill(pid, 9)
