"""The output layer and cross-entropy, computed a chunk of tokens at a time.

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

from typing import Optional

import torch

IGNORE_INDEX = -100  # target id that contributes nothing to the loss (the HF convention)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``t`` run in: autocast's when it is on for t's device, else t's own."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


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
                lse = torch.logsumexp(logits, dim=-1)
                safe = torch.where(keep, t, torch.zeros_like(t))
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                loss += torch.where(keep, lse - picked, torch.zeros_like(lse)).sum()
                if not need_grad:
                    continue
                # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows
                grad = (logits - lse[:, None]).exp_()
                grad.scatter_add_(1, safe[:, None], torch.full_like(lse, -1.0)[:, None])
                grad.mul_(keep[:, None])
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
