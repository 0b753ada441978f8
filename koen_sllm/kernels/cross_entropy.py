"""The Triton kernel behind :func:`koen_sllm.losses.fused_linear_cross_entropy`: the loss of each
token and, in the same launch, its gradient with respect to the logits, written over the logits.

One program per token row. The first pass over the row finds its log-sum-exp (an online max and
sum in fp32); the second pass reads the row again, 64 KB for a 32k vocabulary in bf16, which
comes back partly from L2, and writes ``(softmax - one_hot(target)) * scale`` in the logits'
dtype, where the compiled ``F.cross_entropy`` reads the logits twice from memory and writes the
gradient once, in separate launches (timings in docs/benchmarks.md). A row is not held whole in
registers to be read only once: a program large enough for it (32 warps) leaves room for two per
SM, too few loads in flight to keep the memory busy, and each such program loads, reduces and
stores in sequence with nothing to overlap; many smaller two-pass programs overlap one another.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 16384  # vocabulary entries per inner step (8 warps: 64 per thread): wide steps keep
# many loads in flight per program; chosen by bench_cross_entropy.py --sweep (docs/benchmarks.md)
NUM_WARPS = 8


@triton.jit
def _ce_loss_grad_kernel(logits, targets, row_loss, scale_ptr, vocab, row_stride, ignore_index,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows x vocab can pass 2**31 (batch 32 x 2048 x 32k)
    base = logits + row * row_stride
    target = tl.load(targets + row)
    cols = tl.arange(0, BLOCK)

    m = -float("inf")  # running max and sum of exp(x - m): one pass, as an online softmax
    s = 0.0
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < vocab, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    counted = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    picked = tl.load(base + target, mask=counted & in_range, other=0.0).to(tl.float32)
    # A target outside the vocabulary makes the loss nan, which the trainer's check for
    # non-finite losses catches, instead of reading another row's memory.
    loss = tl.where(counted, tl.where(in_range, lse - picked, float("nan")), 0.0)
    tl.store(row_loss + row, loss)

    scale = tl.where(counted, tl.load(scale_ptr), 0.0)  # 1 / counted tokens; ignored rows get 0
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        keep = idx < vocab
        x = tl.load(base + idx, mask=keep, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        g = tl.where(idx == target, p - 1.0, p) * scale
        tl.store(base + idx, g.to(logits.dtype.element_ty), mask=keep)


def loss_and_grad_in_place(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           ignore_index: int) -> torch.Tensor:
    """Per-token losses (fp32, 0 where ignored) of ``logits [N, V]`` (rows contiguous) against
    ``targets [N]``; ``logits`` is overwritten with ``d(sum of losses x scale)/d(logits)``.
    ``scale`` is a one-element fp32 tensor on the logits' device (read there: no host sync)."""
    rows, vocab = logits.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_loss_grad_kernel[(rows,)](logits, targets, row_loss, scale, vocab, logits.stride(0), ignore_index,
                                      BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=NUM_WARPS)
    return row_loss
