"""FP8 training of the decoder layers' projections (--fp8), through torchao.float8.

:func:`convert_to_fp8` swaps each decoder layer's ``qkv_proj``, ``o_proj``, ``gate_proj``,
``up_proj`` and ``down_proj`` for torchao's ``Float8Linear``: the three matmuls of each (output,
input gradient, weight gradient) then run on FP8 tensor cores, their inputs scaled dynamically, one
scale per tensor (``tensorwise``) or per row (``rowwise``). ``Float8Linear`` holds the very
``weight`` parameter of the layer it replaces, so nothing else changes: the state dict has the same
names and tensors, the optimizer (and its fp32 masters) keeps the parameters it was built with, and
checkpoints stay plain bf16/fp32 safetensors that load in transformers, into an FP8 run or a bf16
one alike. The output layer, the embedding, the norms and attention stay in bf16; a projection
whose sizes are not multiples of 16 (the FP8 matmul's requirement) stays in bf16 too. (A tensorwise
linear of the project's own over ``torch._scaled_mm`` ran 1.01x torchao's on an H100 but its loss
curve lay outside bf16's noise where torchao's lay inside; it was retired: docs/benchmarks.md,
seventh round.)

The DDP engine converts the model once, after any weights are loaded and before DDP and
torch.compile (engines/ddp.py). torchao is optional (``pip install 'koen-sllm[fp8]'``) and
imported here alone, only when --fp8 runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from .config import FP8_MODES, FP8_MULTIPLE
from .errors import UsageError

# The layers converted, by their attribute name (model.py's Attention and MLP).
PROJECTIONS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89) and Hopper (sm90) onwards
INSTALL_COMMAND = "pip install 'koen-sllm[fp8]'"
_NO_GPU = ("--fp8 needs an NVIDIA GPU with FP8 support (compute capability 8.9 or newer: H100, H200, L4, "
           "RTX 4090); this run has none — drop --fp8")


class Fp8Unavailable(UsageError, RuntimeError):
    """--fp8 was asked for where it cannot run (no torchao, no FP8 GPU); one line with the fix."""


def require_torchao(asked: str = "--fp8") -> Any:
    """``torchao.float8``, or Fp8Unavailable with the install command; ``asked`` names what needs
    torchao (the way to run without it is always to drop --fp8)."""
    try:
        import torchao.float8 as float8
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing and missing != "torchao" and not missing.startswith("torchao."):
            raise Fp8Unavailable(f"{asked}: torchao is installed but its dependency {missing!r} is missing; "
                                 f"install both with: {INSTALL_COMMAND}, or drop --fp8") from None
        raise Fp8Unavailable(f"{asked} needs the torchao package, which is not installed; install it with: "
                             f"{INSTALL_COMMAND} (in a checkout: pip install -e '.[fp8]'), or drop --fp8") from None
    except Exception as exc:  # a wheel built for another torch fails in any way
        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise Fp8Unavailable(f"{asked}: torchao is installed but fails to import ({why}); install a torchao that "
                             f"matches torch {torch.__version__} ({INSTALL_COMMAND}), or drop --fp8") from None
    return float8


def check_fp8_device(device: torch.device | str) -> None:
    """Fp8Unavailable unless ``device`` is a GPU with FP8 matmuls (compute capability 8.9 or newer)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise Fp8Unavailable(_NO_GPU)
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise Fp8Unavailable(
            f"--fp8 needs an NVIDIA GPU with FP8 support (compute capability 8.9 or newer: H100, H200, L4, RTX 4090); "
            f"this run's GPU {name} has compute capability {capability[0]}.{capability[1]} — drop --fp8")


def check_fp8_support(device: torch.device | str, recipe: str = "tensorwise") -> None:
    """Everything --fp8 ``recipe`` needs at run time: the GPU first (its error is the one a CPU run must
    see), then torchao."""
    check_fp8_device(device)
    require_torchao(f"--fp8 {recipe}")


def converts(module: nn.Module, fqn: str) -> bool:
    """The module filter: a decoder layer's projection whose sizes FP8 matmuls take; never the output layer."""
    if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] not in PROJECTIONS:
        return False
    return module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0


def _require_recipe(recipe: str) -> None:
    if recipe not in FP8_MODES or recipe == "off":
        raise ValueError(f"--fp8 {recipe!r} is not an FP8 recipe; choose one of {', '.join(FP8_MODES[1:])}")


def fp8_config(recipe: str, *, emulate: bool = False) -> Any:
    """torchao's Float8LinearConfig for ``recipe`` (tensorwise / rowwise). ``emulate``: torchao's own
    emulation of the FP8 matmuls in higher precision, which runs on any device (tests)."""
    _require_recipe(recipe)
    config = require_torchao().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config


def convert_to_fp8(model: nn.Module, recipe: str, device: Optional[torch.device | str] = None, *,
                   emulate: bool = False) -> list[str]:
    """Swap the model's projections for torchao's FP8 linears in place; returns the converted layers' names.

    Checks ``device`` first unless ``emulate``, which is for tests on the CPU: torchao then
    emulates its FP8 matmuls in higher precision. Call once, before DDP and torch.compile wrap the
    model: they must see the swapped modules."""
    _require_recipe(recipe)
    if not emulate:
        check_fp8_support(device if device is not None else next(model.parameters()).device, recipe)
    if already := fp8_layers(model):
        raise RuntimeError(f"the model is already converted to FP8 ({len(already)} layers); convert it once")
    require_torchao().convert_to_float8_training(model, config=fp8_config(recipe, emulate=emulate),
                                                 module_filter_fn=converts)
    return fp8_layers(model)


def fp8_layers(model: nn.Module) -> list[str]:
    """The names of the model's layers that run their matmuls in FP8 (torchao's Float8Linear)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]


def describe(model: nn.Module, recipe: str) -> str:
    """One log line: what runs in FP8, through what, and what stays in bf16."""
    converted = set(fp8_layers(model))
    kept = [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS and name not in converted]
    line = (f"fp8 ({recipe} scaling): {len(converted)} projections' matmuls in FP8 through torchao.float8; "
            "the output layer, the embedding and attention in bf16; MFU stays against the dense bf16 peak")
    if kept:
        line += f"; {len(kept)} kept in bf16 (sizes not multiples of {FP8_MULTIPLE}: {', '.join(kept[:3])}" + \
                (", ..." if len(kept) > 3 else "") + ")"
    return line
