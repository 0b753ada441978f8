"""AdamW with decoupled weight-decay groups, the warm-up + cosine schedule, RNG capture.

Weight decay applies to matrices of linear layers only: norms, biases and the
embedding table are left undecayed (decaying embeddings of rare Korean
syllables shrinks them towards zero between the few steps that see them).
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable

import numpy as np
import torch

from .config import OptimConfig
from .master_adamw import MasterWeightAdamW


def _split_by_decay(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear twice
        is_embedding = "embed" in name or "wte" in name
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append((name, p))
    return decay, no_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = _split_by_decay(model)
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]


def param_group_names(model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each of :func:`param_groups`' groups, in the optimizer's order."""
    return [[name for name, _ in group] for group in _split_by_decay(model)]


def merge_split_projections(saved: dict[str, Any], group_names: list[list[str]],
                            blocks_of: Callable[[str], int]) -> dict[str, Any]:
    """An optimizer state saved while q/k/v were separate matrices, in today's layout
    with them fused: the moments of a fused matrix are its blocks' moments stacked in row order,
    which is what AdamW's elementwise update would have made of them. ``blocks_of(name)`` is how
    many saved matrices the parameter ``name`` holds (1 for all but the fused ones). A state in
    today's layout, or one that fits neither, is returned as it is (torch's own check reports
    the latter)."""
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if saved_sizes == [len(names) for names in group_names]:
        return saved
    if saved_sizes != [sum(blocks_of(n) for n in names) for names in group_names]:
        return saved
    state, groups, index = {}, [], 0
    for group, names in zip(saved["param_groups"], group_names):
        old_ids, pos, new_ids = list(group["params"]), 0, []
        for name in names:
            k = blocks_of(name)
            parts = [saved["state"][i] for i in old_ids[pos:pos + k] if i in saved["state"]]
            pos += k
            if parts:
                if len(parts) != k:
                    raise ValueError(f"the saved optimizer state holds only {len(parts)} of {name}'s {k} blocks")
                state[index] = {key: torch.cat([p[key] for p in parts]) if key in ("exp_avg", "exp_avg_sq")
                                else parts[0][key] for key in parts[0]}
            new_ids.append(index)
            index += 1
        groups.append({**group, "params": new_ids})
    return {"state": state, "param_groups": groups}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    bf16_weights: bool = False, bf16_moments: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW (fused on a GPU), or with ``bf16_weights`` the AdamW that keeps fp32 master
    weights itself (master_adamw.py; the trainer calls its take_master_weights), its moments in
    bf16 with ``bf16_moments``."""
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if bf16_weights:
        moments = torch.bfloat16 if bf16_moments else torch.float32
        return MasterWeightAdamW(param_groups(model, cfg.weight_decay), moment_dtype=moments, **kwargs)
    if bf16_moments:
        raise ValueError("bf16 moments need the master-weight AdamW (bf16_weights=True)")
    if device.type == "cuda":
        kwargs["fused"] = True  # one kernel for all parameters instead of a loop
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


# Gradient clipping can ride inside a fused AdamW update: the kernel divides every gradient by
# its ``grad_scale`` as it reads it (the hook GradScaler unscales through), which saves the
# separate read-and-write pass over all gradients that ``clip_grad_norm_`` makes. The norm
# alone comes from ``get_total_norm`` (torch >= 2.6).
CAN_CLIP_IN_FUSED_UPDATE = hasattr(torch.nn.utils, "get_total_norm")


def updates_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the update honours ``found_inf`` (skips itself on the device) and ``grad_scale``
    (divides the gradients as it reads them): torch's fused AdamW and MasterWeightAdamW."""
    return isinstance(optimizer, MasterWeightAdamW) or bool(optimizer.defaults.get("fused"))


def grad_norm_reader(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    """What computes :func:`total_grad_norm` for this model each step, decided once: a
    MasterWeightAdamW that updates every trainable parameter reads the gradients itself, in one
    launch per group on a GPU; otherwise ``total_grad_norm``."""
    if isinstance(optimizer, MasterWeightAdamW):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if all(id(p) in held for p in model.parameters() if p.requires_grad):
            return optimizer.grad_norm
    return lambda: total_grad_norm(model)


def total_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The total 2-norm of all gradients, as ``clip_grad_norm_`` computes it, without clipping;
    in fp32 also for bf16 gradients (whose own norms would keep 3 significant digits)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide every gradient by so their norm is at most ``max_norm``: the inverse of
    ``clip_grad_norm_``'s factor, with its epsilon; 1 when the norm is already within bounds."""
    return ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)


def default_warmup(max_steps: int) -> int:
    return max(1, min(2000, max_steps // 100))


def lr_factor(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based): linear warm-up, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, max_steps, warmup, cfg.min_lr_ratio)
    )


# ---------------------------------------------------------------- RNG state
# Stored with plain tensors, ints and lists only, so that the trainer state
# loads with torch.load(weights_only=True).


def capture_rng() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = state["numpy"]
    np.random.set_state((npv[0], npv[1].numpy().astype(np.uint32), *npv[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
