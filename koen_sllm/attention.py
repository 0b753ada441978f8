"""Causal self-attention kernels: PyTorch SDPA with a selectable backend, flash-attn or FlashAttention-4.

``--attn`` picks the kernel:

- ``auto``: on a Hopper GPU (H100, H200) in bf16/fp16 with flash-attn-4 installed,
  FlashAttention-4 (measured faster there: :func:`auto_takes_fa4`); otherwise, on CUDA,
  cuDNN attention first, then FlashAttention-2, memory-efficient and math, in that
  priority (PyTorch falls through to the next one that accepts the inputs); elsewhere
  PyTorch chooses. The choice is made once the model sits on its device
  (``KoEnLM.check_attention``).
- ``cudnn`` / ``flash`` / ``efficient``: exactly that PyTorch CUDA kernel, or an error.
- ``math``: the reference implementation (any device, any dtype; slow).
- ``flash-attn``: the ``flash-attn`` package (CUDA, bf16/fp16).
- ``fa4``: FlashAttention-4, the ``flash-attn-4`` package (Hopper and newer, bf16/fp16;
  kernels/flash_attn4.py).

Everything in :func:`causal_attention` is traceable by ``torch.compile`` without
graph breaks: the backend is a Python string fixed per model, ``sdpa_kernel`` is
understood by dynamo, and the mask is ``is_causal=True`` rather than a tensor.

Availability is checked twice: :func:`check_backend` when the model is built
(CUDA present, package installed), and :func:`probe_backend` once the model sits
on its device, running a tiny forward and backward with the real head shapes and
dtype so that an unsupported combination fails at start-up with a readable
message instead of inside the first compiled step.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import TorchVersion

from .config import ATTN_BACKENDS
from .errors import UsageError
from .kernels import flash_attn4

# enable_gqa arrived in torch 2.5, set_priority in sdpa_kernel a release later.
_HAS_ENABLE_GQA = TorchVersion(torch.__version__) >= (2, 5)
_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
_HAS_CUDNN_SDPA = hasattr(SDPBackend, "CUDNN_ATTENTION")

_FIXED_KERNELS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
if _HAS_CUDNN_SDPA:
    _FIXED_KERNELS["cudnn"] = [SDPBackend.CUDNN_ATTENTION]
    _AUTO_CUDA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                  SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
else:
    _AUTO_CUDA = None

# Kernels that take fewer K/V heads than query heads (enable_gqa) in every torch
# release that has the flag. cuDNN takes them since torch 2.8 (pytorch#150337);
# there, on Hopper, cuDNN and auto on CUDA in bf16/fp16 (which picks cuDNN, else
# flash) pass the grouped K/V straight through, which saves writing K/V at the full
# head count and reducing their gradients back, with the same loss curve
# (docs/benchmarks.md). Elsewhere cuDNN gets K/V expanded: on B200 its
# attention has given wrong results with fewer than 8 K/V heads (pytorch#193893),
# and no other GPU generation has been checked. The memory-efficient kernel, and auto
# in fp32 on CUDA (which lands on it), always get K/V expanded.
_NATIVE_GQA = {"flash", "math"}
_CUDNN_GQA_TORCH = TorchVersion(torch.__version__) >= (2, 8)
_HALF = (torch.bfloat16, torch.float16)

_CUDA_KERNEL_NAMES = {
    "cudnn": "cuDNN attention",
    "flash": "PyTorch's FlashAttention-2 kernel",
    "efficient": "the memory-efficient attention kernel",
}

_flash_attn_func = None  # bound on first use by _load_flash_attn()


class AttentionBackendError(UsageError, RuntimeError):
    """The requested attention backend cannot run here. ``reason`` says why (with its own remedy
    where there is one, such as an install command), ``instead`` which ``--attn`` to use; the message
    is the two joined. ``--attn auto`` falling back from FA4 quotes the reason alone."""

    def __init__(self, reason: str, instead: str = ""):  # one argument, the message, when unpickled
        super().__init__(f"{reason}; {instead}" if instead else reason)
        self.reason, self.instead = reason, instead


def _where() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__}, device {device}"


def flash_attn_installed() -> bool:
    """Whether FlashAttention-2's package is there: a ``flash_attn`` with its own ``__init__``, not
    the namespace that flash-attn-4 alone leaves (``flash_attn/cute``)."""
    spec = flash_attn4.flash_attn_spec()
    return spec is not None and spec.origin is not None


def _load_flash_attn():
    global _flash_attn_func
    if _flash_attn_func is None:
        from flash_attn import flash_attn_func  # optional dependency: pip install -e ".[flash]"

        _flash_attn_func = flash_attn_func
    return _flash_attn_func


def check_backend(name: str, load: bool = True) -> None:
    """Raise :class:`AttentionBackendError` when ``name`` cannot run on this machine at all.

    Device-independent: it looks for CUDA, cuDNN and the flash-attn / flash-attn-4
    packages, and imports the package (``load``; FA4's import takes seconds, so the start's
    pre-flight only looks for it). Shape- and dtype-specific limits are found by :func:`probe_backend`.
    """
    if name not in ATTN_BACKENDS:
        raise AttentionBackendError(f"--attn {name!r} is unknown", f"choose one of {', '.join(ATTN_BACKENDS)}")
    if name in ("auto", "math"):
        return
    if name == "flash-attn":
        if not flash_attn_installed():
            raise AttentionBackendError(
                f'--attn flash-attn needs the flash-attn package: pip install -e ".[flash]" ({_where()})',
                "or use --attn auto")
        if not torch.cuda.is_available():
            raise AttentionBackendError(f"--attn flash-attn needs a CUDA GPU ({_where()})", "use --attn auto or math")
        if not load:
            return
        try:
            _load_flash_attn()  # bound now, so compiled code reads a global instead of tracing an import
        except (ImportError, OSError) as exc:  # typically a wheel built for another torch/CUDA
            raise AttentionBackendError(
                f"--attn flash-attn: the flash-attn package is installed but does not import ({_first_line(exc)}); "
                "rebuild it against this torch: pip install --no-build-isolation --no-deps --force-reinstall "
                f"flash-attn ({_where()})", "or use --attn auto") from exc
        return
    if name == "fa4":
        _check_fa4(load)
        return
    if name == "cudnn" and (not _HAS_CUDNN_SDPA or not torch.backends.cudnn.is_available()):
        raise AttentionBackendError(f"--attn cudnn needs a CUDA GPU with cuDNN attention ({_where()})",
                                    "use --attn auto")
    if not torch.cuda.is_available():
        raise AttentionBackendError(f"--attn {name} needs a CUDA GPU with {_CUDA_KERNEL_NAMES[name]} ({_where()})",
                                    "on CPU use --attn auto or math")


def _check_fa4(load: bool = True) -> None:
    """--attn fa4 needs a GPU of compute capability 9.0 or newer first, then flash-attn-4 (that imports)."""
    need = "--attn fa4 needs an NVIDIA GPU of compute capability 9.0 or newer (H100, H200, B200)"
    if not torch.cuda.is_available():
        raise AttentionBackendError(f"{need} ({_where()})", "use --attn auto")
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < flash_attn4.MIN_CAPABILITY:
        raise AttentionBackendError(f"{need}; this one has {capability[0]}.{capability[1]} ({_where()})",
                                    "use --attn auto")
    if not flash_attn4.installed():
        raise AttentionBackendError(f"--attn fa4 needs the flash-attn-4 package: {flash_attn4.INSTALL_COMMAND} "
                                    f"({_where()})", "or use --attn auto")
    if not load:
        return
    try:
        flash_attn4.load()  # bound now: compiled code calls the custom op, never an import
    except Exception as exc:  # not FA4 after all, or its compiler's libraries refuse this driver or torch
        raise AttentionBackendError(
            f"--attn fa4: flash-attn-4 is installed but does not import ({type(exc).__name__}: {_first_line(exc)}); "
            f"reinstall it for this torch and driver: {flash_attn4.INSTALL_COMMAND} ({_where()})",
            "or use --attn auto") from exc


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
                     cudnn_grouped: bool = False) -> torch.Tensor:
    """Causal attention over ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, H, D]``.

    ``H`` must be a multiple of ``Hkv`` (grouped-query attention). The softmax
    scale is ``1/sqrt(D)``, as in Llama and Qwen3.
    """
    if backend == "flash-attn":
        flash_attn_func = _flash_attn_func or _load_flash_attn()
        return flash_attn_func(q, k, v, causal=True)  # [B, T, H, D] layout and GQA natively
    if backend == "fa4":
        return flash_attn4.fa4_attention(q, k, v)  # the same layout, GQA natively

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # -> [B, heads, T, D]
    n_rep = q.shape[1] // k.shape[1]
    extra = {}
    if n_rep > 1:
        if native_gqa(backend, q.is_cuda, q.dtype, cudnn_grouped):
            extra["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)

    kernels = _kernels_for(backend, q.is_cuda)
    if kernels is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    elif backend == "auto":
        with sdpa_kernel(kernels, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    else:
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    return out.transpose(1, 2)


def native_gqa(backend: str, is_cuda: bool, dtype: torch.dtype, cudnn_grouped: bool = False) -> bool:
    """Whether ``backend`` gets K/V with fewer heads than q (enable_gqa) rather than expanded ones.
    ``cudnn_grouped``: cuDNN takes them grouped on this GPU (the model's cudnn_grouped_kv, decided
    by :func:`cudnn_takes_grouped_kv` unless an option says otherwise)."""
    if not _HAS_ENABLE_GQA:
        return False
    if backend in _NATIVE_GQA or (backend == "auto" and not is_cuda):
        return True
    return cudnn_grouped and (backend == "cudnn" or (backend == "auto" and dtype in _HALF))


def cudnn_takes_grouped_kv(capability: tuple[int, int]) -> bool:
    """Whether cuDNN attention gets grouped K/V on a GPU of this compute capability: Hopper only."""
    return _CUDNN_GQA_TORCH and capability[0] == 9


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, Hkv * n_rep, T, D]``, each K/V head serving ``n_rep`` query heads."""
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _kernels_for(backend: str, is_cuda: bool) -> Optional[list]:
    """The sdpa_kernel list for ``backend``, or None to leave the choice to PyTorch."""
    if backend == "auto":
        # Without set_priority the list would be an unordered allow-list, which
        # is what PyTorch does anyway.
        return _AUTO_CUDA if (is_cuda and _HAS_SET_PRIORITY) else None
    return _FIXED_KERNELS[backend]


