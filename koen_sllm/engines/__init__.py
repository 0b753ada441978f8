"""The engines a training step runs on: DDP (engines/ddp.py) and DeepSpeed ZeRO (the DeepSpeed runner).

Every engine offers the same verbs, so the trainer's step is one loop for both:

    engine.begin_step()
    for each micro-batch:  loss_sum += engine.forward_backward(x, y, sync=last micro-batch)
    outcome = engine.step(loss_sum / micro-batches, stop_requested)

``step`` clips, takes the rank-agreed vote (loss, "bad step", "stop") in one
all-reduce, applies the update or skips it on every rank alike, and advances
the schedule. ``lr``, ``train()``/``eval()`` and ``eval_loss(x, y)`` complete it, and
``compile_mode`` says which torch.compile mode the step runs under (None: not compiled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepOutcome:
    loss: torch.Tensor  # the step's loss averaged over ranks (a CPU scalar)
    grad_norm: torch.Tensor  # before clipping
    applied: bool  # False: a rank saw a non-finite loss or gradient, and every rank skipped the update
    stop: bool  # a rank was asked to stop: every rank stops after this step


def start_host_copy(t: torch.Tensor) -> Callable[[], list]:
    """Start copying a small device tensor to the host; the returned function waits for that
    copy alone (not for work queued after it) and gives the values as a list."""
    if not t.is_cuda:
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]
