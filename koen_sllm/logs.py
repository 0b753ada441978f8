"""Per-rank log files, the rank-0 console, and a terminal progress bar.

Files (in the logs directory):
  training_rank_{r}.log         INFO and above, every rank
  training_detail_rank_{r}.log  DEBUG and above, every rank
  training_console.log          rank 0's console; written by the launcher's
                                redirection in background runs, or here when
                                KOEN_CONSOLE_LOG names it (foreground runs)
An earlier run's rank files are rotated to .1 .. .5, never overwritten.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

LOGGER_NAME = "koen_sllm"
KEEP_ROTATIONS = 5


def rotate(path: Path, keep: int = KEEP_ROTATIONS) -> None:
    """Shift path -> path.1 -> ... -> path.keep (oldest dropped) when path is non-empty."""
    if not path.exists() or path.stat().st_size == 0:
        return
    oldest = path.with_name(f"{path.name}.{keep}")
    if oldest.exists():
        oldest.unlink()
    for i in range(keep - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            src.rename(path.with_name(f"{path.name}.{i + 1}"))
    path.rename(path.with_name(f"{path.name}.1"))


class _TqdmAwareHandler(logging.StreamHandler):
    """Writes through tqdm when a progress bar is on screen, so lines do not tear it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            if getattr(tqdm, "_instances", None):
                tqdm.write(self.format(record), file=self.stream)
                return
        except Exception:
            pass
        super().emit(record)


def setup_logging(logs_dir: Path, rank: int, verbose: bool = False, rotate_files: bool = True) -> logging.Logger:
    logs_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    file_fmt = logging.Formatter(f"[%(asctime)s][rank{rank}][%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    for name, level in ((f"training_rank_{rank}.log", logging.INFO), (f"training_detail_rank_{rank}.log", logging.DEBUG)):
        path = logs_dir / name
        if rotate_files:
            rotate(path)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(file_fmt)
        logger.addHandler(handler)

    console_fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmAwareHandler(sys.stdout)
    # Other ranks speak on the shared console only when something is wrong.
    console.setLevel((logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"[rank{rank}] %(levelname)s %(message)s") if rank else console_fmt)
    logger.addHandler(console)

    console_file = os.environ.get("KOEN_CONSOLE_LOG")
    if rank == 0 and console_file:
        handler = logging.FileHandler(console_file, encoding="utf-8")
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handler.setFormatter(console_fmt)
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on rank 0 when stdout is a terminal; None otherwise (log lines suffice)."""
    if not enabled or not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)


def close_handlers(logger: Optional[logging.Logger] = None) -> None:
    logger = logger or get_logger()
    for h in list(logger.handlers):
        h.flush()
        h.close()
        logger.removeHandler(h)
