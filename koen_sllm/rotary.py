"""Rotary position embeddings (the Hugging Face ``rotate_half`` layout), and RoPE on the fused
q/k/v projection's output with a backward that writes the fused gradient in one pass.

Autograd's own backward of "split the fused output, rotate q and k" ends in a concatenation of
the q, k and v gradients. torch.compile lowers that as one pointwise kernel over the fused
width, which evaluates both halves of the rotation and all three sources under masks for every
element, far more work than the separate rotations' backward does (docs/benchmarks.md).
:func:`rotate_qkv` gives the backward an operator of its own: on a GPU one Triton launch per part
(q, k, v) writes that part's gradient straight into its columns of the fused gradient; elsewhere
the same arithmetic runs as torch operations. The same kernel can run the forward too
(``kernel=True``: the model's rope_kernel option, --rope-kernel), but not by default: the compiled forward already moves its bytes about
once, so there is little to gain, and the operator, a Python call outside Inductor's graph, adds
host time to each layer; kept as a benchmark lever.
"""
from __future__ import annotations

import importlib.util

import torch

# CUDA builds of torch bring triton on Linux; without it the backward runs as torch operations.
_HAVE_TRITON = importlib.util.find_spec("triton") is not None



def qkv_split(num_heads: int, num_kv_heads: int, head_dim: int) -> list[int]:
    """Widths of q, k and v in the fused q/k/v projection's output, in that order."""
    return [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_seq_len, head_dim]`` in fp32, halves duplicated as in HF's rotate_half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, heads, D]`` by position; computed in fp32 (bf16 angles drift at long range)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return x32 * cos + rotated * sin


def unrotate(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through :func:`apply_rope` (its rotation transposed), in fp32, with the
    operations autograd performs: ``g * cos`` plus the rotate_half transpose of ``g * sin``."""
    g = grad.float()
    gs = g * sin[None, :, None, :]
    half = gs.shape[-1] // 2
    return g * cos[None, :, None, :] + torch.cat((gs[..., half:], -gs[..., :half]), dim=-1)


def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               head_dim: int, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv [B, T, (heads + 2 kv_heads) x D]`` -> rotated q ``[B, T, heads, D]``, rotated k and v
    ``[B, T, kv_heads, D]``, in ``qkv``'s dtype (the rotation itself in fp32). ``kernel``: the forward
    through the Triton kernel on a GPU (the default keeps it to torch operations Inductor fuses: the
    compiled forward already moves its bytes about once, and the kernel's operator adds host work
    per layer that the step does not win back)."""
    return _RotateQKV.apply(qkv, cos, sin, num_heads, num_kv_heads, head_dim, kernel)


class _RotateQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads, num_kv_heads, head_dim, kernel):
        ctx.save_for_backward(cos, sin)
        if kernel and qkv.is_cuda:
            return qkv_rope(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
        return _rotate_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return qkv_rope_grad(dq, dk, dv, cos, sin), None, None, None, None, None, None


def _rotate_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    q, k, v = qkv.split(qkv_split(num_heads, num_kv_heads, head_dim), dim=-1)
    # v is copied rather than returned as a view of the input: a Function must not hand out
    # views of its inputs. The copy is one read and one write of v.
    return (apply_rope(q.unflatten(-1, (num_heads, head_dim)), cos, sin).to(qkv.dtype),
            apply_rope(k.unflatten(-1, (num_kv_heads, head_dim)), cos, sin).to(qkv.dtype),
            v.unflatten(-1, (num_kv_heads, head_dim)).clone())


@torch.library.custom_op("koen_sllm::qkv_rope", mutates_args=())
def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rotate_qkv`'s forward as one operator: on a GPU the Triton kernel, elsewhere torch operations."""
    if not _kernel_runs(qkv, head_dim):
        return _rotate_split(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
    from .kernels.rope import rotate_from  # Triton: imported where a GPU runs it

    b, t, _ = qkv.shape
    q = qkv.new_empty(b, t, num_heads, head_dim)
    k, v = (qkv.new_empty(b, t, num_kv_heads, head_dim) for _ in range(2))
    rotate_from(qkv, q, k, v, cos, sin)
    return q, k, v


@qkv_rope.register_fake
def _(qkv, cos, sin, num_heads, num_kv_heads, head_dim):
    b, t, _ = qkv.shape
    return (qkv.new_empty(b, t, num_heads, head_dim), qkv.new_empty(b, t, num_kv_heads, head_dim),
            qkv.new_empty(b, t, num_kv_heads, head_dim))


@torch.library.custom_op("koen_sllm::qkv_rope_grad", mutates_args=())
def qkv_rope_grad(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """The fused q/k/v gradient ``[B, T, (heads + 2 kv_heads) x D]`` from the gradients of the
    rotated q and k and of v (any strides), in ``dq``'s dtype."""
    b, t, heads, dim = dq.shape
    out = dq.new_empty(b, t, (heads + 2 * dk.shape[2]) * dim)
    if _kernel_runs(dq, dim):
        from .kernels.rope import unrotate_into  # Triton: imported where a GPU runs it

        unrotate_into(out, dq, dk, dv, cos, sin)
        return out
    parts = (unrotate(dq, cos, sin), unrotate(dk, cos, sin), dv)
    torch.cat([p.to(out.dtype).flatten(2) for p in parts], dim=-1, out=out)
    return out


@qkv_rope_grad.register_fake
def _(dq, dk, dv, cos, sin):
    b, t, heads, dim = dq.shape
    return dq.new_empty(b, t, (heads + 2 * dk.shape[2]) * dim)


def _kernel_runs(t: torch.Tensor, head_dim: int) -> bool:
    """Whether the Triton kernel takes ``t``: on a GPU, with triton, for heads whose halves are
    power-of-two blocks (how the kernel loads them)."""
    half = head_dim // 2
    return t.is_cuda and _HAVE_TRITON and head_dim % 2 == 0 and half >= 1 and half & (half - 1) == 0
