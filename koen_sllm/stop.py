"""Stopping on SIGTERM/SIGINT at a step boundary, the same way on every rank."""
from __future__ import annotations

import signal
import time


class StopRequest:
    """SIGTERM/SIGINT: the first asks for a save at the next step boundary, a second exits now.

    The handler only sets flags (no I/O: it may interrupt a write in progress);
    the loop reports the request. torchrun forwards the terminal's Ctrl-C to
    workers that already got it, so a repeat within a second is the same request.
    """

    def __init__(self) -> None:
        self.requested = False  # this process got a signal (set by the handler)
        self.agreed = False  # the ranks voted to stop (set only from the all-reduce, so all agree)
        self.reported = False
        self.first_at = 0.0
        self.signame = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if self.requested and now - self.first_at > 1.0:
            raise SystemExit(128 + signum)
        if not self.requested:
            self.requested, self.first_at = True, now
            self.signame = signal.Signals(signum).name

    def report(self, log, is_main: bool) -> None:
        if self.agreed and not self.reported:
            self.reported = True
            (log.warning if is_main else log.info)("%s received: saving a checkpoint at this step boundary, then stopping (send it again to "
                        "exit at once) / 체크포인트 저장 후 종료합니다", self.signame or "a stop request on another rank")
