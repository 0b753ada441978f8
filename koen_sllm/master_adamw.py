"""AdamW over bf16 model weights with fp32 master weights held by the optimizer.

With fp32 parameters under autocast, every step casts every weight to bf16 in the forward,
produces bf16 weight gradients and casts them to fp32, and the optimizer reads and writes
fp32 gradients. Keeping the model's parameters in bf16 and the fp32 copy here (Megatron's
and DeepSpeed's "master weights") removes those casts and halves the gradient traffic; the
update writes the new bf16 weights in the same pass (kernels/adamw.py on a GPU). The forward
sees exactly what autocast fed it before (the weights rounded to bf16) and the gradients are
the same bf16 numbers, so the trajectory matches fp32 weights up to rounding in the norms'
weight gradients.

Two limits, checked by the config: the gradients accumulate in bf16, so gradient accumulation
would round every micro-batch's sum (refused); and DDP averages bf16 buckets.

Checkpoints keep fp32 weights: the saving code passes the model's state dict through
:func:`full_precision_state`, which puts the master tensors in place of the bf16 weights. The
optimizer state has torch.optim.AdamW's layout (``step``, ``exp_avg``, ``exp_avg_sq`` per
parameter), so a run can resume across this switch (and across --bf16-moments, which stores the
two moments in bf16); it is loaded while the model still holds its
fp32 weights, before :meth:`MasterWeightAdamW.take_master_weights`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

WEIGHT_DTYPE = torch.bfloat16
# The moments' storage. bf16 halves their bytes; the update still computes in fp32 and rounds each
# new moment to nearest once per step (DeepSeek-V3 trained with bf16 AdamW moments).
MOMENT_DTYPES = (torch.float32, torch.bfloat16)


class MasterWeightAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update, applied to fp32 masters; the model's weights become bf16 copies.

    Like torch's fused AdamW it honours ``found_inf`` (skip the update and its step count on the
    device) and ``grad_scale`` (divide every gradient while reading it), set as attributes before
    :meth:`step`; the trainer folds gradient clipping into ``grad_scale``.
    """

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, moment_dtype: torch.dtype = torch.float32):
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype must be one of {MOMENT_DTYPES}, got {moment_dtype}")
        self.moment_dtype = moment_dtype
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      # "fused": where torch keeps ``step`` (on the weights' device, fp32)
                                      # when it loads a state dict; our update reads it there.
                                      fused=True))
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        self.found_inf: Optional[torch.Tensor] = None
        self.grad_scale: Optional[torch.Tensor] = None
        self._step: Optional[torch.Tensor] = None
        self._plans: dict[tuple, Any] = {}  # kernels.adamw.MultiTensorPlan per group and parameter set

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def take_master_weights(self) -> None:
        """Keep every parameter's fp32 values as its master and turn the parameter into a bf16 copy.
        Called once, after any weights and optimizer state are loaded and before the model is
        compiled or wrapped."""
        if self.masters:
            raise RuntimeError("take_master_weights was already called")
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            raise ValueError("MasterWeightAdamW has no parameters")
        steps = {float(self.state[p]["step"]) for p in params if "step" in self.state[p]}
        if len(steps) > 1:
            raise ValueError(f"the loaded optimizer state has parameters at different steps {sorted(steps)}; "
                             "this optimizer updates all of them together")
        self._step = torch.full((), steps.pop() if steps else 0.0, dtype=torch.float32, device=params[0].device)
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"MasterWeightAdamW needs fp32 parameters to start from, got {p.dtype}")
            state = self.state[p]
            state["step"] = self._step  # one counter; each parameter's entry shows it, as torch's layout has
            for key in ("exp_avg", "exp_avg_sq"):  # in moment_dtype whatever the loaded state held
                state[key] = (state[key].to(self.moment_dtype) if key in state
                              else torch.zeros_like(p, dtype=self.moment_dtype))
            self.masters[p] = p.detach().clone()
            p.data = p.detach().to(WEIGHT_DTYPE)

    def with_master_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (a model's state dict) with every parameter's entry replaced by its fp32 master.
        Entries are matched by the memory they view: the parameters cannot lend their master tensors
        for the save, because a dtype change would drop their gradient accumulators and with them
        DDP's hooks."""
        by_address = {(p.data_ptr(), p.shape): master for p, master in self.masters.items()}
        return {name: by_address.get((t.data_ptr(), t.shape), t) for name, t in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, each parameter with a ``step`` of its own: one shared tensor would be
        counted once per parameter by torch's AdamW after a resume with --fp32-weights."""
        sd = super().state_dict()
        sd["state"] = {k: {**v, "step": v["step"].clone()} if "step" in v else v for k, v in sd["state"].items()}
        return sd

    # ------------------------------------------------------------ update
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        if not self.masters:
            raise RuntimeError("call take_master_weights() before the first step")
        if self.found_inf is None:
            self._step += 1
        else:  # counted only where the update happens, on the device, as torch's fused AdamW does
            self._step += 1 - self.found_inf.to(self._step.dtype)
        for gi, group, params, grads in self._groups_with_grads():
            if any(g.is_sparse for g in grads):
                raise RuntimeError("MasterWeightAdamW does not support sparse gradients")
            beta1, beta2 = group["betas"]
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], grad_scale=self.grad_scale, found_inf=self.found_inf)
            if params[0].is_cuda:
                self._plan(gi, params).update(grads, self._step, **hyper)
            else:
                reference_update(params, grads, *self._state_lists(params), self._step, **hyper)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of all the gradients, in fp32, as ``clip_grad_norm_`` computes it. On a GPU
        each group's plan reads its gradients in one launch: at 350m on an H200 0.17-0.19 ms
        against ``_foreach_norm``'s 0.32-0.36 ms in 17 launches (docs/benchmarks.md)."""
        squares = []
        for gi, _, params, grads in self._groups_with_grads():
            if params[0].is_cuda:
                squares.append(self._plan(gi, params).grad_sumsq(grads))
            else:
                squares.append(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square())
        if not squares:
            return torch.zeros((), dtype=torch.float32, device=self._step.device if self._step is not None else None)
        return torch.cat(squares).sum().sqrt()

    def _groups_with_grads(self):
        """(index, group, its parameters that have gradients, their gradients) for each group
        with any: what the update and the norm both read."""
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                yield gi, group, params, [p.grad for p in params]

    def _state_lists(self, params: list) -> tuple[list, list, list]:
        return ([self.masters[p] for p in params], [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params])

    def _plan(self, group_index: int, params: list):
        """The group's kernel plan, built the first time this set of parameters has gradients:
        later steps hand it the gradients only."""
        from .kernels.adamw import MultiTensorPlan  # Triton: imported where a GPU runs the update

        key = (group_index, tuple(id(p) for p in params))
        if key not in self._plans:
            self._plans[key] = MultiTensorPlan(params, *self._state_lists(params))
        return self._plans[key]


