"""The model as transformers sees it: config.json, weight names, and the way back.

KoEnLM holds q, k and v as one fused matrix and may tie its head to the embedding;
transformers' LlamaForCausalLM / Qwen3ForCausalLM keep q_proj, k_proj, v_proj apart
and save a tied head once. Every checkpoint is written through :func:`hf_state_dict`,
so it is also a model directory transformers loads offline; :func:`load_hf_state_dict`
reads it back (or weights saved by transformers).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..config import ConfigError
from ..model import KoEnLM, ModelConfig
from ..rotary import qkv_split


def architecture(c: ModelConfig) -> str:
    return "Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM"


def hf_config(model: KoEnLM, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """``config.json`` for LlamaForCausalLM (Qwen3ForCausalLM with QK-norm).

    Writes RoPE both as ``rope_theta`` (transformers 4.x) and ``rope_parameters``
    (5.x) so the directory loads under either. No dtype: loaders take it from the weights.
    """
    c = model.cfg
    d: dict[str, Any] = {
        "architectures": [architecture(c)],
        "model_type": "qwen3" if c.qk_norm else "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if c.qk_norm:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    else:
        d.update(mlp_bias=False, pretraining_tp=1)
    return d


def config_from_hf(d: Mapping[str, Any], **overrides) -> ModelConfig:
    """Rebuild the model's config from a ``config.json`` dict written by :func:`hf_config`
    (or any plain Llama / Qwen3 config this model can represent)."""
    model_type = d.get("model_type")
    if model_type not in ("llama", "qwen3"):
        raise ConfigError(f"config.json model_type {model_type!r} is not supported; expected 'llama' or 'qwen3'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json rope type {rope_type!r} is not supported; only plain RoPE ('default')")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                    ("use_sliding_window", False)):
        if d.get(key, ok) != ok:
            raise ConfigError(f"config.json {key}={d[key]!r} is not supported (this model uses {ok!r})")
    heads = int(d["num_attention_heads"])
    values = dict(
        vocab_size=int(d["vocab_size"]),
        max_seq_len=int(d["max_position_embeddings"]),
        hidden_size=int(d["hidden_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        intermediate_size=int(d["intermediate_size"]),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        init_std=float(d.get("initializer_range", 0.02)),
    )
    values.update(overrides)
    return ModelConfig(**values)


def fused_blocks(model: KoEnLM, name: str) -> Optional[list[tuple[str, int]]]:
    """For a fused projection's name in this model's state dict, the transformers names of its
    row blocks, in order, with their row counts; None for any other name."""
    suffix = "self_attn.qkv_proj.weight"
    if not name.endswith(suffix):
        return None
    prefix = "model." + name[: -len(suffix)] + "self_attn."
    rows = qkv_split(model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim)
    return [(prefix + part + "_proj.weight", n) for part, n in zip("qkv", rows)]

def _layout(model: KoEnLM) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Each state-dict entry -> the transformers tensors it holds: [(name, shape)], several
    for a fused projection, none for a tied head (transformers saves it once, as the embedding)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            out[name] = [] if model.cfg.tie_embeddings else [(name, tuple(tensor.shape))]
        elif (blocks := fused_blocks(model, name)) is not None:
            out[name] = [(hf, (rows, *tensor.shape[1:])) for hf, rows in blocks]
        else:
            out[name] = [("model." + name, tuple(tensor.shape))]
    return out

def hf_state_dict(model: KoEnLM, state: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Weights under transformers' names, detached, contiguous and unshared (ready for
    safetensors): the fused q/k/v matrix split into transformers' three; a tied head left out,
    as transformers itself saves it. ``state``: this model's own state dict to convert
    instead of its current weights (the optimizer's fp32 masters, say)."""
    state = model.state_dict() if state is None else state
    out = {}
    for name, parts in _layout(model).items():
        if not parts:
            continue
        tensor = state[name].detach()
        if len(parts) == 1:
            out[parts[0][0]] = tensor.contiguous()
        else:  # row blocks of one tensor share its memory, which safetensors refuses: copies
            for (hf, shape), block in zip(parts, tensor.split([shape[0] for _, shape in parts])):
                out[hf] = block.clone()
    return out

@torch.no_grad()
def load_hf_state_dict(model: KoEnLM, sd: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`hf_state_dict` or by transformers. Every weight must
    be present with the right shape; a tied head may be present or not."""
    given = dict(sd)
    if model.cfg.tie_embeddings and "lm_head.weight" in given:
        head = given.pop("lm_head.weight")
        emb = given.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(head.to(emb.dtype), emb):
            raise ValueError("lm_head.weight differs from embed_tokens.weight, but the config ties them; "
                             "load with tie_embeddings=False")
    layout = _layout(model)
    expected = {hf: shape for parts in layout.values() for hf, shape in parts}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"weight {name}: shape {tuple(given[name].shape)} in the state dict, "
                             f"{shape} in the model (different preset or vocabulary?)")
    own = {name: given[parts[0][0]] if len(parts) == 1 else torch.cat([given[hf] for hf, _ in parts])
           for name, parts in layout.items() if parts}
    model.load_state_dict(own, strict=not model.cfg.tie_embeddings)
