"""Progress for long data steps: a tqdm bar on a terminal, periodic lines otherwise.

Log files and CI output should not fill with carriage-return bar redraws, so
without a terminal a plain line is written at most every ``every_s`` seconds.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


class Progress:
    def __init__(self, desc: str, total: Optional[int], unit: str = "B", log: Callable[[str], None] = print,
                 every_s: float = 15.0, enabled: bool = True):
        self.desc, self.total, self.unit, self.log, self.every_s = desc, total, unit, log, every_s
        self.done, self.start = 0, time.monotonic()
        self._last = self.start
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False)
        self.enabled = enabled

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= self.every_s:
            self._last = now
            self.log(f"{self.desc}: {self._describe(now)}")

    def _describe(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        scale, suffix = (1e6, "M" + self.unit) if self.unit == "B" else (1.0, " " + self.unit)
        text = f"{self.done / scale:,.1f}{suffix}"
        if self.total:
            text = f"{100.0 * self.done / self.total:5.1f}% ({text} of {self.total / scale:,.1f}{suffix})"
        return f"{text}, {rate / scale:,.1f}{suffix}/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
