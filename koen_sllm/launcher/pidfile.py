"""A PID file that proves which process it names, read from Linux /proc.

A bare PID is not an identity: after a crash or a reboot the number is handed
to some other process, and `--status`/`--stop` would then report on it or
signal it. So the file records, next to the PID, what can only be true of the
process that wrote it: its start time (clock ticks since boot, from
/proc/<pid>/stat), the boot it started in (the kernel's random boot id) and its
command line. A file is "live" only while all of them still match; anything
else is "stale", with one short reason for the user.

Standard library only: the launcher imports this with a bare python3 (no torch).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROC = Path("/proc")
FORMAT = "koen-sllm-pid/1"  # marks our JSON, so a hand-written or old bare-number file is never trusted
RUN_ID_ENV = "KOEN_RUN_ID"  # set by the launcher in every worker's environment

GARBAGE = "not a koen-sllm PID file (old format or garbage)"
NOT_A_RUN = "PID {pid} is never a training run"
NOT_RUNNING = "PID {pid} is not running"
REUSED = "PID {pid} now belongs to another process (started at a different time)"
REBOOTED = "written before a reboot"
CMDLINE = "the command line differs (PID {pid} now runs another command)"
UNREADABLE = "the PID file cannot be read ({error})"

# stat fields after the last ')': index 0 is field 3 (state), so field N is at N - 3.
_STAT_PPID = 4 - 3
_STAT_STARTTIME = 22 - 3
_EXEC_POLLS, _EXEC_POLL_S = 100, 0.005


@dataclass
class RunProcess:
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: clock ticks after boot when it started
    boot_id: str  # /proc/sys/kernel/random/boot_id ("" when unreadable)
    cmdline: list[str]
    run_id: str
    mode: str = ""  # "test" / "train"
    logs_dir: str = ""
    output_dir: str = ""
    started_at: str = ""  # ISO time, for humans only: never compared


@dataclass
class PidFileState:
    state: str  # "missing" | "live" | "stale"
    proc: Optional[RunProcess] = None  # the parsed record, whenever it parsed
    reason: str = ""  # why it is stale, one short English phrase


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields 3.. of /proc/<pid>/stat, or None when the process is gone.

    Field 2 (comm) is the executable's name in parentheses and may itself hold
    spaces and parentheses ("my (odd) sleep"), so split after the LAST ')'.
    """
    if pid <= 0:
        return None
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    _, sep, rest = raw.rpartition(b")")
    if not sep:
        return None
    return rest.decode("ascii", "replace").split()


def proc_start_time(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot, or None when it is gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[_STAT_STARTTIME]) if fields else None
    except (IndexError, ValueError):
        return None


def _proc_ppid(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    try:
        return int(fields[_STAT_PPID]) if fields else None
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> Optional[list[str]]:
    """argv of `pid` (NUL-separated in /proc), or None when it cannot be read.

    Kernel threads and zombies have an empty command line: that gives [].
    """
    if pid <= 0:
        return None
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    # fsdecode keeps undecodable bytes (surrogateescape), so the round trip through JSON is exact.
    return [os.fsdecode(part) for part in raw.split(b"\0")] if raw else []


def boot_id() -> str:
    """The kernel's id of this boot; a PID file written under another id predates a reboot."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def is_alive(pid: int) -> bool:
    """The process exists and has not exited; a zombie (exited, not yet reaped) is not alive.

    PID 0 and 1 are never runs of ours (0 is the kernel, 1 is init), whatever exists there.
    """
    if pid <= 1:
        return False
    try:
        status = (PROC / str(pid) / "status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            state = line.split(":", 1)[1].strip()[:1]
            return state not in ("Z", "X")  # X: dead, being torn down
    return False


def describe_process(pid: int) -> Optional[dict]:
    """Identity facts of a live `pid` as RunProcess keyword arguments (no run_id), or None.

    The start time is read on both sides of the command line, so a PID that
    died and was reused in between is not described with a stranger's argv.
    """
    if not is_alive(pid):
        return None
    start = proc_start_time(pid)
    cmdline = proc_cmdline(pid)
    # Between fork and the end of exec a process briefly shows an empty command
    # line (the new image's arguments are not mapped yet); a record taken then
    # would never match again. A user process never keeps an empty one.
    for _ in range(_EXEC_POLLS):
        if cmdline != [] or not is_alive(pid):
            break
        time.sleep(_EXEC_POLL_S)
        cmdline = proc_cmdline(pid)
    if start is None or cmdline is None or proc_start_time(pid) != start:
        return None
    return {"pid": pid, "start_time": start, "boot_id": boot_id(), "cmdline": cmdline}


def record_for(pid: int, run_id: str, **info) -> RunProcess:
    """A RunProcess for `pid` as it is now; `info` sets mode, logs_dir, output_dir, started_at.

    Raises ProcessLookupError when `pid` is not a live process (or is 0/1).
    """
    facts = describe_process(pid)
    if facts is None:
        raise ProcessLookupError(f"PID {pid} is not a running process")
    info.setdefault("started_at", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    return RunProcess(**facts, run_id=run_id, **info)


def write_pid_file(path: Path, proc: RunProcess) -> None:
    """Write the record as JSON, atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"format": FORMAT, **dataclasses.asdict(proc)}, indent=1) + "\n"
    # surrogateescape'd argv bytes (see proc_cmdline) must survive the write as they are.
    payload = data.encode("utf-8", "surrogateescape")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other users may run --status
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _parse(raw: bytes) -> Optional[RunProcess]:
    try:
        data = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not (is_int(data.get("pid")) and is_int(data.get("start_time"))
            and isinstance(data.get("boot_id"), str) and isinstance(data.get("run_id"), str)
            and isinstance(data.get("cmdline"), list)
            and all(isinstance(arg, str) for arg in data["cmdline"])):
        return None
    # Unknown keys are ignored so that a later version may add some.
    known = {f.name for f in dataclasses.fields(RunProcess)}
    kwargs = {key: value for key, value in data.items() if key in known}
    if not all(isinstance(kwargs.get(key, ""), str) for key in ("mode", "logs_dir", "output_dir", "started_at")):
        return None
    return RunProcess(**kwargs)


