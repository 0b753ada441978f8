"""The projections' FP8 matmuls in torch alone: ``--fp8 tensorwise --fp8-impl native``.

The recipe is torchao.float8's tensorwise one, operation for operation: one scale per tensor
from its absolute maximum (the format's largest value / amax, in float64 then float32, the amax
clamped at 1e-12), a saturating cast (inputs and weights to e4m3, output gradients to e5m2), the
output's matmul with fast accumulation and the two gradients' without. On the CPU the numbers
are torchao's bit for bit, compiled or not (tests/unit/test_fp8_linear.py). On an H100 they are
not: from the third step of a 1.3b run the losses part, and over 200 steps this linear's curve
lay 0.11-0.15 from bf16's where torchao's lay 0.035-0.040 and six bf16 runs 0.02-0.06 from each
other (docs/benchmarks.md, sixth round). Where the GPU's compiled graph rounds differently is not
yet found, so ``--fp8-impl auto`` runs torchao and this linear runs only when named.

What differs is what the backward reads. torchao's ``matmul_with_hp_or_float8_args`` keeps the
bf16 input and weight and casts both again in the backward; compiled, that is one more pass to
find each input's amax (the forward's cannot be reused: its input is 3-D, the backward's 2-D, so
the graph's common-subexpression pass does not see one value) and one more cast of each. Here the
forward's FP8 tensors and their scales are what the backward gets, so it needs no amax but its
output gradient's. (Compiled, the partitioner may still recompute a cast from a tensor it keeps
anyway, such as the norm's input, rather than keep the FP8 copy; the scale it keeps.) FP8
matmuls on Hopper take their first operand row-major and their second column-major; the
backward makes the transposed copies that needs.

No torchao: ``torch._scaled_mm`` is all it needs (CUDA on compute capability 8.9+, and the CPU,
where the tests run it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn  # inputs and weights: more mantissa
E5M2 = torch.float8_e5m2  # output gradients: more range
AMAX_FLOOR = 1e-12  # an all-zero tensor still gets a finite scale (torchao's EPS)


# How the amax is reduced (the same value either way: a maximum is exact in any order). "whole":
# one reduction over every element, which Inductor splits into chunks that no producer shares, so
# it reads the tensor again in a kernel of its own (the measured default). "rows": each row's
# maximum first, then theirs, so that Inductor can compute the rows' maxima inside the kernel that
# produces the tensor (a norm, the SwiGLU product or its backward: reductions over the same rows).
# Predicted 1.02-1.035x at 1.3b, measured 0.986x on an H100 (docs/benchmarks.md): a benchmark lever.
AMAX_ORDER = "whole"

# Where each input's and output gradient's scale comes from. "dynamic": the tensor's own amax, so
# the cast waits for a full pass over the tensor (torchao's tensorwise recipe; the measured
# default). "delayed": the largest amax of the previous HISTORY steps (Transformer Engine's
# recipe), known before the tensor exists, so Inductor can fuse the cast into the kernel that
# produces the tensor; the tensor's own amax is still taken, for the steps after (row by row with
# AMAX_ORDER "rows", possibly inside that same kernel). A tensor that outgrows its history
# saturates at the format's largest value for that step. The weights keep dynamic scales: they
# are cast once a step. Read when a layer is built (Fp8Linear.from_linear). Measured 1.007x the
# dynamic recipe on an H100 at 1.3b (docs/benchmarks.md): a benchmark lever, not a run option (an
# exact resume would have to save the histories, and the step compiles twice).
SCALING = "dynamic"
HISTORY = 16  # steps of amax kept per tensor (torchao's delayed recipe kept 16)

# Whether the two gradients' matmuls also accumulate fast (Hopper's FP8 tensor cores add in
# reduced precision). torchao's tensorwise recipe uses it for the output only. Measured on an H100
# at 1.3b: 1.019x here, 1.017x through torchao; its 200-step loss curve lay outside bf16's band,
# as this linear's own does (docs/benchmarks.md, sixth round). A benchmark lever.
GRAD_FAST_ACCUM = False


def tensor_amax(t: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in ``t`` (2-D or more: rows along the last dimension)."""
    if AMAX_ORDER == "rows" and t.dim() >= 2:
        return t.abs().amax(dim=-1).max()
    return t.abs().max()


def amax_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scalar that maps ``amax`` onto ``dtype``'s largest value (in float64 first, as torchao)."""
    return (torch.finfo(dtype).max / torch.clamp(amax.to(torch.float64), min=AMAX_FLOOR)).to(torch.float32)


