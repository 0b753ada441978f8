"""Starting a run: in the background (until its first step, or its failure) or in the foreground.

The run (torchrun and its workers) gets a session of its own: the terminal's
Ctrl-C then reaches only the launcher, which asks the workers to save and stop.
In the background the launcher waits until the first progress line, so a run
that dies while preparing (a missing package, a refused resume, a full disk) is
reported with the trainer's one-line reason and a non-zero exit, not "started".
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import pidfile
from .control import PROGRESS_LINE, signal_workers
from .files import JobFiles, log_line, shquote

_DONE = re.compile(r"Training (complete|stopped)")
_LAUNCHER_LINE = re.compile(r"^\[[^]]*\] \[launcher\]")
DEFAULT_START_TIMEOUT = 900  # preparing a large corpus the first time can take this long
SHOWN_LINES = 40


@dataclass
class Launch:
    command: list[str]
    env: dict[str, str]
    files: JobFiles
    run_id: str
    mode: str
    output_dir: Path
    launcher: str  # how to call the launcher again, for the advice printed


def _spawn(launch: Launch, stdout, foreground: bool) -> tuple[subprocess.Popen, pidfile.RunProcess]:
    env = dict(launch.env, KOEN_RUN_ID=launch.run_id, KOEN_PID_FILE=str(launch.files.pid),
               KOEN_DETAIL_LOG=str(launch.files.detail_log(0)))
    if foreground:
        env["KOEN_CONSOLE_LOG"] = str(launch.files.console)
    # Like nohup: a hang-up of the terminal that started it never reaches the run.
    proc = subprocess.Popen(launch.command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    # Popen returns once the program is exec'ed, so /proc already shows its own command line.
    record = pidfile.record_for(proc.pid, launch.run_id, mode=launch.mode, logs_dir=str(launch.files.logs_dir),
                                output_dir=str(launch.output_dir))
    pidfile.write_pid_file(launch.files.pid, record)
    return proc, record


# ---------------------------------------------------------------- background


def background(launch: Launch) -> int:
    files = launch.files
    print("🔄 백그라운드 모드로 실행됩니다 / running in the background")
    print(f"📋 로그 파일 / console log: {files.console}")
    print(f"📋 실시간 로그 확인 / follow it: tail -f {shquote(str(files.console))}\n")
    offset = files.console.stat().st_size if files.console.exists() else 0
    with open(files.console, "ab") as console:
        proc, record = _spawn(launch, console, foreground=False)
    log_line(files.console, f"started in the background, PID {proc.pid} (run {launch.run_id})")
    print("✅ 백그라운드 학습 시작됨! / started in the background")
    print(f"🔢 프로세스 ID / PID: {proc.pid}")
    print(f"📄 PID 파일 / PID file: {files.pid}\n")
    print("🔍 학습 상태 확인 명령어 / commands to watch it:")
    for cmd, what in ((f"tail -f {shquote(str(files.console))}", "실시간 로그 / live log"),
                      (f"ps -p {proc.pid}", "프로세스 상태 / process status"),
                      (f"{launch.launcher} --status", "진행 상황 / step, loss, tok/s, ETA"),
                      (f"{launch.launcher} --stop", "체크포인트 저장 후 중단 / save a checkpoint, then stop"),
                      (f"kill {proc.pid}", "학습 중단 / stop (torchrun allows the workers 30 s)")):
        print(f"  {cmd:<44} # {what}")
    return _wait_for_first_step(launch, proc, record, offset)


def _start_timeout() -> int:
    try:
        value = int(os.environ.get("KOEN_START_TIMEOUT", DEFAULT_START_TIMEOUT))
        return value if value >= 0 else DEFAULT_START_TIMEOUT
    except ValueError:
        return DEFAULT_START_TIMEOUT


def _wait_for_first_step(launch: Launch, proc: subprocess.Popen, record: pidfile.RunProcess, offset: int) -> int:
    files, limit = launch.files, _start_timeout()
    print(f"\n📋 첫 스텝까지의 로그 / the log until the first step (up to {limit} s):")
    print("----------------------------------------")
    t0, shown, last_beat, partial, seen = time.monotonic(), 0, time.monotonic(), b"", []
    reached = False
    while True:
        chunk, offset = _read_from(files.console, offset)
        lines, partial = _split(partial + chunk)
        for line in lines:
            if _LAUNCHER_LINE.match(line):
                continue
            seen.append(line)
            if shown < SHOWN_LINES:
                print(line, flush=True)
                shown += 1
            if PROGRESS_LINE.search(line) or _DONE.search(line):
                reached = True
        if reached:
            break
        code = proc.poll()
        if code is not None:
            chunk, offset = _read_from(files.console, offset)  # what it wrote while exiting
            more, _ = _split(partial + chunk + b"\n")
            seen += [ln for ln in more if not _LAUNCHER_LINE.match(ln)]
            print("\n".join(more[: max(0, SHOWN_LINES - shown)]))
            print("----------------------------------------")
            return _ended_early(launch, record, code, seen)
        if time.monotonic() - t0 > limit:
            print("----------------------------------------")
            print(f"⏳ {limit}초 안에 첫 스텝이 없습니다 / no step yet after {limit} s (still preparing?); the run "
                  f"goes on in the background: tail -f {shquote(str(files.console))}, {launch.launcher} --status")
            return 0
        if time.monotonic() - last_beat >= 15:
            last_beat = time.monotonic()
            print(f"⏳ 첫 스텝 대기 중 / waiting for the first step: {int(time.monotonic() - t0)} s", flush=True)
        time.sleep(0.2)
    print("----------------------------------------")
    if proc.poll() is None:
        print("백그라운드에서 계속 실행 중... / still running in the background")
        return 0
    return _ended_early(launch, record, proc.wait(), seen)


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return b"", offset
    return data, offset + len(data)


def _split(data: bytes) -> tuple[list[str], bytes]:
    *lines, rest = data.split(b"\n")
    return [ln.decode("utf-8", "replace").rstrip("\r") for ln in lines], rest


def _ended_early(launch: Launch, record: pidfile.RunProcess, code: int, seen: list[str]) -> int:
    files = launch.files
    files.remove_run_files(record)
    log_line(files.console, f"the run exited with code {code}")
    if code == 0:
        print("✅ 이미 끝났습니다 / the run already finished (exit 0)")
        return 0
    reason = _reason(seen)
    print(f"❌ 학습이 시작 직후 실패했습니다 / the run failed before its first step (exit {code}): "
          f"{reason or 'see the log'} (log: {files.console}; details: {files.detail_log(0)})",
          file=sys.stderr, flush=True)
    return code if code in (1, 2) else 1


_RANK0 = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:]{8}\] ❌")
_PREFIX = re.compile(r"^\[[^]]*\]\s*(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+)?")


def _reason(seen: list[str]) -> Optional[str]:
    """The trainer's one-line reason: rank 0's line first (the other ranks' lines carry a
    "[rankN] ERROR" prefix and may come last), torchrun's own summary only when nothing else spoke."""
    errors = [ln for ln in seen if "❌" in ln]
    for pick in (lambda ln: _RANK0.match(ln) and "worker rank" not in ln, lambda ln: "worker rank" not in ln,
                 lambda ln: True):
        found = [ln for ln in errors if pick(ln)]
        if found:
            return _PREFIX.sub("", found[-1]).lstrip("❌ ").strip()
    return None


