"""One writer per folder: an exclusive flock on a file inside it, held for the whole run.

Two runs writing checkpoints (or logs) into one folder overwrite each other's
files and retention deletes the other run's checkpoints. A PID file cannot
prevent that race; a kernel lock can: flock is taken atomically, and the
kernel drops it when the holder's last descriptor closes, so a run killed with
SIGKILL, an OOM kill or a crash never leaves the folder locked. The lock file
also carries the holder's description (JSON) so the refusal can name it.

The lock file itself is never deleted: removing it while another process has
it open would let a third process lock a new file of the same name, and two
runs would then both "hold" the folder.

Standard library only: the launcher imports this with a bare python3 (no torch).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Optional
from .errors import KoenError

LOCK_NAME = ".koen-run.lock"

_COMMAND_MAX = 120
# A probe (lock_holder in another process) holds a shared lock for microseconds;
# a run holds it for hours. Retrying a moment tells the two apart, so `--status`
# polling never makes a starting run fail.
_BUSY_RETRIES = 10
_BUSY_WAIT_S = 0.02


def _one_line(value) -> str:
    return " ".join(str(value).split())


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a process whose details cannot be read"
    pid, host = holder.get("pid"), holder.get("host")
    who = f"PID {_one_line(pid)}" if pid not in (None, "") else "a process"
    if host:
        who += f" on host {_one_line(host)}"
    details = []
    for key, label in (("run_id", "run "), ("mode", "mode "), ("started_at", "since ")):
        if holder.get(key) not in (None, ""):
            details.append(label + _one_line(holder[key]))
    if details:
        who += f" ({', '.join(details)})"
    command = holder.get("command")
    if command not in (None, "", []):
        if isinstance(command, (list, tuple)):
            command = shlex.join(str(arg) for arg in command)
        command = _one_line(command)
        if len(command) > _COMMAND_MAX:
            command = command[:_COMMAND_MAX - 3] + "..."
        who += f": {command}"
    return who


class FolderBusy(KoenError, RuntimeError):
    """Another live process holds the folder. The message is one line, Korean then English."""

    def __init__(self, folder: Path, holder: Optional[dict], what: str = "output folder",
                 option: str = "--output-dir") -> None:
        self.folder = Path(folder)
        self.holder = holder
        self.what = what
        self.option = option
        super().__init__(
            f"다른 실행이 이 폴더를 사용 중입니다 / the {what} {_one_line(self.folder)} is in use by another run: "
            f"{_describe(holder)}; stop it (./run_h100_dual.sh --stop) or use another {option}")


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        data = json.loads(raw.decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class FolderLock:
    """Exclusive ownership of `folder` by this process, from acquire() until release() or exit.

    flock belongs to the open file description: two FolderLock objects on one
    folder conflict even inside one process, and a forked child (not an exec'd
    one: the descriptor is close-on-exec) keeps the lock until it exits too.
    A FolderLock dropped without release() keeps its descriptor, so the lock
    lasts until the process exits rather than vanishing mid-run.
    """

    def __init__(self, folder: Path, what: str = "output folder", option: str = "--output-dir") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.option = option
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, owner: dict) -> None:
        """Take the folder or raise FolderBusy naming the holder; `owner` is recorded for others to read.

        `pid` and `host` default to this process's.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this FolderLock")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), **owner}
        data = json.dumps(owner, ensure_ascii=False).encode("utf-8")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for attempt in range(_BUSY_RETRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if attempt == _BUSY_RETRIES - 1:
                        raise FolderBusy(self.folder, _read_holder(fd), self.what, self.option) from None
                    time.sleep(_BUSY_WAIT_S)
            os.ftruncate(fd, 0)
            view = memoryview(data)
            offset = 0
            while offset < len(view):
                offset += os.pwrite(fd, view[offset:], offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the lock too, if it was taken
            raise
        self._fd = fd

    def release(self) -> None:
        """Clear the holder description, unlock and close; safe to call again."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale description left behind for a reader to trust
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        if self._fd is None:
            self.acquire({})
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_holder(folder: Path) -> Optional[dict]:
    """Who holds `folder` now, without taking it and without creating anything.

    None when the folder or its lock file is missing or nobody holds the lock;
    else the holder's description ({} when it cannot be parsed).
    """
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
