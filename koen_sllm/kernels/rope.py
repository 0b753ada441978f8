"""The Triton kernel behind :mod:`koen_sllm.rotary`'s fused q/k/v rotation: one launch per part
(q, k, v) moves that part between its columns of the fused q/k/v tensor and a tensor of its own,
rotating (forward), unrotating (backward) or copying (v) on the way. Each program takes a block of
tokens of one head and loads the head's two halves once: memory-bound, one read and one write per
element, whatever the strides on either side.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32  # tokens per program
COPY, ROTATE, UNROTATE = 0, 1, -1


@triton.jit
def _rope_kernel(src, dst, cos, sin, rows, seq_len,
                 s_b, s_t, s_h, s_d, d_b, d_t, d_h, d_d,
                 HALF: tl.constexpr, MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # b x seq_len + t
    head = tl.program_id(1)
    mask = (row < rows)[:, None]
    b, t = row // seq_len, row % seq_len
    d = tl.arange(0, HALF)[None, :]
    first = src + b[:, None] * s_b + t[:, None] * s_t + head * s_h + d * s_d
    a1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    a2 = tl.load(first + HALF * s_d, mask=mask, other=0.0).to(tl.float32)
    if MODE != 0:  # the table's halves are equal (rotate_half layout): the first half serves both
        angle = t[:, None] * (2 * HALF) + d
        c = tl.load(cos + angle, mask=mask, other=0.0)
        s = tl.load(sin + angle, mask=mask, other=0.0)
        if MODE == 1:  # x * cos + rotate_half(x) * sin
            a1, a2 = a1 * c - a2 * s, a2 * c + a1 * s
        else:  # its transpose: g * cos + rotate_half^T(g * sin)
            a1, a2 = a1 * c + a2 * s, a2 * c - a1 * s
    out = dst + b[:, None] * d_b + t[:, None] * d_t + head * d_h + d * d_d
    tl.store(out, a1.to(dst.dtype.element_ty), mask=mask)
    tl.store(out + HALF * d_d, a2.to(dst.dtype.element_ty), mask=mask)


def _launch(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: int) -> None:
    """``src`` and ``dst`` are ``[B, T, heads, D]`` views (any strides); cos/sin ``[T, D]`` fp32."""
    b, t, heads, dim = src.shape
    grid = (triton.cdiv(b * t, BLOCK_T), heads)
    _rope_kernel[grid](src, dst, cos, sin, b * t, t, *src.stride(), *dst.stride(),
                       HALF=dim // 2, MODE=mode, BLOCK_T=BLOCK_T)


def _columns(fused: torch.Tensor, heads: list[int], dim: int) -> list[torch.Tensor]:
    """The q, k and v parts of ``fused [B, T, (heads...) x D]`` as ``[B, T, heads, D]`` views."""
    return [part.unflatten(-1, (h, dim)) for part, h in zip(fused.split([h * dim for h in heads], dim=-1), heads)]


def rotate_from(qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Fill ``q [B, T, heads, D]``, ``k`` and ``v [B, T, kv_heads, D]`` from ``qkv``: q and k rotated."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    parts = _columns(qkv, [q.shape[2], k.shape[2], v.shape[2]], q.shape[3])
    for src, dst, mode in zip(parts, (q, k, v), (ROTATE, ROTATE, COPY)):
        _launch(src, dst, cos, sin, mode)


def unrotate_into(out: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Fill ``out [B, T, (heads + 2 kv_heads) x D]`` (contiguous) from ``dq [B, T, heads, D]``,
    ``dk`` and ``dv [B, T, kv_heads, D]``: q's and k's gradients unrotated."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    parts = _columns(out, [dq.shape[2], dk.shape[2], dv.shape[2]], dq.shape[3])
    for src, dst, mode in zip((dq, dk, dv), parts, (UNROTATE, UNROTATE, COPY)):
        _launch(src, dst, cos, sin, mode)
