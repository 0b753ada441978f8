"""liger-kernel's Triton kernels swapped into a KoEnLM, for measuring them as a throughput lever.

Used by ``benchmarks/bench_throughput.py --liger rmsnorm,swiglu,rope,flce`` (or ``all``)
on a GPU with ``liger-kernel`` installed (``pip install liger-kernel``; a pure-Python
wheel). Only the forward methods of this one model instance are replaced (the rope part
replaces ``Attention.rotate``, which only QK-norm models still call: the others rotate q and k
with ``rotary.rotate_qkv`` on the fused q/k/v output); the
weights and their names stay as they are. Each kernel keeps the model's numerics:
RMSNorm in fp32 then cast back before the scale ("llama" casting), RoPE on the
same cos/sin tables, cross-entropy in fp32 with the head's matmul in bf16.
"""
from __future__ import annotations

import types

import torch

PARTS = ("rmsnorm", "swiglu", "rope", "flce")


def apply_liger(model, parts: str) -> str:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    from koen_sllm.losses import IGNORE_INDEX, compute_dtype
    from koen_sllm.model import MLP, Attention, RMSNorm

    chosen = PARTS if parts == "all" else tuple(p.strip() for p in parts.split(","))
    unknown = set(chosen) - set(PARTS)
    if unknown:
        raise SystemExit(f"--liger: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)} or all")

    def rmsnorm_forward(self, x):
        shape = x.shape
        dtype = compute_dtype(x)
        y = LigerRMSNormFunction.apply(x.reshape(-1, shape[-1]).to(dtype), self.weight, self.eps, 0.0, "llama", False)
        return y.view(shape)

    def swiglu_forward(self, x):
        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

    def rotate(self, q, k, cos, sin, dtype):  # liger's kernel takes [B, heads, T, D]
        q, k = LigerRopeFunction.apply(q.transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    def flce_loss(self, hidden, targets):
        dtype = compute_dtype(hidden)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        return LigerFusedLinearCrossEntropyFunction.apply(
            h, self.lm_head.weight.to(dtype), targets.reshape(-1), None, None, IGNORE_INDEX, 0.0, 0.0, "mean",
            None, False, torch.float32)

    for module in model.modules():
        if "rmsnorm" in chosen and isinstance(module, RMSNorm):
            module.forward = types.MethodType(rmsnorm_forward, module)
        if "swiglu" in chosen and isinstance(module, MLP):
            module.forward = types.MethodType(swiglu_forward, module)
        if "rope" in chosen and isinstance(module, Attention):
            module.rotate = types.MethodType(rotate, module)
    if "flce" in chosen:
        model.compute_loss = types.MethodType(flce_loss, model)
    return "swapped in " + ", ".join(chosen)
