"""Process groups, rank helpers and model wrapping: the only place that knows about DDP.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run is a world of
one and never creates a process group, so every helper here also works alone.
Every collective must be called by all ranks: helpers that gather or broadcast
take the value on every rank and return the result on every rank.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from .errors import KoenError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: Optional[str]  # None when no process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


class DistError(KoenError, RuntimeError):
    pass


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistError(
                f"local rank {local_rank} has no GPU: only {count} visible; "
                f"start fewer processes per node (--num-gpus {count})"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world > 1:
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
            if backend == "nccl":
                kwargs["device_id"] = device  # binds the communicator eagerly; avoids a guessed device
            dist.init_process_group(**kwargs)
        return DistInfo(rank, local_rank, world, device, backend)
    return DistInfo(0, 0, 1, device, None)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # Free what still holds the group (a finished trainer's DDP wrapper, in a reference
        # cycle) while the interpreter is whole: left to interpreter shutdown, a gloo group's
        # threads can be torn down out of order and the process aborts after a finished run
        # ("terminate called without an active exception"), which torchrun reports as a failure.
        gc.collect()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (small Python values only)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(model: torch.nn.Module, info: DistInfo, bucket_mb: float = 25.0) -> torch.nn.Module:
    """DDP around the model (compiled afterwards, by the trainer); the model itself stays unaware.

    gradient_as_bucket_view saves one gradient-sized copy of the parameters. ``bucket_mb``:
    smaller buckets start their all-reduce earlier, larger ones make fewer, more efficient calls.
    """
    if not info.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Synchronize gradients only when `enabled` (the last micro-batch of a step)."""
    if enabled or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