# ---------------------------------------------------------------- foreground


def foreground(launch: Launch) -> int:
    files = launch.files
    print("🖥  포그라운드 모드로 실행됩니다 / running in the foreground (Ctrl-C: save a checkpoint and stop; "
          "twice: stop now)")
    print(f"📋 로그 파일 / console log: {files.console}\n", flush=True)
    requests: list[int] = []
    holder: dict = {}

    def on_signal(signum, _frame):
        requests.append(signum)
        if "record" in holder:
            _forward(holder["record"], len(requests))

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    proc, record = _spawn(launch, None, foreground=True)
    holder["record"] = record
    log_line(files.console, f"started in the foreground, PID {proc.pid} (run {launch.run_id})")
    if requests:  # a signal that came before the run had a PID
        _forward(record, len(requests))
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:  # pragma: no cover - Python retries wait() itself (PEP 475)
            continue
    files.remove_run_files(record)
    log_line(files.console, f"the run exited with code {code}")
    if code == 0:
        print(f"\n✅ 학습 종료 / the run finished (exit 0). 로그 / logs: {files.logs_dir}")
    else:
        print(f"\n❌ 학습이 실패했습니다 / the run failed with exit code {code}: see {files.console} and "
              f"{files.detail_log(0)}", file=sys.stderr)
    return code


def _forward(record: pidfile.RunProcess, count: int) -> None:
    if count == 1:
        print("\n⏹  중단 요청: 체크포인트 저장 후 종료합니다 (한 번 더: 즉시 종료) / stopping after a checkpoint save "
              "(again: stop now)", file=sys.stderr, flush=True)
    else:
        print("\n⏹  즉시 종료 / stopping now", file=sys.stderr, flush=True)
    targets = signal_workers(record)
    log_line(JobFiles(Path(record.logs_dir)).console,
             f"signal: SIGTERM to workers {' '.join(map(str, targets))} (request {count})")


def run_id_now() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()
