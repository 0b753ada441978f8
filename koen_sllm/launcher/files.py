"""The files a run keeps in its logs folder, and small helpers the launcher's steps share.

  training.pid           the run's identity (pidfile.py); removed when the run ends
  training.stopping      the time --stop asked the run to stop
  training_console.log   rank 0's console, with the launcher's own timestamped lines
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import pidfile


@dataclass(frozen=True)
class JobFiles:
    logs_dir: Path

    @property
    def pid(self) -> Path:
        return self.logs_dir / "training.pid"

    @property
    def console(self) -> Path:
        return self.logs_dir / "training_console.log"

    @property
    def stopping(self) -> Path:
        return self.logs_dir / "training.stopping"

    def detail_log(self, rank: int = 0) -> Path:
        return self.logs_dir / f"training_detail_rank_{rank}.log"

    def remove_run_files(self, proc: pidfile.RunProcess) -> None:
        """The PID and stopping files, only while they still describe this run (a new run may own them)."""
        state = pidfile.read_pid_file(self.pid)
        if state.proc is not None and state.proc.pid == proc.pid and state.proc.start_time == proc.start_time:
            self.pid.unlink(missing_ok=True)
            self.stopping.unlink(missing_ok=True)


def log_line(path: Path, message: str) -> None:
    """'[time] [launcher] message' in a log, so the launcher's lines sort with the trainer's."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] [launcher] {message}\n")
    except OSError:
        pass


def shquote(word: str) -> str:
    return shlex.quote(word)


def shjoin(words: Iterable[str]) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def rotate_logs(logs_dir: Path) -> int:
    """An earlier run's console and per-rank logs to .1 (up to .5); returns how many were kept."""
    from ..logs import rotate

    count = 0
    for path in [logs_dir / "training_console.log", *sorted(logs_dir.glob("training_rank_*.log")),
                 *sorted(logs_dir.glob("training_detail_rank_*.log"))]:
        if path.exists() and path.stat().st_size > 0:
            rotate(path)
            count += 1
    return count
