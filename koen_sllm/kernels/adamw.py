"""One Triton launch that applies AdamW to every bf16 weight of a parameter group from its fp32 master copy.

Per element it reads the bf16 gradient and the fp32 master weight and moments, and writes the
master weight, the moments and the bf16 weight the next forward uses: 28 bytes (20 with the
moments stored in bf16, the default; the arithmetic stays fp32), against the
16 + 4 of fp32 weights (gradient read and written as fp32 by torch's fused AdamW with a
``grad_scale``) plus the bf16 casts of every weight in the forward and of every gradient in the
backward. The tensors are not contiguous with each other, so the kernel receives tables of their
addresses and each program finds its tensor and chunk in a precomputed map (the multi-tensor
apply of apex and torch's fused optimizers, in Triton).

Memory access width: the tensors' addresses come from a table, so Triton cannot see that they are
16-byte aligned and would read and write one element per instruction (bf16: two bytes). Where the
host has checked every address and length (``ALIGNED``), the kernel says so with ``tl.multiple_of``
and the accesses become 16-byte vectors; otherwise the scalar form runs, correct for any layout.

The arithmetic is torch's AdamW (``torch.optim.AdamW``: decoupled decay, bias corrections, ``eps``
added after the square root), in fp32. ``found_inf`` skips the whole update on the device, and
``grad_scale`` divides every gradient as it is read, as in torch's fused kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# Alignment the ALIGNED kernels assume: every address a multiple of 16 bytes and every length a
# multiple of 16 elements (so a 16-byte vector never straddles a tensor's end).
ALIGN_BYTES = tl.constexpr(16)
ALIGN_ELEMENTS = tl.constexpr(16)

# The tiling chosen by `benchmarks/bench_optimizer.py --sweep` (results in docs/benchmarks.md): 8
# elements per thread; 8,192 per program, enough to amortize each program's table lookups (larger
# chunks gained nothing).
BLOCK = 1024  # elements per inner iteration
CHUNK = 8 * BLOCK  # elements per program
NUM_WARPS = 4


@triton.jit
def _adamw_master_kernel(chunk_tensor, chunk_start, numels,
                         param_ptrs, grad_ptrs, master_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                         step_ptr, grad_scale_ptr, found_inf_ptr,
                         lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
                         HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MOMENTS_BF16: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    if HAS_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(tl.bfloat16))
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(tl.bfloat16))
    w_ptr = tl.load(master_ptrs + t).to(tl.pointer_type(tl.float32))
    if MOMENTS_BF16:
        m_ptr = tl.load(exp_avg_ptrs + t).to(tl.pointer_type(tl.bfloat16))
        v_ptr = tl.load(exp_avg_sq_ptrs + t).to(tl.pointer_type(tl.bfloat16))
    else:
        m_ptr = tl.load(exp_avg_ptrs + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(exp_avg_sq_ptrs + t).to(tl.pointer_type(tl.float32))

    if ALIGNED:  # checked on the host (MultiTensorPlan): 16-byte vectors instead of one element per access
        start, n = tl.multiple_of(start, CHUNK), tl.multiple_of(n, ALIGN_ELEMENTS)
        p_ptr, g_ptr, w_ptr = tl.multiple_of(p_ptr, ALIGN_BYTES), tl.multiple_of(g_ptr, ALIGN_BYTES), tl.multiple_of(w_ptr, ALIGN_BYTES)
        m_ptr, v_ptr = tl.multiple_of(m_ptr, ALIGN_BYTES), tl.multiple_of(v_ptr, ALIGN_BYTES)
    step = tl.load(step_ptr)
    bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
    step_size = lr / bias_correction1
    decay = 1.0 - lr * weight_decay
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)
    for offset in tl.range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < n
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g / scale
        w = tl.load(w_ptr + idx, mask=mask, other=0.0)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        w = w * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        w = w - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(w_ptr + idx, w, mask=mask)
        if MOMENTS_BF16:  # computed in fp32 above; stored rounded to nearest, as torch's copy_ does
            tl.store(m_ptr + idx, m.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
            tl.store(v_ptr + idx, v.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
        else:
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
        tl.store(p_ptr + idx, w.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _grad_sumsq_kernel(chunk_tensor, chunk_start, numels, grad_ptrs, out,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """out[program] = the sum of squares (fp32) of the program's chunk of bf16 gradients."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numels + t)
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:
        start, n, g_ptr = tl.multiple_of(start, CHUNK), tl.multiple_of(n, ALIGN_ELEMENTS), tl.multiple_of(g_ptr, ALIGN_BYTES)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in tl.range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(out + pid, tl.sum(acc, axis=0))


