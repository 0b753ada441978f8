"""The GPU half of DeepSpeed's partial optimizer offload, kept in our checkpoints.

With ``offload_optimizer.ratio`` below 1, DeepSpeed's ZeRO-3 optimizer keeps some of its
sub-groups (fp32 master weights, AdamW moments) on the GPU and steps them with a second, plain
torch AdamW (``backup_optimizer``); the CPU AdamW steps the others. Its checkpoints hold the CPU
AdamW's state only (deepspeed 0.19.8, ``_rigid_state_dict``), so a resume would restart the GPU
half's moments and step count at zero: a different update for those parameters, and the loss
jumps. This module writes that half's state beside the engine's files, one safetensors file per
rank, and puts it back after the engine has loaded its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import KoenError

STATE_FILE = "gpu_optimizer_rank{rank}.safetensors"
KEYS = ("exp_avg", "exp_avg_sq", "step")


class PartialOffloadError(KoenError, RuntimeError):
    """A checkpoint that lacks the GPU half of a partially offloaded optimizer."""


def gpu_subgroups(optimizer: Any) -> list[int]:
    """The sub-groups DeepSpeed steps with its GPU AdamW ([] without a partial offload)."""
    if getattr(optimizer, "backup_optimizer", None) is None:
        return []
    devices = getattr(optimizer, "subgroup_to_device", None) or {}
    return sorted(i for i, device in devices.items() if device != "cpu")


def save_gpu_state(optimizer: Any, folder: Path, rank: int) -> None:
    """Write the GPU AdamW's moments and step counts of this rank's sub-groups into ``folder``."""
    from safetensors.torch import save_file

    ids = gpu_subgroups(optimizer)
    if not ids:
        return
    state = optimizer.backup_optimizer.state
    tensors = {}
    for i in ids:
        entry = state.get(optimizer.fp32_partitioned_groups_flat[i])
        for key in KEYS if entry else ():  # no entry before the first step
            value = entry[key]
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"{i}.{key}"] = value.detach().to("cpu").contiguous()
    save_file(tensors, str(Path(folder) / STATE_FILE.format(rank=rank)), metadata={"subgroups": json.dumps(ids)})


def load_gpu_state(optimizer: Any, folder: Path, rank: int) -> None:
    """Put back what :func:`save_gpu_state` wrote, after the engine loaded ``folder``."""
    from safetensors.torch import load_file

    ids = gpu_subgroups(optimizer)
    if not ids:
        return
    path = Path(folder) / STATE_FILE.format(rank=rank)
    if not path.is_file():
        raise PartialOffloadError(
            f"{folder} holds no state for the optimizer sub-groups this run keeps on the GPU "
            f"(offload_optimizer.ratio; {path.name} is missing): it was saved with another DeepSpeed file; resume "
            "with the file it was saved with, or start afresh with --resume none")
    tensors = load_file(str(path))
    saved = {int(name.split(".", 1)[0]) for name in tensors}
    if not saved <= set(ids):
        raise PartialOffloadError(f"{path} holds sub-groups {sorted(saved - set(ids))} that this run keeps in host "
                                  "memory: resume with the DeepSpeed file the checkpoint was saved with")
    state = optimizer.backup_optimizer.state
    for i in sorted(saved):
        master = optimizer.fp32_partitioned_groups_flat[i]
        # torch's AdamW keeps ``step`` on the CPU in fp32, the moments beside the master weights
        state[master] = {key: tensors[f"{i}.{key}"].to(torch.float32 if key == "step" else master.device)
                         for key in KEYS}
