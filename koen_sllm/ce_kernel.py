"""The Triton kernel behind :func:`koen_sllm.losses.fused_linear_cross_entropy`: the loss of each
token and, in the same launch, its gradient with respect to the logits, written over the logits.

One program per token row, reading the row once from memory and writing its gradient
``(softmax - one_hot(target)) * scale`` once, in the logits' dtype, where the compiled
``F.cross_entropy`` reads the logits twice and writes the gradient once. A row of up to
``WHOLE_ROW_MAX`` entries (64K: a 32k vocabulary is 32 values per thread of a 32-warp program) is
held in registers, so exp is taken once per entry. A longer row is read twice: a first pass finds
its log-sum-exp (online max and sum), a second pass writes the gradient; the second read comes
partly from L2 (docs/benchmarks.md, fifth round: the two-pass form took 0.76 ms per step at 350m,
batch 8 on an H200, against 1.45 ms for the compiled loss).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

WHOLE_ROW_MAX = 65536  # rows up to this (rounded up to a power of two) are held in registers
BLOCK_V = 4096  # longer rows: vocabulary entries per inner step, 16 per thread with 8 warps
NUM_WARPS = 8


@triton.jit
def _ce_loss_grad_kernel(logits, targets, row_loss, scale_ptr, vocab, row_stride, ignore_index,
                         BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows x vocab can pass 2**31 (batch 32 x 2048 x 32k)
    base = logits + row * row_stride
    target = tl.load(targets + row)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    # 1 / counted tokens; ignored rows get 0
    scale = tl.where(counted, tl.load(scale_ptr), 0.0)
    cols = tl.arange(0, BLOCK)

    if WHOLE_ROW:  # BLOCK covers the row: one read, one exp per entry
        keep = cols < vocab
        x = tl.load(base + cols, mask=keep, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        s = tl.sum(e, axis=0)
        lse = m + tl.log(s)
        picked = tl.sum(tl.where(cols == target, x, 0.0), axis=0)
        p = e / s
        g = tl.where(cols == target, p - 1.0, p) * scale
        tl.store(base + cols, g.to(logits.dtype.element_ty), mask=keep)
    else:
        m = -float("inf")  # running max and sum of exp(x - m): one pass, as an online softmax
        s = 0.0
        for start in range(0, vocab, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < vocab, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        picked = tl.load(base + target, mask=counted & in_range, other=0.0).to(tl.float32)
        for start in range(0, vocab, BLOCK):  # the gradient, over the row just read
            idx = start + cols
            keep = idx < vocab
            x = tl.load(base + idx, mask=keep, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(idx == target, p - 1.0, p) * scale
            tl.store(base + idx, g.to(logits.dtype.element_ty), mask=keep)

    # A target outside the vocabulary makes the loss nan (the trainer stops on it and says so)
    # instead of reading another row's memory.
    loss = tl.where(counted, tl.where(in_range, lse - picked, float("nan")), 0.0)
    tl.store(row_loss + row, loss)


def loss_and_grad_in_place(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           ignore_index: int) -> torch.Tensor:
    """Per-token losses (fp32, 0 where ignored) of ``logits [N, V]`` (rows contiguous) against
    ``targets [N]``; ``logits`` is overwritten with ``d(sum of losses x scale)/d(logits)``.
    ``scale`` is a one-element fp32 tensor on the logits' device (read there: no host sync)."""
    rows, vocab = logits.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if not rows:
        return row_loss
    whole = triton.next_power_of_2(vocab)
    if whole <= WHOLE_ROW_MAX:  # 32 warps for a 32k row: 32 values per thread
        block, warps = whole, max(4, min(32, whole // 1024))
    else:
        block, warps = BLOCK_V, NUM_WARPS
    _ce_loss_grad_kernel[(rows,)](logits, targets, row_loss, scale, vocab, logits.stride(0), ignore_index,
                                  BLOCK=block, WHOLE_ROW=whole <= WHOLE_ROW_MAX, num_warps=warps)
    return row_loss