class MultiTensorPlan:
    """One parameter group's launch plan: which tensor and offset each program handles, and the
    address tables of the tensors that stay put (weights, masters, moments), built once.

    The gradients are new tensors every step, but the caching allocator usually hands out the same
    addresses in the same order, so their table is copied to the device only when an address
    changed: in steady state the update costs the host one address read per gradient and a launch
    (the host works here while the GPU has drained at the step's vote, so its time is GPU idle).
    """

    def __init__(self, params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
                 exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                 block: int = BLOCK, chunk: int = CHUNK, num_warps: int = NUM_WARPS, vectorize: bool = True):
        if chunk % block:
            raise ValueError(f"chunk {chunk} must be a multiple of block {block}")
        if vectorize and chunk % ALIGN_ELEMENTS.value:
            raise ValueError(f"chunk {chunk} must be a multiple of {ALIGN_ELEMENTS.value} to vectorize")
        self.block, self.chunk, self.num_warps = block, chunk, num_warps
        device = masters[0].device
        owner, starts = [], []
        for i, m in enumerate(masters):
            for s in range(0, m.numel(), chunk):
                owner.append(i)
                starts.append(s)
        self.device, self.programs = device, len(owner)
        moment_dtypes = {t.dtype for t in (*exp_avgs, *exp_avg_sqs)}
        if moment_dtypes - {torch.float32} and moment_dtypes != {torch.bfloat16}:
            raise ValueError(f"the moments must be all fp32 or all bf16, got {sorted(map(str, moment_dtypes))}")
        self.moments_bf16 = moment_dtypes == {torch.bfloat16}
        self.chunk_tensor = torch.tensor(owner, dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor(starts, dtype=torch.int64, device=device)
        self.numels = torch.tensor([m.numel() for m in masters], dtype=torch.int64, device=device)
        addresses = [[t.data_ptr() for t in ts] for ts in (params, masters, exp_avgs, exp_avg_sqs)]
        self.tables = [_address_table(a, device) for a in addresses]
        # vectorize=False keeps the scalar kernel (for measuring what the vectors bring)
        self.vectorize = vectorize and all(m.numel() % ALIGN_ELEMENTS.value == 0 for m in masters) and all(
            _aligned(a) for a in addresses)
        self._grad_addresses: list[int] = []
        self._grad_table: Optional[torch.Tensor] = None
        self._grads_aligned = False

    def grad_table(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        addresses = [g.data_ptr() for g in grads]
        if addresses != self._grad_addresses:
            self._grad_table, self._grad_addresses = _address_table(addresses, self.device), addresses
            self._grads_aligned = _aligned(addresses)
        return self._grad_table

    def launch_grads(self, grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The gradients' address table, and whether a launch over them takes the vectorized kernel."""
        table = self.grad_table(grads)
        return table, self.vectorize and self._grads_aligned

    def aligned(self, grads: Sequence[torch.Tensor]) -> bool:
        return self.launch_grads(grads)[1]

    def update(self, grads: Sequence[torch.Tensor], step: torch.Tensor, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
               found_inf: Optional[torch.Tensor] = None) -> None:
        """One launch over the group; ``step`` (fp32, one element) is the already-incremented count."""
        params, masters, exp_avgs, exp_avg_sqs = self.tables
        grad_table, aligned = self.launch_grads(grads)
        _adamw_master_kernel[(self.programs,)](
            self.chunk_tensor, self.chunk_start, self.numels,
            params, grad_table, masters, exp_avgs, exp_avg_sqs, step,
            grad_scale if grad_scale is not None else step, found_inf if found_inf is not None else step,
            lr, beta1, beta2, eps, weight_decay, _log2(beta1), _log2(beta2),
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, MOMENTS_BF16=self.moments_bf16,
            ALIGNED=aligned, BLOCK=self.block, CHUNK=self.chunk, num_warps=self.num_warps,
        )

    def grad_sumsq(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each program's sum of squared gradients (fp32, one launch): their sum is the squared
        2-norm of the group's gradients, summed in a fixed order, so the same on every run."""
        out = torch.empty(self.programs, dtype=torch.float32, device=self.device)
        grad_table, aligned = self.launch_grads(grads)
        _grad_sumsq_kernel[(self.programs,)](self.chunk_tensor, self.chunk_start, self.numels, grad_table, out,
                                             ALIGNED=aligned, BLOCK=self.block, CHUNK=self.chunk,
                                             num_warps=self.num_warps)
        return out


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta 0: no momentum, bias correction 1


def _aligned(addresses: Sequence[int]) -> bool:
    return all(a % ALIGN_BYTES.value == 0 for a in addresses)


def _address_table(addresses: list[int], device: torch.device) -> torch.Tensor:
    """Addresses as an int64 tensor on ``device``. On a GPU the copy comes from pinned memory
    without waiting for queued work (the caching host allocator keeps the buffer until the copy
    is done)."""
    table = torch.tensor(addresses, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table