@torch.no_grad()
def reference_update(params, grads, masters, exp_avgs, exp_avg_sqs, step: torch.Tensor, *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                     found_inf: Optional[torch.Tensor] = None) -> None:
    """The update in torch operations (CPU, and the kernel's reference in the tests): torch.optim.AdamW's
    arithmetic on the masters, then the bf16 copy. ``step`` is the count including this update."""
    if found_inf is not None and bool(found_inf):
        return
    count = float(step)
    step_size = lr / (1 - beta1 ** count)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** count)
    for p, g, w, m_stored, v_stored in zip(params, grads, masters, exp_avgs, exp_avg_sqs):
        g = g.float() if grad_scale is None else g.float() / grad_scale
        m, v = m_stored.float(), v_stored.float()  # the stored moments themselves when they are fp32
        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        w.addcdiv_(m, v.sqrt().div_(bias_correction2_sqrt).add_(eps), value=-step_size)
        p.copy_(w)
        if m is not m_stored:  # bf16 storage: this step used the fp32 values; the next reads them rounded
            m_stored.copy_(m)
            v_stored.copy_(v)


def full_precision_state(optimizer: Optional[torch.optim.Optimizer],
                         state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights to save: ``state`` itself, or with the fp32 masters where the optimizer keeps them."""
    if isinstance(optimizer, MasterWeightAdamW) and optimizer.masters:
        return optimizer.with_master_weights(state)
    return state
