"""koen_sllm.launcher.pidfile: a PID file is trusted only while it names that very process.

Every case runs against real processes (sleep, small python parents) and real
/proc; records are altered by hand to stand in for PID reuse, a reboot or an
exec of another program.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from koen_sllm.launcher import pidfile
from koen_sllm.launcher.pidfile import (PidFileState, RunProcess, boot_id, child_pids, describe_process,
                                        is_alive, proc_cmdline, proc_start_time, read_pid_file, record_for,
                                        remove_if_stale, worker_pids, write_pid_file)

ROOT = Path(__file__).resolve().parents[2]


def _wait_exec(pid: int) -> None:
    """Popen may return before the kernel has mapped the new program's arguments."""
    for _ in range(5000):
        if Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        time.sleep(0.001)


@pytest.fixture
def spawn():
    """Start processes in their own session; kill each whole group at teardown."""
    started: list[subprocess.Popen] = []

    def start(cmd, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        started.append(proc)
        _wait_exec(proc.pid)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture
def sleeper(spawn) -> subprocess.Popen:
    return spawn(["sleep", "60"])


def _write_altered(path: Path, record: RunProcess, **changes) -> None:
    write_pid_file(path, dataclasses.replace(record, **changes))


def test_reads_of_a_live_process(sleeper):
    assert is_alive(sleeper.pid)
    assert proc_cmdline(sleeper.pid) == ["sleep", "60"]
    start = proc_start_time(sleeper.pid)
    assert isinstance(start, int) and start >= proc_start_time(os.getpid())
    assert re.fullmatch(r"[0-9a-f-]{36}", boot_id())
    facts = describe_process(sleeper.pid)
    assert facts == {"pid": sleeper.pid, "start_time": start, "boot_id": boot_id(), "cmdline": ["sleep", "60"]}


def test_live_record_reads_live(tmp_path, sleeper):
    record = record_for(sleeper.pid, "run-1", mode="train", logs_dir="/l", output_dir="/o")
    assert record.run_id == "run-1" and record.mode == "train" and record.started_at
    path = tmp_path / "logs" / "training.pid"  # parent made on write
    write_pid_file(path, record)
    state = read_pid_file(path)
    assert state == PidFileState("live", record, "")
    # The write went through a temporary file that is gone now.
    assert sorted(p.name for p in path.parent.iterdir()) == ["training.pid"]
    assert json.loads(path.read_text())["format"] == pidfile.FORMAT


def test_changed_cmdline_is_stale(tmp_path, sleeper):
    path = tmp_path / "run.pid"
    _write_altered(path, record_for(sleeper.pid, "r"), cmdline=["python", "-m", "koen_sllm.cli", "train"])
    state = read_pid_file(path)
    assert state.state == "stale" and "command line differs" in state.reason
    assert state.proc.pid == sleeper.pid


def test_changed_start_time_is_stale(tmp_path, sleeper):
    """The same PID with another start time is a reused PID: another process."""
    path = tmp_path / "run.pid"
    record = record_for(sleeper.pid, "r")
    _write_altered(path, record, start_time=record.start_time - 1)
    state = read_pid_file(path)
    assert state.state == "stale"
    assert state.reason == f"PID {sleeper.pid} now belongs to another process (started at a different time)"


def test_changed_boot_id_is_stale(tmp_path, sleeper):
    path = tmp_path / "run.pid"
    _write_altered(path, record_for(sleeper.pid, "r"), boot_id="00000000-0000-0000-0000-000000000000")
    state = read_pid_file(path)
    assert state.state == "stale" and state.reason == "written before a reboot"


def test_empty_boot_id_is_not_compared(tmp_path, sleeper):
    path = tmp_path / "run.pid"
    _write_altered(path, record_for(sleeper.pid, "r"), boot_id="")
    assert read_pid_file(path).state == "live"


@pytest.mark.parametrize("pid", [1, 0])
def test_pid_0_and_1_are_never_live(tmp_path, pid):
    """Even with PID 1's true start time and command line, it is never a run of ours."""
    assert not is_alive(pid)
    with pytest.raises(ProcessLookupError):
        record_for(pid, "r")
    path = tmp_path / "run.pid"
    start = proc_start_time(1) if pid == 1 else 0
    cmdline = proc_cmdline(1) if pid == 1 else []
    write_pid_file(path, RunProcess(pid=pid, start_time=start, boot_id=boot_id(), cmdline=cmdline, run_id="r"))
    state = read_pid_file(path)
    assert state.state == "stale" and state.reason == f"PID {pid} is never a training run"
    assert remove_if_stale(path) == state.reason and not path.exists()


def test_bare_number_is_stale_even_for_a_live_process(tmp_path, sleeper):
    """The old launcher's format (just a PID) proves nothing about whose process it is."""
    path = tmp_path / "run.pid"
    path.write_text(f"{sleeper.pid}\n")
    state = read_pid_file(path)
    assert state.state == "stale" and state.proc is None
    assert "old format" in state.reason


@pytest.mark.parametrize("content", [b"", b"not json {", b"[1, 2]", b'{"pid": 5}', b"\xff\xfe",
                                     b'{"format": "koen-sllm-pid/1", "pid": "12", "start_time": 1, '
                                     b'"boot_id": "", "cmdline": [], "run_id": "r"}'])
def test_garbage_is_stale(tmp_path, content):
    path = tmp_path / "run.pid"
    path.write_bytes(content)
    state = read_pid_file(path)
    assert state == PidFileState("stale", None, "not a koen-sllm PID file (old format or garbage)")


def test_dead_pid_is_stale(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    record = record_for(proc.pid, "r")
    proc.kill()
    proc.wait()
    path = tmp_path / "run.pid"
    write_pid_file(path, record)
    state = read_pid_file(path)
    assert state.state == "stale"
    if not is_alive(proc.pid):  # the PID was not handed out again meanwhile
        assert state.reason == f"PID {proc.pid} is not running"


def test_zombie_is_not_alive(tmp_path):
    """Exited but not yet reaped: /proc still lists it, with State: Z."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = record_for(proc.pid, "r")
        os.kill(proc.pid, signal.SIGKILL)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited; still unreaped
        assert Path(f"/proc/{proc.pid}").exists()
        assert not is_alive(proc.pid)
        path = tmp_path / "run.pid"
        write_pid_file(path, record)
        assert read_pid_file(path).reason == f"PID {proc.pid} is not running"
        with pytest.raises(ProcessLookupError):
            record_for(proc.pid, "r")
    finally:
        proc.kill()
        proc.wait()


def test_missing(tmp_path):
    assert read_pid_file(tmp_path / "nope.pid") == PidFileState("missing", None, "")
    assert remove_if_stale(tmp_path / "nope.pid") is None


def test_unreadable_file_is_stale(tmp_path):
    path = tmp_path / "run.pid"
    path.mkdir()  # reading a directory fails whoever runs the test (root included)
    state = read_pid_file(path)
    assert state.state == "stale" and "cannot be read" in state.reason


def test_remove_if_stale_keeps_live_and_removes_stale(tmp_path, sleeper):
    path = tmp_path / "run.pid"
    record = record_for(sleeper.pid, "r")
    write_pid_file(path, record)
    assert remove_if_stale(path) is None
    assert path.exists() and read_pid_file(path).state == "live"

    _write_altered(path, record, start_time=record.start_time + 7)
    assert remove_if_stale(path) == f"PID {sleeper.pid} now belongs to another process (started at a different time)"
    assert not path.exists()


def test_record_round_trips_odd_arguments(tmp_path, spawn):
    """Arguments with spaces, newlines, non-ASCII and undecodable bytes compare equal after JSON."""
    args = ["sleep", "60", "a b\nc", "한국어"]
    proc = spawn([sys.executable, "-c", "import time; time.sleep(60)", *args[2:], os.fsdecode(b"\xffraw")])
    path = tmp_path / "run.pid"
    write_pid_file(path, record_for(proc.pid, "r"))
    state = read_pid_file(path)
    assert state.state == "live", state.reason
    assert state.proc.cmdline[-3:] == ["a b\nc", "한국어", os.fsdecode(b"\xffraw")]


def test_record_for_rejects_unknown_fields(sleeper):
    with pytest.raises(TypeError):
        record_for(sleeper.pid, "r", colour="blue")


PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    run_id = sys.argv[1]
    base = {k: v for k, v in os.environ.items() if k != "KOEN_RUN_ID"}
    ours = subprocess.Popen(["sleep", "60"], env=dict(base, KOEN_RUN_ID=run_id))
    plain = subprocess.Popen(["sleep", "60"], env=base)
    prefix = subprocess.Popen(["sleep", "60"], env=dict(base, KOEN_RUN_ID=run_id + "-other"))
    print(ours.pid, plain.pid, prefix.pid, flush=True)
    time.sleep(60)
""")


def test_worker_pids_only_children_of_this_run(spawn):
    run_id = "20261206-070000-test"
    parent = spawn([sys.executable, "-c", PARENT, run_id], stdout=subprocess.PIPE, text=True,
                   env={k: v for k, v in os.environ.items() if k != "KOEN_RUN_ID"})
    ours, plain, prefix = map(int, parent.stdout.readline().split())
    # A process of the same run id that is not the parent's child.
    stranger = spawn(["sleep", "60"], env=dict(os.environ, KOEN_RUN_ID=run_id))

    assert child_pids(parent.pid) == sorted([ours, plain, prefix])
    assert stranger.pid in child_pids(os.getpid()) and stranger.pid not in child_pids(parent.pid)
    record = record_for(parent.pid, run_id)
    assert worker_pids(record) == [ours]
    assert worker_pids(dataclasses.replace(record, run_id=run_id + "-other")) == [prefix]
    assert worker_pids(dataclasses.replace(record, run_id="")) == []
    assert worker_pids(dataclasses.replace(record, pid=1)) == []


@pytest.mark.parametrize("name", ["my (odd) sleep", "x) 0 0 (y"])
def test_comm_with_spaces_and_parens(tmp_path, spawn, name):
    """The comm field may hold ')' and spaces; fields must be counted from the last ')'."""
    exe = tmp_path / name
    shutil.copy("/bin/sleep", exe)
    proc = spawn([str(exe), "60"])
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    match = re.fullmatch(r"(\d+) \((.*)\) (.*)", stat.strip(), re.S)  # greedy: up to the last ')'
    assert match and match.group(2) == name[:15]
    fields = match.group(3).split()
    assert proc_start_time(proc.pid) == int(fields[22 - 3])
    assert proc.pid in child_pids(os.getpid())
    assert proc_cmdline(proc.pid) == [str(exe), "60"]
