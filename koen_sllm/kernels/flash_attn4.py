"""FlashAttention-4's kernels (the ``flash-attn-4`` package) as torch custom ops, for ``--attn fa4``.

FA4 is written in CUTLASS's CuTe DSL and compiled on first use for the GPU at hand; on Hopper
(H100/H200, sm90) it runs the wgmma/TMA kernels of FlashAttention-3's design, which cuDNN's and
PyTorch's SDPA kernels do not match at small head sizes. Its own ``autograd.Function`` is opaque
to torch.compile, so the forward and the backward are registered here as custom ops with shape
functions: Inductor compiles the rest of the layer around them without a graph break, and the
outputs are contiguous, as the shape functions promise.

The package is optional (``pip install -e ".[fa4]"``) and imported only when ``--attn fa4`` asks
for it. Its backward adds the gradient of each query block with atomic additions unless
``torch.use_deterministic_algorithms(True)`` is on (or :data:`deterministic_backward` says
otherwise), so two runs may differ in the last bits.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

INTERFACE = "flash_attn.cute.interface"  # where flash-attn-4 keeps _flash_attn_fwd / _flash_attn_bwd
INSTALL_COMMAND = 'pip install -e ".[fa4]"'
CACHE_SWITCH = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"  # read by flash-attn-4 when it is imported
MIN_CAPABILITY = (9, 0)  # FA4's backward runs on Hopper (sm90) and newer

_interface: Any = None  # bound by load(); tests bind a reference implementation

# The backward's order of additions: None follows torch.use_deterministic_algorithms; True or False
# forces FA4's ordered (semaphore) or atomic accumulation of dQ, which benchmarks compare.
deterministic_backward: bool | None = None


def backward_is_deterministic() -> bool:
    if deterministic_backward is not None:
        return deterministic_backward
    return torch.are_deterministic_algorithms_enabled()


def flash_attn_spec() -> Any:
    """The import spec of ``flash_attn`` without importing it (None when absent). FlashAttention-2's
    package and flash-attn-4 both install there: FA2 with its ``__init__``, FA4 as its ``cute`` folder."""
    try:
        return importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        return None


def installed() -> bool:
    """Whether flash-attn-4 is there, without importing it (its import loads a compiler: seconds)."""
    if _interface is not None:  # already loaded
        return True
    spec = flash_attn_spec()
    folders = spec.submodule_search_locations if spec else None
    return any((Path(folder) / "cute" / "interface.py").is_file() for folder in folders or ())


def load() -> Any:
    """The flash-attn-4 interface module (ImportError if it is missing or not FA4)."""
    global _interface
    if _interface is None:
        # FA4 compiles its kernels for this GPU in every new process (6-9 s at start-up) unless its
        # disk cache is on; the cache is keyed by FA4's sources and versions and written under a
        # file lock, so ranks share it. FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=0 turns it off.
        os.environ.setdefault(CACHE_SWITCH, "1")
        module = importlib.import_module(INTERFACE)
        if not all(hasattr(module, name) for name in ("_flash_attn_fwd", "_flash_attn_bwd")):
            raise ImportError(f"{INTERFACE} has no _flash_attn_fwd/_flash_attn_bwd; it is not flash-attn-4")
        _interface = module
    return _interface


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


@torch.library.custom_op("koen_sllm::fa4_forward", mutates_args=())
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``: ``(out [B, T, H, D], lse [B, H, T])``."""
    out, lse = load()._flash_attn_fwd(*_contiguous(q, k, v), causal=True, return_lse=True)[:2]
    return _contiguous(out, lse)


@fa4_forward.register_fake
def _(q, k, v):
    b, t, h, _ = q.shape
    return q.new_empty((b, t, h, v.shape[-1])), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("koen_sllm::fa4_backward", mutates_args=())
def fa4_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k and v (contiguous, the inputs' shapes and dtype)."""
    q, k, v, out, dout, lse = _contiguous(q, k, v, out, dout, lse)
    grads = load()._flash_attn_bwd(q, k, v, out, dout, lse, causal=True,
                                   deterministic=backward_is_deterministic())
    return _contiguous(*grads[:3])


@fa4_backward.register_fake
def _(dout, q, k, v, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_backward(dout, q, k, v, out, lse)


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, softmax scale ``1/sqrt(D)``; K/V may have fewer heads (grouped-query)."""
    return fa4_forward(q, k, v)[0]
