"""Decoder-only Llama / Qwen3-style language model, its presets, FLOPs and HF weight mapping.

RMSNorm, rotary position embeddings (the Hugging Face ``rotate_half`` layout),
SwiGLU, grouped-query attention, optional tied embeddings and optional per-head
QK-norm (Qwen3). Parameter names follow ``transformers``, except that q/k/v are one
fused matrix (one wide matmul instead of three, two of them narrow);
:meth:`KoEnLM.hf_state_dict` splits it and adds the ``model.`` prefix, so every
checkpoint loads as ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM`` with QK-norm)
and gives the same logits. The model knows nothing of devices, precision or
distribution; the trainer owns those.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import causal_attention, check_backend, cudnn_takes_grouped_kv, probe_backend, resolve_auto
from .config import ATTN_BACKENDS, ConfigError
from .losses import IGNORE_INDEX, chunked_linear_cross_entropy, fused_ce_runs, fused_linear_cross_entropy
from .rotary import apply_rope, qkv_split, rope_tables, rotate_qkv


@dataclass
class ModelConfig:
    vocab_size: int
    max_seq_len: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: Optional[int] = None  # None -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    init_std: float = 0.02
    # Runtime choices: they change speed and memory, never the weights or the output.
    attn_backend: str = "auto"
    activation_checkpointing: bool = False
    ce_chunk_tokens: int = 0  # >0: output layer + cross-entropy this many tokens at a time (losses.py)
    # A torch dtype name ("bfloat16") for the residual stream, or None to keep the embedding's
    # (fp32 under autocast, as transformers). Half the bytes for every norm and residual add,
    # at the cost of rounding each add to bf16 (Megatron's default with bf16 parameters).
    residual_dtype: Optional[str] = None
    # Kernel choices, each decided by measurement (docs/benchmarks.md) and set by a run option.
    loss_kernel: bool = True  # the loss and its gradient in one Triton pass on a GPU in bf16 (losses.py)
    rope_kernel: bool = False  # the rotation's forward through the Triton kernel on a GPU (rotary.py)
    # cuDNN attention takes grouped K/V as they are (attention.py); None: decided by check_attention
    # for the GPU it runs on, False elsewhere.
    cudnn_grouped_kv: Optional[bool] = None
    # The kernel attention runs, as an --attn name: attn_backend, except that check_attention turns
    # "auto" into what it chose for the device (FA4 on Hopper when installed). None: attn_backend.
    attn_kernel: Optional[str] = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                                  "set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"--attn {self.attn_backend!r} is unknown; choose one of {', '.join(ATTN_BACKENDS)}")
        if self.ce_chunk_tokens < 0:
            raise ConfigError(f"--ce-chunk-tokens must be 0 (off) or positive, got {self.ce_chunk_tokens}")
        if self.residual_dtype is not None and not (
                isinstance(dtype := getattr(torch, self.residual_dtype, None), torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"residual_dtype {self.residual_dtype!r} is not a floating torch dtype name")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Shapes only; vocab_size and max_seq_len come from the tokenizer and the run.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192),
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048),
    # The transformers-Trainer throughput peer's shape: 336M parameters at vocab 32000.
    "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=4, intermediate_size=2816),
    # Qwen3-0.6B's body (the reference model); 473M parameters at vocab 32000 instead of 151936.
    "0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, qk_norm=True, tie_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=5632),
    # Llama-3-8B's body (reference 002): 7.24B parameters at vocabulary 32,000 instead of 128,256.
    # Meant for DeepSpeed ZeRO-3 with offload (configs/ds_zero3_offload.json, docs/deepspeed.md).
    "8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
               rope_theta=500000.0),
}


def model_config_from_preset(name: str, vocab_size: int, max_seq_len: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"--model-size {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    values = {**PRESETS[name], **overrides}
    return ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **values)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers' LlamaRMSNorm: statistics in
        # fp32, cast back, then scale (bit-for-bit equal logits in fp32).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg  # shared with the model: check_attention settles attn_kernel and cudnn_grouped_kv later
        # q, k and v come out of one product: a wide matmul runs at the full matmul rate, where
        # narrow k and v products fall well short of it (their weight gradients need cuBLAS's
        # split-K and its extra reductions; docs/benchmarks.md). transformers'
        # q_proj, k_proj and v_proj are its row blocks, in that order (see KoEnLM.hf_state_dict).
        self.qkv_split = qkv_split(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_split), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.q_norm is None:
            # One operator rotates q and k; its backward writes the fused gradient in one pass
            # (autograd's own ends in a slow concatenation: rotary.py).
            q, k, v = rotate_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim,
                                 self.cfg.rope_kernel)
        else:
            q, k, v = qkv.split(self.qkv_split, dim=-1)
            q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim)))
            k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim)))
            v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
            # v carries the matmul dtype (bf16 under autocast); the norm weights and
            # the fp32 rotation would otherwise promote q and k to fp32.
            q, k = self.rotate(q, k, cos, sin, v.dtype)
        out = causal_attention(q, k, v, self.cfg.attn_kernel or self.cfg.attn_backend, bool(self.cfg.cudnn_grouped_kv))
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on ``q, k [B, T, heads, D]`` in fp32, returned in ``dtype``."""
        return apply_rope(q, cos, sin).to(dtype), apply_rope(k, cos, sin).to(dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Separate gate and up, unlike q/k/v: both are wide enough for the matmul units, and the
        # gradient of a fused gate/up output is a concatenation, which Inductor lowers as one
        # masked kernel over the fused width; the compiled SwiGLU backward then loses more than
        # the fused matmul gains (docs/benchmarks.md).
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------- the model


class KoEnLM(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        """``init_weights=False`` leaves every parameter as its layer's constructor left it, for a
        caller that initialises them itself with :meth:`init_parameter` (one parameter at a time,
        e.g. while a partitioned parameter is gathered); the result equals :meth:`reset_parameters`."""
        super().__init__()
        check_backend(cfg.attn_backend)  # fail at build time, not in the first compiled step
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init_weights:
            self.reset_parameters()

    # ------------------------------------------------------------ init and switches
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std); the projections that write into the residual stream
        (o_proj, down_proj) scaled by 1/sqrt(2 x layers) so the stream's variance
        does not grow with depth (GPT-2); norms at one. Deterministic under
        torch.manual_seed: parameters are visited in registration order."""
        for name, p in self.named_parameters():  # a tied head is visited once, as embed_tokens
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """Initialise the parameter called ``name`` in place (see :meth:`reset_parameters`);
        visiting every parameter in ``named_parameters()`` order gives the same weights."""
        c = self.cfg
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(0.0, c.init_std / math.sqrt(2 * c.num_layers))
        else:
            # The fused q/k/v block by block, in transformers' order: the same seed gives
            # the same weights as separate q/k/v matrices did.
            rows = qkv_split(c.num_heads, c.num_kv_heads, c.head_dim) if name.endswith("qkv_proj.weight") \
                else [p.shape[0]]
            for block in p.split(rows):
                block.normal_(0.0, c.init_std)

    def parameters_read_directly(self) -> list[nn.Parameter]:
        """Parameters this module's forward reads itself rather than through their own layer's
        forward: the output layer's weight, which the fused and chunked losses take as a matrix.
        A wrapper that fetches weights per layer call (ZeRO-3) must fetch these for the whole model."""
        return [self.lm_head.weight]

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward: ~1/3 more compute, far less memory."""
        self.cfg.activation_checkpointing = bool(enabled)

    def check_attention(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """Settle the attention kernel for ``device`` in ``dtype`` (the autocast dtype, or fp32) and
        probe it with this model's head shapes; raises AttentionBackendError. Returns a line naming
        the kernel (for ``auto``: what it chose and why)."""
        c, device = self.cfg, torch.device(device)
        if c.cudnn_grouped_kv is None:  # one GPU kind per process: decided once, for this one
            c.cudnn_grouped_kv = device.type == "cuda" and cudnn_takes_grouped_kv(torch.cuda.get_device_capability(device))
        note = c.attn_backend
        if c.attn_backend == "auto":
            c.attn_kernel, why = resolve_auto(device, dtype, c.num_heads, c.num_kv_heads, c.head_dim)
            note = f"auto: {why}"
            if c.attn_kernel == "fa4":
                return note  # resolve_auto took FA4 only after it passed its probe
        else:
            c.attn_kernel = c.attn_backend
        probe_backend(c.attn_kernel, device, dtype, c.num_heads, c.num_kv_heads, c.head_dim, bool(c.cudnn_grouped_kv))
        return note

    # ------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` without targets; the mean fp32 cross-entropy with them
        (targets equal to -100 are ignored). With targets the full logits are not returned."""
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        x = self.embed_tokens(input_ids)
        if self.cfg.residual_dtype is not None:
            x = x.to(getattr(torch, self.cfg.residual_dtype))
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        use_ckpt = self.cfg.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        return self.compute_loss(x, targets)

    def compute_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, C]`` -> mean cross-entropy. The head's matmul may
        run in bf16 under autocast; the softmax is taken in fp32. With ``ce_chunk_tokens``
        the full logits are never held (same loss, far less memory; losses.py)."""
        if self.cfg.ce_chunk_tokens:
            return chunked_linear_cross_entropy(hidden, self.lm_head.weight, targets, self.cfg.ce_chunk_tokens)
        if fused_ce_runs(hidden, self.cfg.loss_kernel):
            return fused_linear_cross_entropy(hidden, self.lm_head.weight, targets)
        logits = self.lm_head(hidden)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied head counts once). ``non_embedding`` leaves out the
        token-embedding matrix, and with it a head that is tied to it."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:
        6 x (parameters other than the input embedding, the head counted even when tied)
        + 12 x layers x attention width x seq_len, attention width = heads x head_dim
        (the hidden size in every preset except 0.6b, whose heads are wider)."""
        c = self.cfg
        matmul_params = self.num_params(non_embedding=True) + (c.vocab_size * c.hidden_size if c.tie_embeddings else 0)
        return 6 * matmul_params + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