def tensor_scale(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 scalar that maps ``t``'s largest magnitude onto ``dtype``'s largest value."""
    return amax_scale(tensor_amax(t), dtype)


def history_scale(t: torch.Tensor, history: Optional[torch.Tensor], delayed: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """``t``'s scale: from its own amax, or with ``delayed`` from the largest in ``history``; either
    way ``t``'s amax then enters ``history`` (newest first), which ``None`` skips (dynamic layers)."""
    if history is None:
        return tensor_scale(t, dtype)
    amax = tensor_amax(t).to(torch.float32)
    scale = amax_scale(history.max() if delayed else amax, dtype)
    history.copy_(torch.cat([amax.reshape(1), history[:-1]]))
    return scale


def to_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t * scale`` in ``dtype``, saturating at its largest value instead of overflowing to NaN."""
    limit = torch.finfo(dtype).max
    return (t.to(torch.float32) * scale).clamp(min=-limit, max=limit).to(dtype)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column (what ``_scaled_mm`` wants as its second operand)."""
    return t.t().contiguous().t()


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """``(a / a_scale) @ (b / b_scale)`` in ``out_dtype``; ``a`` row-major, ``b`` column-major.

    Outside autocast, as torchao calls it (below the dispatcher's autocast layer): the CPU's
    autocast otherwise changes what ``_scaled_mm`` computes."""
    with torch.autocast(a.device.type, enabled=False):
        return torch._scaled_mm(a, b, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
                                out_dtype=out_dtype, use_fast_accum=fast_accum)


class Fp8Matmul(torch.autograd.Function):
    """``x @ weight.T`` with all three matmuls (output, input gradient, weight gradient) in FP8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, x_history: Optional[torch.Tensor] = None,
                g_history: Optional[torch.Tensor] = None, delayed: bool = False) -> torch.Tensor:
        """``x_history``/``g_history``: the input's and output gradient's amax histories (delayed
        scaling's layers; None for dynamic ones), ``delayed``: whether they hold a step yet."""
        x2d = x.reshape(-1, x.shape[-1])
        x_scale, w_scale = history_scale(x2d, x_history, delayed, E4M3), tensor_scale(weight, E4M3)
        x8, w8 = to_fp8(x2d, x_scale, E4M3), to_fp8(weight, w_scale, E4M3)
        # weight is [out, in] row-major, so weight.T is the column-major [in, out] the matmul wants
        out = scaled_mm(x8, x_scale, w8.t(), w_scale, x.dtype, fast_accum=True)
        ctx.save_for_backward(x8, x_scale, w8, w_scale)
        ctx.x_shape = x.shape
        ctx.g_history, ctx.delayed = g_history, delayed
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8, x_scale, w8, w_scale = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        g_scale = history_scale(g2d, ctx.g_history, ctx.delayed, E5M2)
        g8 = to_fp8(g2d, g_scale, E5M2)
        fast = GRAD_FAST_ACCUM
        # dX = dY @ W: [tokens, out] @ [out, in]
        grad_x = scaled_mm(g8, g_scale, column_major(w8), w_scale, grad_out.dtype, fast_accum=fast)
        # dW = dY.T @ X: [out, tokens] @ [tokens, in]
        grad_w = scaled_mm(g8.t().contiguous(), g_scale, column_major(x8), x_scale, grad_out.dtype, fast_accum=fast)
        return grad_x.reshape(ctx.x_shape), grad_w, None, None, None


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmuls run in FP8 with tensorwise scaling (no bias: the projections have none).

    Built by :meth:`from_linear` around the very ``weight`` parameter of the layer it replaces, so
    the state dict, the optimizer's parameters and checkpoints do not change. With delayed scaling
    (``SCALING``) it keeps two amax histories as buffers outside the state dict; its first forward
    and backward scale dynamically and fill them, and from then on ``delayed`` is set (a Python
    flag: torch.compile compiles the step once more when it flips)."""

    x_history: Optional[torch.Tensor]
    g_history: Optional[torch.Tensor]
    delayed: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # F.linear would compute in the autocast dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        delayed = self.delayed
        out = Fp8Matmul.apply(x, self.weight, self.x_history, self.g_history, delayed)
        if self.x_history is not None and not delayed and torch.is_grad_enabled():
            # this step's backward fills g_history before the next step reads it (an evaluation's
            # forward without gradients has no backward, so it does not count)
            self.delayed = True
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        if linear.bias is not None:
            raise ValueError("Fp8Linear takes projections without a bias")
        with torch.device("meta"):  # no second weight is ever allocated
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        histories = {"x_history": None, "g_history": None}
        if SCALING == "delayed":
            histories = {k: torch.zeros(HISTORY, device=linear.weight.device) for k in histories}
        elif SCALING != "dynamic":
            raise ValueError(f"fp8_linear.SCALING {SCALING!r}: choose dynamic or delayed")
        for name, history in histories.items():
            new.register_buffer(name, history, persistent=False)  # checkpoints keep the same keys
        return new