def _judge(proc: RunProcess) -> str:
    """'' when `proc` is that very process and still running, else why not."""
    pid = proc.pid
    if pid <= 1:
        return NOT_A_RUN.format(pid=pid)
    now_boot = boot_id()
    if proc.boot_id and now_boot and proc.boot_id != now_boot:
        return REBOOTED
    if not is_alive(pid):
        return NOT_RUNNING.format(pid=pid)
    if proc_start_time(pid) != proc.start_time:
        return REUSED.format(pid=pid)
    cmdline = proc_cmdline(pid)
    if cmdline is None or not is_alive(pid):  # it exited while we looked
        return NOT_RUNNING.format(pid=pid)
    if cmdline != proc.cmdline:
        return CMDLINE.format(pid=pid)
    if proc_start_time(pid) != proc.start_time:  # died and reused while we read the command line
        return REUSED.format(pid=pid)
    return ""


def _read(path: Path) -> tuple[PidFileState, Optional[os.stat_result]]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(1 << 20)
    except FileNotFoundError:
        return PidFileState("missing"), None
    except OSError as exc:
        return PidFileState("stale", None, UNREADABLE.format(error=exc.strerror or exc)), None
    proc = _parse(raw)
    if proc is None:
        return PidFileState("stale", None, GARBAGE), st
    reason = _judge(proc)
    return PidFileState("stale" if reason else "live", proc, reason), st


def read_pid_file(path: Path) -> PidFileState:
    """'missing', 'live' (that very process still runs) or 'stale' with the reason."""
    return _read(Path(path))[0]


def remove_if_stale(path: Path) -> Optional[str]:
    """Remove the PID file if it is stale and return why; None (file kept) when missing or live.

    The file is removed only if it is still the one that was judged (same
    inode, size and mtime), so a launcher that just wrote a fresh record in its
    place does not lose it.
    """
    path = Path(path)
    state, judged = _read(path)
    if state.state != "stale":
        return None
    try:
        if judged is not None:
            now = os.stat(path)
            if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
                    judged.st_dev, judged.st_ino, judged.st_size, judged.st_mtime_ns):
                return None
        path.unlink()
    except FileNotFoundError:
        pass  # someone else removed it first: the outcome is the same
    return state.reason


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (their stat's ppid field), sorted."""
    children = []
    try:
        entries = os.listdir(PROC)
    except OSError:
        return []
    for name in entries:
        if name.isdigit() and _proc_ppid(int(name)) == pid:
            children.append(int(name))
    return sorted(children)


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # not ours to read (permission) or gone: not provably of this run
        return False
    return entry in raw.split(b"\0")


def worker_pids(proc: RunProcess) -> list[int]:
    """Children of `proc.pid` started for this run: their environment carries KOEN_RUN_ID=<run_id>.

    /proc/<pid>/environ is the environment the child was started with, which
    the launcher sets; a child whose environment cannot be read is left out,
    since it cannot be shown to belong to the run.
    """
    if proc.pid <= 1 or not proc.run_id:
        return []
    entry = os.fsencode(f"{RUN_ID_ENV}={proc.run_id}")
    return [child for child in child_pids(proc.pid) if _environ_has(child, entry)]
