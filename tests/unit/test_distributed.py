"""koen_sllm.distributed.cleanup: what still holds the process group is freed before the group
is destroyed, so a finished rank does not abort on its way out (gloo, interpreter shutdown)."""
from __future__ import annotations

import gc
import weakref

from koen_sllm import distributed as D


class Holder:
    """Stands in for a finished trainer: keeps the group's user alive through a reference cycle."""

    def __init__(self) -> None:
        self.me = self


def test_cleanup_frees_unreachable_holders_before_destroying_the_group(monkeypatch):
    gc.disable()  # so that only cleanup's own collection can free the cycle
    try:
        holder = Holder()
        alive = weakref.ref(holder)
        del holder
        seen = []
        monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(D.dist, "destroy_process_group", lambda: seen.append(alive() is None))
        D.cleanup()
    finally:
        gc.enable()
    assert seen == [True], "the holder was still alive when the group was destroyed"


def test_cleanup_without_a_group_does_nothing(monkeypatch):
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: (_ for _ in ()).throw(AssertionError("called")))
    D.cleanup()