def probe_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cudnn_grouped: bool = False,
) -> None:
    """Run one tiny forward + backward through ``name`` with these shapes, on the path training will
    take (``cudnn_grouped`` as in :func:`causal_attention`); raise a clear error if it fails.

    ``dtype`` is what attention will see during training: the autocast dtype
    (bf16/fp16) or float32 without autocast.
    """
    check_backend(name)
    device = torch.device(device)
    if name in ("flash-attn", "fa4") and dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(f"--attn {name} needs bf16 or fp16 (got {_dtype_name(dtype)})",
                                    "use --bf16, or --attn auto/math")
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((1, 16, num_heads, head_dim), (1, 16, num_kv_heads, head_dim), (1, 16, num_kv_heads, head_dim))
    q, k, v = (torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            causal_attention(q, k, v, name, cudnn_grouped).float().sum().backward()
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            # PyTorch explains each rejected kernel in a warning; the error itself says only "no kernel".
            reasons = list(dict.fromkeys(_first_line(w.message) for w in caught if _first_line(w.message)))
            detail = "; ".join(reasons[:4]) or _first_line(exc)
            raise AttentionBackendError(
                f"--attn {name} cannot run {num_heads}/{num_kv_heads} heads of dim {head_dim} in "
                f"{_dtype_name(dtype)} on {device} ({_where()}): {detail}", "use --attn auto") from exc


# Where `auto` runs FlashAttention-4 when the package is there: Hopper, where it was measured
# against cuDNN (1.032-1.038x the step at 350m on three H100s, equal at 1.3b; docs/benchmarks.md). Blackwell's
# kernels are FA4's own design too, but no B200 has measured them against cuDNN here.
AUTO_FA4_CAPABILITIES = ((9, 0),)


def _fa4_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this GPU and dtype are where FA4 was measured faster than cuDNN, installed or not."""
    return (device.type == "cuda" and dtype in _HALF
            and tuple(torch.cuda.get_device_capability(device)) in AUTO_FA4_CAPABILITIES)


def auto_takes_fa4(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``--attn auto`` should try FlashAttention-4 on ``device`` in ``dtype``."""
    return _fa4_pays(device, dtype) and flash_attn4.installed()


def resolve_auto(device: torch.device | str, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> tuple[str, str]:
    """The kernel ``--attn auto`` runs here, as an ``--attn`` name, and a line saying why.

    FA4 where :func:`auto_takes_fa4` says so and it passes :func:`probe_backend` with these shapes;
    if it is installed but fails (a broken install, an unsupported head size), ``auto`` keeps
    PyTorch's SDPA and the line says what FA4 answered, so a run never stops over a kernel it
    did not ask for by name."""
    device = torch.device(device)
    if not auto_takes_fa4(device, dtype):
        hint = f" (FlashAttention-4 is faster on this GPU: {flash_attn4.INSTALL_COMMAND})" \
            if _fa4_pays(device, dtype) else ""
        return "auto", ("PyTorch SDPA, cuDNN first" if device.type == "cuda" else "PyTorch SDPA") + hint
    try:
        probe_backend("fa4", device, dtype, num_heads, num_kv_heads, head_dim)
    except AttentionBackendError as exc:  # its advice (use --attn auto) is what this run already does
        return "auto", f"PyTorch SDPA, cuDNN first (FlashAttention-4 did not run: {_first_line(exc.reason)})"
    return "fa4", "FlashAttention-4 (flash-attn-4 on a Hopper GPU)"


def _first_line(obj) -> str:
    lines = str(obj).strip().splitlines()
    return lines[0] if lines else ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
