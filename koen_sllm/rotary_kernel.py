"""The Triton kernel behind :func:`koen_sllm.rotary.qkv_rope_grad`: one launch per part (q, k, v)
reads that part's gradient in whatever layout the attention backward left it and writes it,
unrotated for q and k, into its columns of the fused q/k/v gradient. Each program takes a block
of tokens of one head and loads the head's two halves once: memory-bound, one read and one write
per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32  # tokens per program


@triton.jit
def _unrotate_kernel(src, dst, cos, sin, rows, seq_len,
                     s_b, s_t, s_h, s_d, dst_row, dst_col,
                     HALF: tl.constexpr, ROTATE: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # b x seq_len + t
    head = tl.program_id(1)
    mask = (row < rows)[:, None]
    b, t = row // seq_len, row % seq_len
    d = tl.arange(0, HALF)[None, :]
    first = src + b[:, None] * s_b + t[:, None] * s_t + head * s_h + d * s_d
    g1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(first + HALF * s_d, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:  # the table's halves are equal (rotate_half layout): the first half serves both
        angle = t[:, None] * (2 * HALF) + d
        c = tl.load(cos + angle, mask=mask, other=0.0)
        s = tl.load(sin + angle, mask=mask, other=0.0)
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
    out = dst + row[:, None] * dst_row + dst_col + head * (2 * HALF) + d
    tl.store(out, g1.to(dst.dtype.element_ty), mask=mask)
    tl.store(out + HALF, g2.to(dst.dtype.element_ty), mask=mask)


def unrotate_into(out: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Fill ``out [B, T, (heads + 2 kv_heads) x D]`` (contiguous) from ``dq [B, T, heads, D]``,
    ``dk`` and ``dv [B, T, kv_heads, D]``; cos/sin are ``[T, D]`` fp32 tables."""
    b, t, _, dim = dq.shape
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    column = 0
    for grad, rotate in ((dq, True), (dk, True), (dv, False)):
        heads = grad.shape[2]
        grid = (triton.cdiv(b * t, BLOCK_T), heads)
        _unrotate_kernel[grid](grad, out, cos, sin, b * t, t, *grad.stride(), out.stride(1), column,
                               HALF=dim // 2, ROTATE=rotate, BLOCK_T=BLOCK_T)
        column += heads * dim
