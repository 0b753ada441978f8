"""The output layer and cross-entropy: a chunk of tokens at a time, or, on a GPU, with the
loss and its gradient from one Triton pass.

With a 32k vocabulary the logits of one micro-batch are large: 8 x 2048 tokens
x 32,000 entries are 1 GiB in bf16, 2 GiB more as fp32 for the softmax, and the
same again for their gradient. ``chunked_linear_cross_entropy`` never holds more
than ``chunk`` tokens' logits: for each chunk it computes the logits, the loss
and, at once, the gradients of the hidden states and of the head's weight (the
softmax gradient is known in forward), so backward only rescales them.

Numerics follow the plain path (``lm_head`` under autocast, then fp32
cross-entropy): the matmuls run in the autocast dtype, logits are rounded to it
and the softmax is taken in fp32. The head's weight gradient is summed over
chunks in fp32.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

IGNORE_INDEX = -100  # target id that contributes nothing to the loss (the HF convention)

# CUDA builds of torch bring triton on Linux; without it the fused loss is not offered.
_HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Whether the loss runs on a GPU in bf16 through the Triton kernel (fused_linear_cross_entropy: the
# loss and its gradient in one pass) or F.cross_entropy, which Inductor fuses, is the model's
# ``loss_kernel`` option (--loss-kernel / --no-loss-kernel). The kernel is the default because the
# loss is memory-bound: one launch that writes each row's gradient while the row is partly still in
# L2 moves fewer bytes than a forward and a backward that each read the logits from memory
# (timings in docs/benchmarks.md).


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``t`` run in: autocast's when it is on for t's device, else t's own."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _ce_sum_and_grad(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                     need_grad: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The summed cross-entropy of fp32 ``logits [N, V]`` over the rows where ``keep``, and (with
    ``need_grad``) its gradient, softmax - one_hot(target), zero on the other rows, in fp32."""
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    loss_sum = torch.where(keep, lse - picked, torch.zeros_like(lse)).sum()
    if not need_grad:
        return loss_sum, None
    grad = (logits - lse[:, None]).exp_()
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse, -1.0)[:, None])
    grad.mul_(keep[:, None])
    return loss_sum, grad


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != IGNORE_INDEX
            count = valid.sum()
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            need_grad = any(ctx.needs_input_grad[:2])  # not under no_grad (validation)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
            for start in range(0, hidden.shape[0], chunk):
                h, t, keep = h_all[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
                logits = (h @ w.t()).float()  # rounded to the matmul dtype first, as the plain path is
                loss_sum, grad = _ce_sum_and_grad(logits, t, keep, need_grad)
                loss += loss_sum
                if not need_grad:
                    continue
                grad = grad.to(dtype)
                grad_hidden[start:start + chunk] = (grad @ w).to(hidden.dtype)
                grad_weight += (grad.t() @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, count.clamp(min=1).float())
        # Mean over counted tokens; no tokens gives 0/0 = nan, as F.cross_entropy does.
        return loss / count.float()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, denom = ctx.saved_tensors
        scale = grad_out / denom
        return (grad_hidden * scale).to(grad_hidden.dtype), (grad_weight * scale).to(grad_weight.dtype), \
            None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [..., C] @ weight[V, C].T`` against ``targets [...]``.

    ``dtype`` is the matmul dtype (default: the autocast dtype when autocast is on,
    else the hidden states'). Targets equal to IGNORE_INDEX do not count."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLinearCE.apply(hidden2d, weight, targets.reshape(-1), int(chunk),
                                  dtype or compute_dtype(hidden2d))


# ---------------------------------------------------------------- the loss and its gradient at once
def fused_ce_offered(is_cuda: bool, dtype: torch.dtype, enabled: bool = True) -> bool:
    """Whether training on this device in this matmul dtype takes its loss from the Triton kernel:
    ``enabled`` (the model's loss_kernel), on a GPU with triton, in bf16 (fp16 would round the tiny
    per-token gradients to zero before the loss scale reached them)."""
    return enabled and is_cuda and _HAVE_TRITON and dtype == torch.bfloat16


def fused_ce_runs(hidden: torch.Tensor, enabled: bool = True) -> bool:
    """Whether :func:`fused_linear_cross_entropy` takes the loss of ``hidden`` here: where it is
    offered, with gradients wanted (validation keeps the plain loss)."""
    return torch.is_grad_enabled() and fused_ce_offered(hidden.is_cuda, compute_dtype(hidden), enabled)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [..., C] @ weight[V, C].T`` against ``targets [...]``, the
    same numbers as the plain path (logits rounded to ``dtype``, fp32 softmax, the logits' gradient
    rounded to ``dtype``), with the gradient of the logits computed in the forward, over the
    logits themselves: backward is the head's two matmuls, scaled. On a GPU one Triton kernel
    does the loss and the gradient (kernels/cross_entropy.py); elsewhere torch operations do the same."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    return _FusedLinearCE.apply(hidden2d, weight, targets.reshape(-1), dtype or compute_dtype(hidden2d))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        with torch.autocast(hidden.device.type, enabled=False):  # the dtype is chosen already
            h, w = hidden.to(dtype), weight.to(dtype)
            loss, grad_logits = linear_ce_loss_grad(h, w, targets)
        ctx.save_for_backward(h, w, grad_logits)
        ctx.out_dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        h, w, grad_logits = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.out_dtypes
        # grad_out is 1 for a plain backward; scaling the two products, not the logits' gradient,
        # keeps it from being another pass over the [tokens, vocabulary] tensor.
        scale = grad_out.to(torch.float32)
        grad_hidden = (grad_logits @ w).mul_(scale).to(hidden_dtype)
        grad_weight = (grad_logits.t() @ h).mul_(scale).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


@torch.library.custom_op("koen_sllm::linear_ce_loss_grad", mutates_args=())
def linear_ce_loss_grad(hidden: torch.Tensor, weight: torch.Tensor,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean loss, d loss / d logits)`` for ``logits = hidden [N, C] @ weight [V, C].T``, with
    targets equal to IGNORE_INDEX not counted; the gradient in the logits' dtype, its storage the
    logits' own. No counted token gives a nan loss and a zero gradient."""
    logits = hidden @ weight.t()
    count = (targets != IGNORE_INDEX).sum().float()
    scale = (1.0 / count).reshape(1)  # inf when nothing counts; the kernel then writes zeros
    if logits.is_cuda and _HAVE_TRITON:
        from .kernels.cross_entropy import loss_and_grad_in_place  # Triton: imported where a GPU runs it

        row_loss = loss_and_grad_in_place(logits, targets, scale, IGNORE_INDEX)
        return row_loss.sum() / count, logits
    return _loss_grad_reference(logits, targets, count)


@linear_ce_loss_grad.register_fake
def _(hidden, weight, targets):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[0], weight.shape[0])


def _loss_grad_reference(logits: torch.Tensor, targets: torch.Tensor,
                         count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic as torch operations (CPU, or a GPU without triton)."""
    loss_sum, grad = _ce_sum_and_grad(logits.float(), targets, targets != IGNORE_INDEX)
    grad.mul_(torch.where(count > 0, 1.0 / count, 0.0))  # nothing counted: a zero gradient, as the kernel's
    return loss_sum / count, grad.to(logits.dtype)
