"""koen_sllm.run_lock: one writer per folder, through a kernel flock.

flock belongs to the open file description, so two FolderLock objects in this
one process conflict like two runs would; the cross-process cases use a real
child python that holds the lock and is then killed with SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from koen_sllm.run_lock import LOCK_NAME, FolderBusy, FolderLock, lock_holder

ROOT = Path(__file__).resolve().parents[2]

OWNER = {"pid": 123, "host": "h", "run_id": "20261206-070000", "mode": "train",
         "started_at": "2026-12-06T07:00:00", "command": "python -m koen_sllm.cli train --config c.yaml"}


@pytest.fixture
def held(tmp_path):
    """A lock held on tmp_path/out by this process, released at teardown."""
    lock = FolderLock(tmp_path / "out")
    lock.acquire(dict(OWNER))
    yield lock
    lock.release()


def test_acquire_creates_folder_and_records_owner(tmp_path, held):
    assert held.held
    path = tmp_path / "out" / LOCK_NAME
    assert json.loads(path.read_text()) == OWNER
    assert lock_holder(tmp_path / "out") == OWNER
    assert not os.get_inheritable(held._fd)


def test_pid_and_host_default_to_this_process(tmp_path):
    with FolderLock(tmp_path / "a" / "b") as lock:
        assert lock.held
        assert lock_holder(tmp_path / "a" / "b") == {"pid": os.getpid(), "host": socket.gethostname()}
    assert not lock.held


def test_second_lock_in_one_process_is_busy(tmp_path, held):
    other = FolderLock(tmp_path / "out")
    with pytest.raises(FolderBusy) as info:
        other.acquire({"run_id": "second"})
    assert not other.held
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("다른 실행이 이 폴더를 사용 중입니다 / ")
    assert msg == ("다른 실행이 이 폴더를 사용 중입니다 / the output folder " + str(tmp_path / "out")
                   + " is in use by another run: PID 123 on host h (run 20261206-070000, mode train, "
                   "since 2026-12-06T07:00:00): python -m koen_sllm.cli train --config c.yaml; "
                   "stop it (./run_h100_dual.sh --stop) or use another --output-dir")
    assert info.value.holder == OWNER
    # The failed attempt left the holder's description alone.
    assert lock_holder(tmp_path / "out") == OWNER


def test_what_and_option_come_from_the_constructor(tmp_path, held):
    with pytest.raises(FolderBusy) as info:
        FolderLock(tmp_path / "out", what="logs folder", option="--logs-dir").acquire({})
    msg = str(info.value)
    assert f"the logs folder {tmp_path / 'out'} is in use" in msg
    assert msg.endswith("or use another --logs-dir")


def test_message_stays_one_line_and_short(tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire({"pid": 9, "run_id": "a\nb", "command": ["python", "-c", "x\n" * 200]})
    try:
        with pytest.raises(FolderBusy) as info:
            FolderLock(tmp_path).acquire({})
        msg = str(info.value)
        assert "\n" not in msg and "run a b" in msg
        command = msg.split("): ", 1)[1].split("; stop it", 1)[0]
        assert command.startswith("python -c 'x x x") and command.endswith("...")
        assert len(command) <= 120
    finally:
        lock.release()


def test_busy_with_unreadable_holder_info(tmp_path, held):
    (tmp_path / "out" / LOCK_NAME).write_text("garbage {")  # same inode: the lock stays
    assert lock_holder(tmp_path / "out") == {}
    with pytest.raises(FolderBusy) as info:
        FolderLock(tmp_path / "out").acquire({})
    assert info.value.holder == {}
    assert "details cannot be read" in str(info.value)


def test_release_frees_the_folder_and_clears_the_owner(tmp_path, held):
    held.release()
    assert not held.held
    held.release()  # idempotent
    path = tmp_path / "out" / LOCK_NAME
    assert path.exists() and path.read_text() == ""
    assert lock_holder(tmp_path / "out") is None
    again = FolderLock(tmp_path / "out")
    again.acquire({"run_id": "next"})
    try:
        assert lock_holder(tmp_path / "out")["run_id"] == "next"
    finally:
        again.release()


def test_context_manager_releases_on_error(tmp_path):
    with pytest.raises(ValueError):
        with FolderLock(tmp_path) as lock:
            assert lock_holder(tmp_path) is not None
            raise ValueError("boom")
    assert not lock.held and lock_holder(tmp_path) is None


def test_acquire_twice_on_one_object_is_an_error(held):
    with pytest.raises(RuntimeError, match="already locked"):
        held.acquire({})
    assert held.held


def test_lock_holder_creates_nothing(tmp_path):
    folder = tmp_path / "never"
    assert lock_holder(folder) is None
    assert not folder.exists()
    folder.mkdir()
    assert lock_holder(folder) is None
    assert list(folder.iterdir()) == []
    (tmp_path / "file").write_text("")
    assert lock_holder(tmp_path / "file") is None


def test_lock_holder_does_not_take_the_lock(tmp_path, held):
    assert lock_holder(tmp_path / "out") == OWNER
    assert lock_holder(tmp_path / "out") == OWNER
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path / "out").acquire({})
    assert held.held


def test_unheld_lock_file_with_old_owner_reads_free(tmp_path):
    """A lock file left by a dead run (whatever it says) does not make the folder busy."""
    (tmp_path / LOCK_NAME).write_text(json.dumps(OWNER))
    assert lock_holder(tmp_path) is None
    with FolderLock(tmp_path) as lock:
        assert lock.held


HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from koen_sllm.run_lock import FolderLock
    lock = FolderLock(Path(sys.argv[1]))
    lock.acquire({"run_id": "child-run", "mode": "test", "command": "child holder"})
    print("locked", flush=True)
    time.sleep(60)
""")


def test_other_process_holds_until_killed(tmp_path):
    folder = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert lock_holder(folder)["pid"] == child.pid
        lock = FolderLock(folder)
        with pytest.raises(FolderBusy) as info:
            lock.acquire({"run_id": "parent"})
        assert f"PID {child.pid} on host {socket.gethostname()} (run child-run, mode test)" in str(info.value)
        assert not lock.held

        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # The kernel dropped the lock with the dead process; its description is still in the file.
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == child.pid
        assert lock_holder(folder) is None
        lock.acquire({"run_id": "parent"})
        assert lock_holder(folder)["run_id"] == "parent"
        lock.release()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()


def test_modules_import_without_torch():
    """The launcher imports these with a bare python3: no torch, nothing outside the standard library."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        before = set(sys.modules)
        import koen_sllm.run_lock, koen_sllm.launcher.pidfile
        added = {m.split(".")[0] for m in set(sys.modules) - before}
        print(sorted(added - set(sys.stdlib_module_names) - {"koen_sllm"}))
    """)
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
