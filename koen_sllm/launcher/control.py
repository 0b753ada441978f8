"""--status and --stop: act on a run only when its PID file proves the process is that run.

A PID file holds the PID, the process's start time, the boot id, the command
line and the run id (pidfile.py). A file that does not match a live process in
every one of these is stale: it is reported and removed, and nothing is
signalled. --stop sends SIGTERM to the run's workers (children of torchrun
carrying the run id), which save a checkpoint at the next step boundary and
exit; torchrun then exits with them.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Optional

from . import pidfile
from .files import JobFiles, log_line, shquote

# The trainer's progress line (metrics.format_progress), read by --status and by the start's wait.
PROGRESS_LINE = re.compile(r"step [0-9]+/[0-9]+ \| loss ")


def elapsed(proc: pidfile.RunProcess) -> str:
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        seconds = int(uptime - proc.start_time / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return "?"
    h, rest = divmod(max(0, seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def last_progress(console: Path) -> Optional[str]:
    """The newest progress line, searched in the log's last 2 MB so --status stays fast on long runs."""
    tail = _tail(console, 2_000_000)
    lines = [line for line in tail.splitlines() if PROGRESS_LINE.search(line)]
    return lines[-1] if lines else None


def _tail(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def progress_summary(line: str) -> str:
    """"step 10/100 | loss 5.1 | ... tok/s 12,345 | ... | eta 0:12:34" -> a short summary."""
    parts = []
    for pattern, fmt in ((r"step ([0-9]+)/([0-9]+)", "step {}/{}"), (r"\| loss ([^ |]+)", "loss {}"),
                         (r"\| tok/s ([0-9][0-9,.]*|n/a) ", "tok/s {}"), (r"\| eta ([^ |]+)", "ETA {}")):
        m = re.search(pattern, line)
        if m:
            parts.append(fmt.format(*m.groups()))
    out = " | ".join(parts)
    m = re.match(r"^\[([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8})\]", line)
    return out + (f"  ({m.group(1)})" if m else "")


def remove_stale(files: JobFiles) -> None:
    _clean(files)


def _clean(files: JobFiles) -> Optional[pidfile.RunProcess]:
    """The live run of this logs folder, or None after removing a stale PID file with a note."""
    state = pidfile.read_pid_file(files.pid)
    if state.state == "live":
        return state.proc
    if state.state == "stale":
        reason = pidfile.remove_if_stale(files.pid)
        if reason:
            print(f"🧹 오래된 PID 파일 정리 / removed a stale PID file: {files.pid} ({reason}); nothing was signalled")
        files.stopping.unlink(missing_ok=True)
    return None


def live_run(files: JobFiles) -> Optional[pidfile.RunProcess]:
    """The live run recorded in this logs folder, without touching a stale file."""
    state = pidfile.read_pid_file(files.pid)
    return state.proc if state.state == "live" else None


def status(all_files: list[JobFiles]) -> int:
    """0 when a run is going (in any of the folders), 3 when none is."""
    running = False
    for files in all_files:
        proc = _clean(files)
        if proc is None:
            continue
        running = True
        workers = " ".join(map(str, pidfile.worker_pids(proc))) or "-"
        print(f"🟢 학습 실행 중 / training is running: PID {proc.pid} ({proc.mode or 'run'} {proc.run_id}), "
              f"elapsed {elapsed(proc)}, workers: {workers}")
        if files.stopping.exists():
            print(f"⏹  중단 요청됨 / stop requested at {files.stopping.read_text().strip()}: saving a checkpoint")
        line = last_progress(files.console)
        print(f"📈 {progress_summary(line)}" if line else "📈 아직 진행 기록 없음 / no progress line yet (starting up)")
        print(f"📋 실시간 로그 / live log: tail -f {shquote(str(files.console))}")
    if running:
        return 0
    newest = max(all_files, key=lambda f: f.console.stat().st_mtime if f.console.exists() else -1)
    print(f"⚪ 실행 중인 학습이 없습니다 / no training is running (logs: {newest.logs_dir})")
    line = last_progress(newest.console)
    if line:
        print(f"📈 마지막 진행 / last progress: {progress_summary(line)}")
    end = [ln for ln in _tail(newest.console, 200_000).splitlines()
           if re.search(r"Training (complete|stopped)|❌", ln)]
    if end:
        print(f"🏁 {end[-1]}")
    return 3


def signal_workers(proc: pidfile.RunProcess, sig: int = signal.SIGTERM) -> list[int]:
    """SIGTERM to the run's workers (they save first); torchrun itself only when no worker is found
    (it then passes the signal on, killing the workers 30 s later)."""
    targets = pidfile.worker_pids(proc) or [proc.pid]
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return targets


def stop(all_files: list[JobFiles], launcher: str) -> int:
    live = [(f, p) for f in all_files if (p := _clean(f)) is not None]
    if not live:
        print("⚪ 실행 중인 학습이 없습니다 / no training is running (nothing to stop)")
        return 0
    try:
        timeout = int(os.environ.get("KOEN_STOP_TIMEOUT", "600"))
        if timeout <= 0:
            raise ValueError
    except ValueError:
        print(f"❌ KOEN_STOP_TIMEOUT 에는 양의 정수가 필요합니다 / KOEN_STOP_TIMEOUT needs a positive integer (seconds), "
              f"got '{os.environ.get('KOEN_STOP_TIMEOUT')}'", flush=True)
        return 2
    code = 0
    for files, proc in live:
        code = max(code, _stop_one(files, proc, timeout, launcher))
    return code


def _stop_one(files: JobFiles, proc: pidfile.RunProcess, timeout: int, launcher: str) -> int:
    if files.stopping.exists():
        # A second SIGTERM makes the trainer exit without saving: only wait again.
        print(f"⏹  이미 중단 요청됨 / a stop was already requested at {files.stopping.read_text().strip()}; "
              f"waiting (force: kill {proc.pid})")
    else:
        targets = signal_workers(proc)
        what = " ".join(map(str, targets))
        print(f"⏹  학습 중단 요청 / asking the run to stop: SIGTERM to workers {what} (torchrun PID {proc.pid}); "
              "they save a checkpoint first")
        log_line(files.console, f"--stop: SIGTERM to workers {what} (torchrun PID {proc.pid})")
        files.stopping.write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
    print(f"⏳ 종료 대기 중 / waiting for the run to end (up to {timeout} s)", end="", flush=True)
    t0 = time.monotonic()
    while pidfile.is_alive(proc.pid) and pidfile.proc_start_time(proc.pid) == proc.start_time:
        if time.monotonic() - t0 >= timeout:
            print(f"\n⚠️  {timeout}초 안에 끝나지 않았습니다 / still running after {timeout} s (a checkpoint save may "
                  "be slow).")
            print(f"   기다리기 / keep waiting: {launcher} --stop   (tail -f {shquote(str(files.console))})")
            print(f"   강제 종료 / force (no new checkpoint; the last saved one stays): kill {proc.pid}")
            return 1
        time.sleep(0.5)
        if int(time.monotonic() - t0) % 5 == 0:
            print(".", end="", flush=True)
    print(f"\n✅ 학습이 종료되었습니다 / the run has ended (after {int(time.monotonic() - t0)} s)")
    log_line(files.console, "--stop: the run ended")
    files.remove_run_files(proc)
    show_last_lines(files.console, 15)
    return 0


def show_last_lines(console: Path, n: int = 12) -> None:
    if not console.exists():
        return
    lines = _tail(console, 200_000).splitlines()[-n:]
    print(f"📋 마지막 로그 / last lines of {console}:\n----------------------------------------")
    print("\n".join(lines))
    print("----------------------------------------")
