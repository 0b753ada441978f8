"""A worker ends with its torchrun: the kernel signals it when the launching process dies.

torchrun starts each worker in a session of its own, so killing the run's
process group, or torchrun alone (``kill -9``, the OOM killer), would leave the
workers training and saving with nobody to stop them. PR_SET_PDEATHSIG makes
the kernel send SIGTERM to the worker when torchrun dies; the trainer treats it
like ``--stop`` (save at the next step boundary, then exit), on every rank at
once since every worker gets it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for ``sig`` when the parent process dies; True when armed (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request was armed
        os.kill(os.getpid(), sig)
    return True
