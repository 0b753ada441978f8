"""One typed configuration for a training run: dataclasses, CLI parsing, validation.

Everything a run needs is parsed once here, validated with messages that name
the offending option, printed at start and saved in every checkpoint. Numbers
that depend on the world size (accumulation steps, tokens per step) are derived
by :func:`derive_batch_plan`, also once. This module touches no files and no
process groups, so it is cheap to import and easy to test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UsageError

MODEL_SIZES = ("tiny", "125m", "350m", "0.6b", "1.3b", "8b")
ATTN_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "flash-attn", "fa4")
# torch.compile modes; "reduce-overhead" replays the compiled forward and backward as CUDA graphs;
# "auto" is one of the others, chosen per run by resolved_compile_mode.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("bf16", "fp16", "fp32")
# --fp8: the decoder layers' projections through torchao.float8 (fp8.py), with one scale per tensor
# or per row; "off" keeps every matmul in the autocast dtype.
FP8_MODES = ("off", "tensorwise", "rowwise")
# FP8 matmuls take both sides of every product in multiples of 16, the micro-batch's tokens
# included (they are the inner side of the weight gradient's product).
FP8_MULTIPLE = 16
DEFAULT_DATA_FILE = "mixed_pretraining.jsonl"

# What --test uses when no GPU exists: small enough for two CPU processes.
CPU_TEST_MODEL = "tiny"
CPU_TEST_SEQ_LEN = 128


class ConfigError(UsageError, ValueError):
    """A bad option value; the message names the option and the fix."""


def repo_root() -> Path:
    """The checkout that holds this package (default paths resolve against it).

    An installed, non-editable copy has no checkout around it; then the
    current directory is the only sensible anchor.
    """
    env = os.environ.get("KOEN_SLLM_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd()


@dataclass
class DataConfig:
    dataset_path: Optional[str] = None  # file or folder; None -> <root>/datasets
    tokenizer_path: Optional[str] = None  # None -> prepared next to the data
    vocab_size: int = 32000  # only used when a tokenizer must be trained
    val_fraction: float = 0.01
    num_proc: int = 0  # tokenization processes; 0 = all cores
    strict: bool = False  # stop at the first malformed input line


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # None -> 1% of steps, at least 1, at most 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class CheckpointConfig:
    output_dir: Optional[str] = None  # None -> <root>/outputs
    save_steps: int = 500
    save_total_limit: Optional[int] = 3
    save_initial: bool = True
    save_final: bool = True  # off only for benchmarks: a run then ends without its last checkpoint
    resume: Optional[str] = None  # "auto", "none" or a path; None -> per mode


@dataclass
class TrainConfig:
    mode: str = "test"  # "test" (quick check) or "train"
    model_size: Optional[str] = None  # None -> per device (tiny on CPU, 0.6b on GPU)
    max_steps: Optional[int] = None  # None -> 10 in test mode, epochs in train mode
    num_epochs: float = 1.0
    batch_size: int = 4  # micro-batch per process
    grad_accum: Optional[int] = None
    global_batch_size: Optional[int] = None  # sequences per optimizer step
    max_seq_length: Optional[int] = None  # None -> 2048 on GPU, 128 on CPU
    precision: Optional[str] = None  # None -> bf16 on GPU, fp32 on CPU
    compile: Optional[bool] = None  # None -> on for GPU, off on CPU
    compile_mode: str = "auto"  # torch.compile mode (COMPILE_MODES); auto: resolved_compile_mode
    attn: str = "auto"
    activation_checkpointing: bool = False
    ce_chunk_tokens: int = 0  # 0: the whole micro-batch's logits at once
    # The residual stream in bf16 instead of fp32. None -> on for bf16 runs: measured 1.03x at
    # 350m and 1.027x at 1.3b with the same 200-step loss curve (docs/benchmarks.md).
    bf16_residual: Optional[bool] = None
    # bf16 model weights with fp32 master weights in the optimizer (master_adamw.py). None -> on
    # for bf16 runs on a GPU without gradient accumulation or DeepSpeed (resolve_weights).
    bf16_weights: Optional[bool] = None
    # AdamW's two moments stored in bf16 by that optimizer (arithmetic in fp32): 8 of its 28 bytes
    # per parameter and step fewer, 4 less to hold. None -> on with bf16 weights and a beta2 of at
    # most BF16_MOMENTS_MAX_BETA2: measured 1.031x at 1.3b and 1.013x at 350m on an H100, the
    # 200-step loss curves within the seed noise (docs/benchmarks.md).
    bf16_moments: Optional[bool] = None
    # Kernel choices (model.ModelConfig), defaults chosen by measurement (docs/benchmarks.md).
    loss_kernel: bool = True  # the loss and its gradient in one Triton pass on a GPU in bf16
    rope_kernel: bool = False  # the rotation's forward through its Triton kernel on a GPU
    cudnn_grouped_kv: Optional[bool] = None  # None: on where cuDNN takes grouped K/V (Hopper)
    fp8: str = "off"  # FP8_MODES: the projections' matmuls in FP8 (fp8.py; H100 and newer, bf16 runs)
    ddp_bucket_mb: float = 25.0  # DDP's gradient bucket size (its own default)
    seed: int = 42
    eval_steps: Optional[int] = None  # None -> 250 (train), end only (test)
    eval_batches: int = 20
    log_steps: Optional[int] = None  # None -> 1 (test), 10 (train)
    max_bad_steps: int = 5
    deepspeed: Optional[str] = None  # path to a ds_config.json, "" = shipped default
    logs_dir: Optional[str] = None  # None -> <root>/logs
    verbose: bool = False
    debug_nan_steps: tuple[int, ...] = ()  # test hook: NaN loss at these step attempts (1-based)
    debug_kill_step: Optional[int] = None  # test hook: rank 0 SIGKILLs itself as this step starts


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    # Paths, resolved against the repository root when relative.
    # A test run has folders of its own, so it never writes into a training run's checkpoints or logs.
    @property
    def output_dir(self) -> Path:
        return _resolve(self.ckpt.output_dir, "outputs/test" if self.train.mode == "test" else "outputs")

    @property
    def logs_dir(self) -> Path:
        return _resolve(self.train.logs_dir, "logs/test" if self.train.mode == "test" else "logs")

    @property
    def dataset_path(self) -> Path:
        return _resolve(self.data.dataset_path, "datasets")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        def build(klass, values):
            names = {f.name for f in dataclasses.fields(klass)}
            kept = {k: v for k, v in (values or {}).items() if k in names}
            if "debug_nan_steps" in kept:
                kept["debug_nan_steps"] = tuple(kept["debug_nan_steps"])
            return klass(**kept)

        return cls(
            train=build(TrainConfig, d.get("train")),
            data=build(DataConfig, d.get("data")),
            optim=build(OptimConfig, d.get("optim")),
            ckpt=build(CheckpointConfig, d.get("ckpt")),
        )


def _resolve(value: Optional[str], default_name: str) -> Path:
    path = Path(value).expanduser() if value else Path(default_name)
    if not path.is_absolute():
        # Explicit relative paths follow the user's shell; defaults follow the repo.
        path = (Path.cwd() / path) if value else (repo_root() / path)
    return path.resolve()


# ---------------------------------------------------------------- device defaults


def resolved_compile_mode(t: TrainConfig, world_size: int, on_cuda: bool) -> str:
    """The torch.compile mode a run uses: --compile-mode, with ``auto`` settled for this run.

    ``auto`` replays the step as CUDA graphs (reduce-overhead) for one process on a GPU, where they
    were measured faster (docs/benchmarks.md, eighth round), and keeps the default compile with
    several processes, where DDP's bucketed all-reduce has not been measured as graphs, under
    DeepSpeed, which compiles the model itself, and off the GPU, which has no graphs."""
    if t.compile_mode != "auto":
        return t.compile_mode
    return "reduce-overhead" if on_cuda and world_size == 1 and t.deepspeed is None else "default"


def apply_device_defaults(cfg: RunConfig, has_cuda: bool) -> list[str]:
    """Fill options left unset with what suits the device; return notes to print.

    Explicit options always win. On CPU the defaults shrink the test run so that
    two gloo processes finish in seconds rather than hours.
    """
    t, notes = cfg.train, []
    if t.model_size is None:
        t.model_size = "0.6b" if has_cuda else CPU_TEST_MODEL
        if not has_cuda:
            notes.append(f"no GPU: using the '{CPU_TEST_MODEL}' model preset on CPU")
    if t.max_seq_length is None:
        t.max_seq_length = 2048 if has_cuda else CPU_TEST_SEQ_LEN
    if t.precision is None:
        t.precision = "bf16" if has_cuda else "fp32"
    if t.compile is None:
        t.compile = has_cuda
    named_mode = t.compile_mode not in ("auto", "default")  # a mode only torch.compile on the DDP path takes
    if named_mode and not t.compile:
        raise ConfigError(f"--compile-mode {t.compile_mode} needs torch.compile, which is off for this run; "
                          "add --compile or drop --compile-mode")
    if named_mode and t.deepspeed is not None:
        raise ConfigError(f"--compile-mode {t.compile_mode} is for the DDP path; with --deepspeed the engine "
                          "compiles the model itself: drop --compile-mode")
    if not has_cuda and t.precision == "fp16":
        raise ConfigError("--fp16 needs a CUDA GPU (loss scaling is CUDA-only); use --fp32 or bf16 on CPU")
    check_fp8(t, has_cuda)  # torchao and the GPU's FP8 support are checked by fp8.check_fp8_support
    if t.deepspeed is None:  # else the DeepSpeed JSON may still set the precision (apply_ds_options)
        resolve_residual(t)
    check_weights(t)  # now, not after the data is prepared (the accumulation is checked by resolve_weights)
    if t.max_steps is None and t.mode == "test":
        t.max_steps = 10
    if t.log_steps is None:
        t.log_steps = 1 if t.mode == "test" else 10
    if t.eval_steps is None:
        t.eval_steps = 0 if t.mode == "test" else 250
    if cfg.ckpt.resume is None:
        cfg.ckpt.resume = "auto" if t.mode == "train" else "none"
    return notes


def resolve_residual(t: TrainConfig) -> None:
    """The residual stream follows the final precision unless an option says otherwise: bf16 with
    bf16 (measured faster with the same loss curve), fp32 with fp16 and fp32. Idempotent."""
    if t.bf16_residual and t.precision != "bf16":
        raise ConfigError(f"--bf16-residual needs bf16 precision, but this run uses {t.precision}; "
                          "add --bf16 or drop --bf16-residual")
    if t.bf16_residual is None:
        t.bf16_residual = t.precision == "bf16"


def check_fp8(t: TrainConfig, has_cuda: bool) -> None:
    """--fp8 against the device, the backend, the precision and the micro-batch (after the defaults)."""
    if t.fp8 == "off":
        return
    if not has_cuda:
        raise ConfigError("--fp8 needs an NVIDIA GPU with FP8 support (compute capability 8.9 or newer: H100, H200, "
                          "L4, RTX 4090); this run has none — drop --fp8")
    if t.deepspeed is not None:
        raise ConfigError(f"--fp8 {t.fp8} is for the DDP path; the DeepSpeed engine is not converted to FP8 here: "
                          "drop --fp8 or --deepspeed")
    if t.precision != "bf16":
        raise ConfigError(f"--fp8 {t.fp8} needs bf16 precision (FP8 training runs under bf16 autocast), but this run "
                          f"uses {t.precision}; add --bf16 or drop --fp8")
    tokens = t.batch_size * int(t.max_seq_length or CPU_TEST_SEQ_LEN)
    if tokens % FP8_MULTIPLE:
        raise ConfigError(f"--fp8 {t.fp8} needs micro-batches of a multiple of {FP8_MULTIPLE} tokens (the tokens are a "
                          f"side of the weight gradient's FP8 product), but --batch-size {t.batch_size} x "
                          f"--max-seq-length {t.max_seq_length} = {tokens}; pass a --max-seq-length that is a multiple "
                          f"of {FP8_MULTIPLE} or drop --fp8")


# The largest --beta2 that bf16 moments allow. A step changes the second moment by
# (1 - beta2) x (g^2/v - 1) of itself, and bf16 keeps no change under half its step (2^-9 to 2^-8
# of the value): at 0.95 only gradients within 4-8% of their running mean square leave it as it
# was, at 0.999 nearly all would, and the moment would stop following the gradients.
BF16_MOMENTS_MAX_BETA2 = 0.95


def check_weights(t: TrainConfig) -> None:
    """--bf16-weights against the precision and the backend."""
    if not t.bf16_weights:
        return
    if t.deepspeed is not None:
        raise ConfigError("--bf16-weights is for the DDP path; with --deepspeed the engine keeps its own "
                          "fp32 master weights: drop --bf16-weights")
    if t.precision != "bf16":
        raise ConfigError(f"--bf16-weights needs bf16 precision, but this run uses {t.precision}; "
                          "add --bf16 or drop --bf16-weights")


def resolve_weights(t: TrainConfig, grad_accum: int, has_cuda: bool, *, beta2: float) -> None:
    """bf16 weights with fp32 masters in the optimizer, by default where they are measured faster
    (bf16 on a GPU, docs/benchmarks.md) and exact (no accumulation: the gradients are bf16, and
    a sum over micro-batches would be rounded at every add); that optimizer's moments in bf16 by
    default where ``beta2`` lets bf16 hold them. Called once the precision and the batch plan are
    final; idempotent."""
    check_weights(t)
    if t.bf16_weights and grad_accum > 1:
        raise ConfigError(f"--bf16-weights keeps the gradients in bf16, and accumulating {grad_accum} "
                          "micro-batches would round their sum at every add; use a larger --batch-size "
                          "instead of accumulation, or --fp32-weights")
    if t.bf16_weights is None:
        t.bf16_weights = t.precision == "bf16" and has_cuda and t.deepspeed is None and grad_accum == 1
    if t.bf16_moments and not t.bf16_weights:
        raise ConfigError("--bf16-moments is a setting of the optimizer that keeps fp32 master weights, which "
                          "this run does not use (fp32 weights: with --fp32-weights, --grad-accum, --deepspeed, "
                          "fp16, fp32 or no GPU); drop --bf16-moments, or add --bf16-weights")
    if t.bf16_moments and beta2 > BF16_MOMENTS_MAX_BETA2:
        raise ConfigError(f"--bf16-moments with --beta2 {beta2}: a step would change AdamW's second moment by less "
                          f"than bf16 can hold, so it would stop following the gradients; use --fp32-moments, or "
                          f"a --beta2 of at most {BF16_MOMENTS_MAX_BETA2}")
    if t.bf16_moments is None:
        t.bf16_moments = bool(t.bf16_weights) and beta2 <= BF16_MOMENTS_MAX_BETA2


# ---------------------------------------------------------------- derived numbers


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    seq_len: int
    world_size: int
    grad_accum: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def describe(self) -> str:
        return (
            f"{self.micro_batch} seq x {self.seq_len} tokens x {self.world_size} proc x "
            f"{self.grad_accum} accum = {self.tokens_per_step:,} tokens per optimizer step"
        )


def derive_batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """Accumulation steps and tokens per step, validated once for this world size."""
    t = cfg.train
    per_pass = t.batch_size * world_size
    if t.global_batch_size is not None:
        if t.global_batch_size % per_pass:
            raise ConfigError(
                f"--global-batch-size {t.global_batch_size} is not a multiple of "
                f"--batch-size {t.batch_size} x {world_size} processes = {per_pass}; "
                f"use a multiple of {per_pass}"
            )
        accum = t.global_batch_size // per_pass
        if t.grad_accum is not None and t.grad_accum != accum:
            raise ConfigError(
                f"--grad-accum {t.grad_accum} disagrees with --global-batch-size "
                f"{t.global_batch_size} (which needs {accum} at {world_size} processes); give only one"
            )
    else:
        accum = t.grad_accum or 1
    return BatchPlan(t.batch_size, int(t.max_seq_length or CPU_TEST_SEQ_LEN), world_size, accum)


# ---------------------------------------------------------------- validation


# Every float option as (section, field, flag). nan compares false with everything, so it would
# slip past the range checks below, and inf overflows the step count or turns the weights into
# nan: both are refused first. eps has no flag; only a DeepSpeed JSON or a saved config sets it.
_FLOAT_OPTIONS = (
    ("optim", "learning_rate", "--learning-rate"), ("optim", "min_lr_ratio", "--min-lr-ratio"),
    ("optim", "weight_decay", "--weight-decay"), ("optim", "beta1", "--beta1"), ("optim", "beta2", "--beta2"),
    ("optim", "eps", "eps (AdamW epsilon)"), ("optim", "grad_clip", "--grad-clip"),
    ("train", "num_epochs", "--num-epochs"), ("data", "val_fraction", "--val-fraction"),
    ("train", "ddp_bucket_mb", "--ddp-bucket-mb"),
)
# Every integer option. argparse hands over Python ints of any size, but steps, seeds and sizes
# end up in int64 tensors, numpy seeds and the loader's counters, where a larger one would wrap
# or fail deep inside the run.
_INT_OPTIONS = (
    ("train", "batch_size", "--batch-size"), ("train", "max_steps", "--max-steps"),
    ("train", "grad_accum", "--grad-accum"), ("train", "global_batch_size", "--global-batch-size"),
    ("train", "max_seq_length", "--max-seq-length"), ("ckpt", "save_steps", "--save-steps"),
    ("ckpt", "save_total_limit", "--save-total-limit"), ("train", "eval_steps", "--eval-steps"),
    ("train", "eval_batches", "--eval-batches"), ("train", "log_steps", "--log-steps"),
    ("train", "max_bad_steps", "--max-bad-steps"), ("data", "vocab_size", "--vocab-size"),
    ("data", "num_proc", "--num-proc"), ("train", "seed", "--seed"), ("optim", "warmup_steps", "--warmup-steps"),
    ("train", "ce_chunk_tokens", "--ce-chunk-tokens"), ("train", "debug_kill_step", "--debug-kill-step"),
)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# AdamW peak rates for these model sizes lie around 1e-4..1e-2; above 1 every update outgrows
# the weights it changes, so such a value is a typo (a missing "e-"), not a choice.
MAX_LEARNING_RATE = 1.0


def validate(cfg: RunConfig) -> RunConfig:
    t, o, c, d = cfg.train, cfg.optim, cfg.ckpt, cfg.data
    for section, name, flag in _FLOAT_OPTIONS:
        _finite(flag, getattr(getattr(cfg, section), name), _default(section, name))
    for section, name, flag in _INT_OPTIONS:
        _fits_int64(flag, getattr(getattr(cfg, section), name))
    for step in t.debug_nan_steps:
        _fits_int64("--debug-nan-steps", step)
    if t.mode not in ("test", "train"):
        raise ConfigError(f"mode must be 'test' or 'train', got {t.mode!r}")
    if t.model_size is not None and t.model_size not in MODEL_SIZES:
        raise ConfigError(f"--model-size {t.model_size!r} is unknown; choose one of {', '.join(MODEL_SIZES)}")
    if t.attn not in ATTN_BACKENDS:
        raise ConfigError(f"--attn {t.attn!r} is unknown; choose one of {', '.join(ATTN_BACKENDS)}")
    if t.fp8 not in FP8_MODES:
        raise ConfigError(f"--fp8 {t.fp8!r} is unknown; choose one of {', '.join(FP8_MODES)}")
    if t.precision is not None and t.precision not in PRECISIONS:
        raise ConfigError(f"precision {t.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    _positive("--batch-size", t.batch_size)
    _positive("--max-steps", t.max_steps)
    _positive("--grad-accum", t.grad_accum)
    _positive("--global-batch-size", t.global_batch_size)
    _positive("--max-seq-length", t.max_seq_length)
    _positive("--eval-batches", t.eval_batches)
    if t.ddp_bucket_mb < 1:  # DDP's first bucket is 1 MB; compiled DDP refuses later buckets smaller than it
        raise ConfigError(f"--ddp-bucket-mb must be at least 1 (DDP's first bucket is 1 MB), got {t.ddp_bucket_mb:g}")
    _positive("--max-bad-steps", t.max_bad_steps)
    _positive("--save-steps", c.save_steps)
    _positive("--save-total-limit", c.save_total_limit)
    _positive("--vocab-size", d.vocab_size)
    _positive("--num-epochs", t.num_epochs)
    _positive("--learning-rate", o.learning_rate)
    if o.learning_rate > MAX_LEARNING_RATE:
        raise ConfigError(f"--learning-rate {o.learning_rate:g} is above {MAX_LEARNING_RATE:g}; AdamW peak rates "
                          "for these models are about 1e-4 to 1e-2: pass e.g. --learning-rate 3e-4")
    _non_negative("--eval-steps", t.eval_steps)
    _non_negative("--ce-chunk-tokens", t.ce_chunk_tokens)
    _non_negative("--log-steps", t.log_steps)
    _non_negative("--warmup-steps", o.warmup_steps)
    _non_negative("--weight-decay", o.weight_decay)
    _non_negative("--grad-clip", o.grad_clip)
    _non_negative("--num-proc", d.num_proc)
    _non_negative("--seed", t.seed)  # numpy's generators, which shuffle the data, refuse negative seeds
    if t.max_seq_length is not None and t.max_seq_length < 8:
        raise ConfigError(f"--max-seq-length {t.max_seq_length} is too short; use at least 8")
    if d.vocab_size < 300:
        # Byte fallback alone needs 256 pieces plus the special tokens.
        raise ConfigError(f"--vocab-size {d.vocab_size} is too small; use at least 300 (byte fallback needs 259)")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min-lr-ratio {o.min_lr_ratio} must lie in [0, 1]")
    if not 0.0 < o.beta1 < 1.0 or not 0.0 < o.beta2 < 1.0:
        raise ConfigError("--beta1/--beta2 must lie strictly between 0 and 1")
    if not 0.0 <= d.val_fraction < 0.5:
        raise ConfigError(f"--val-fraction {d.val_fraction} must lie in [0, 0.5)")
    if c.resume is not None and c.resume not in ("auto", "none") and not c.resume.strip():
        raise ConfigError("--resume needs 'auto', 'none' or a checkpoint path")
    return cfg


def _positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")


def _non_negative(name: str, value) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{name} must be zero or positive, got {value}")


def _default(section: str, name: str) -> Any:
    klass = {"train": TrainConfig, "data": DataConfig, "optim": OptimConfig, "ckpt": CheckpointConfig}[section]
    return getattr(klass(), name)


def _finite(name: str, value, default) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}; "
                          f"pass e.g. {name.split()[0]} {default:g} (the default)")
    if not math.isfinite(value):
        why = " (a number as large as 1e999 overflows to inf)" if math.isinf(value) else ""
        raise ConfigError(f"{name} {value} is not a finite number{why}; "
                          f"pass a finite one, e.g. {name.split()[0]} {default:g} (the default)")


def _fits_int64(name: str, value) -> None:
    if value is None or INT64_MIN <= value <= INT64_MAX:
        return
    bound = f"at most {INT64_MAX}" if value > 0 else f"at least {INT64_MIN}"
    raise ConfigError(f"{name} {value} does not fit a signed 64-bit integer; pass a number {bound} "
                      "(realistic values are far smaller)")


# ---------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise ConfigError(message)


class _Retired(argparse.Action):
    """An option that no longer exists: one line with what replaced it, not "unrecognized arguments"."""

    def __init__(self, option_strings, dest, why: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f"{option_string} {self.why}")


def _bf16_or_fp32(group, what: str, bf16_help: str, fp32_help: str) -> None:
    """--bf16-<what> / --fp32-<what>, exclusive, into ``bf16_<what>`` (True / False; None when neither)."""
    pair = group.add_mutually_exclusive_group()
    pair.add_argument(f"--bf16-{what}", dest=f"bf16_{what}", action="store_const", const=True, help=bf16_help)
    pair.add_argument(f"--fp32-{what}", dest=f"bf16_{what}", action="store_const", const=False, help=fp32_help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train_h100_dual.py",
        description="Pretrain a Korean/English sLLM (run under torchrun; see README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--test", dest="mode", action="store_const", const="test", help="quick check: 10 steps (default)")
    mode.add_argument("--train", dest="mode", action="store_const", const="train", help="full training run")
    p.set_defaults(mode="test")

    g = p.add_argument_group("model and steps")
    g.add_argument("--model-size", choices=MODEL_SIZES, help="model preset (default: 0.6b on GPU, tiny on CPU)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: 10 in test mode, --num-epochs in train mode)")
    g.add_argument("--num-epochs", type=float, default=1.0, help="passes over the data when --max-steps is unset")
    g.add_argument("--attn", default="auto", choices=ATTN_BACKENDS,
                   help="attention kernel; auto: FlashAttention-4 on an H100/H200 when flash-attn-4 is installed "
                        "(pip install -e \".[fa4]\"), else PyTorch's SDPA with cuDNN first (docs/model.md)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--ce-chunk-tokens", type=int, default=0, metavar="N",
                   help="output layer + cross-entropy N tokens at a time: the logits are never held whole (0 = off)")
    _bf16_or_fp32(g, "residual", "keep the residual stream in bf16 (default with bf16): a third less memory "
                  "traffic in norms and residual adds, each add rounded to bf16",
                  "keep the residual stream in fp32, as transformers does (the default without bf16)")
    _bf16_or_fp32(g, "weights", "bf16 model weights with fp32 master copies in the optimizer: no weight casts "
                  "in the forward, half the gradient traffic (default with bf16 on a GPU without --grad-accum)",
                  "fp32 model weights cast by autocast, with torch's fused AdamW (the default with gradient "
                  "accumulation, DeepSpeed, fp16 or fp32)")
    _bf16_or_fp32(g, "moments", "store AdamW's two moments in bf16 (with --bf16-weights; the update is computed "
                  "in fp32): 8 bytes per parameter less to read and write each step, and 4 less to hold (default "
                  f"with bf16 weights and --beta2 <= {BF16_MOMENTS_MAX_BETA2})",
                  "store them in fp32 (the default without bf16 weights or with a larger --beta2)")
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("data and paths")
    g.add_argument("--dataset-path", help=f"JSONL/txt file or folder (default: datasets/, reading {DEFAULT_DATA_FILE})")
    g.add_argument("--tokenizer-path", help="SentencePiece tokenizer folder (default: trained next to the data)")
    g.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size when a tokenizer is trained")
    g.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out per language")
    g.add_argument("--num-proc", type=int, default=0, help="tokenization processes (0 = all cores)")
    g.add_argument("--strict", action="store_true", help="stop at the first malformed data line")
    g.add_argument("--output-dir", help="checkpoints (default: outputs/; test mode: outputs/test/)")
    g.add_argument("--logs-dir", help="log files, training.pid, metrics.jsonl (default: logs/; test mode: logs/test/)")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=4, help="micro-batch per GPU/process, in sequences")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--global-batch-size", type=int, help="sequences per optimizer step; derives --grad-accum")
    g.add_argument("--max-seq-length", type=int, help="tokens per sequence (default: 2048 on GPU, 128 on CPU)")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (warm-up, then cosine)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of the peak (cosine)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 1%% of steps)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")

    g = p.add_argument_group("precision and speed")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="bf16 autocast (GPU default)")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="fp16 autocast with loss scaling")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="full fp32 (CPU default)")
    comp = g.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_const", const=True, help="torch.compile (GPU default)")
    comp.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="disable torch.compile")
    g.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="torch.compile mode; reduce-overhead replays each step as CUDA graphs; auto (the default) "
                        "takes reduce-overhead for a run on one GPU, default with several processes")
    pair = g.add_mutually_exclusive_group()
    pair.add_argument("--loss-kernel", dest="loss_kernel", action="store_true", default=True,
                      help="the loss and its gradient in one Triton pass on a GPU in bf16 (the default)")
    pair.add_argument("--no-loss-kernel", dest="loss_kernel", action="store_false",
                      help="F.cross_entropy compiled by Inductor instead of the loss kernel")
    pair = g.add_mutually_exclusive_group()
    pair.add_argument("--rope-kernel", dest="rope_kernel", action="store_true", default=False,
                      help="RoPE's forward through its Triton kernel on a GPU (default: compiled torch operations)")
    pair.add_argument("--no-rope-kernel", dest="rope_kernel", action="store_false", help=argparse.SUPPRESS)
    g.add_argument("--cudnn-grouped-kv", choices=("auto", "on", "off"), default="auto",
                   help="cuDNN attention takes grouped K/V as they are (auto: on Hopper GPUs) or expanded")
    g.add_argument("--fp8", choices=FP8_MODES, default="off", metavar="MODE",
                   help="off, tensorwise or rowwise: the decoder layers' q/k/v, o, gate, up and down matmuls in FP8, "
                        "one scale per tensor or per row, through torchao.float8 (NVIDIA GPU of compute capability "
                        "8.9+, bf16; the output layer and attention stay bf16)")
    g.add_argument("--fp8-impl", action=_Retired, why="was retired with the project's own FP8 linear (its loss curve "
                   "lay outside bf16's noise on an H100); --fp8 runs through torchao: drop --fp8-impl")
    g.add_argument("--ddp-bucket-mb", type=float, default=25.0, metavar="MB",
                   help="DDP gradient bucket size: each bucket's all-reduce starts when its gradients are ready")
    g.add_argument("--deepspeed", nargs="?", const="", default=None, metavar="CONFIG",
                   help="DeepSpeed ZeRO backend; optional ds_config.json (default: the shipped one)")

    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--save-total-limit", type=int, default=3, help="keep the newest N checkpoints")
    g.add_argument("--no-save-initial", dest="save_initial", action="store_false", help="skip outputs/initial_model")
    g.add_argument("--no-save-final", dest="save_final", action="store_false",
                   help="no checkpoint at the end of the run (benchmarks); periodic and signal saves still happen")
    g.add_argument("--resume", nargs="?", const="auto",
                   help="'auto' (train default), 'none' (test default), a checkpoint path, or a checkpoint "
                        "name in --output-dir; bare --resume = auto")
    g.add_argument("--eval-steps", type=int, help="validate every N steps (default: 250; test mode: at the end)")
    g.add_argument("--eval-batches", type=int, default=20, help="validation batches per language")
    g.add_argument("--log-steps", type=int, help="log every N steps (default: 1 in test mode, 10 in train mode)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after N consecutive non-finite steps")
    g.add_argument("--verbose", action="store_true", help="debug-level console output")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved configuration (the launcher: also the environment check and the "
                        "command); start nothing")
    g.add_argument("--debug-nan-steps", type=_int_list, default=(), help=argparse.SUPPRESS)
    g.add_argument("--debug-kill-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def explicit_options(argv: Optional[Sequence[str]], parser: Optional[argparse.ArgumentParser] = None) -> set[str]:
    """Destination names (``learning_rate``, ``precision``, ...) of the options on the command line.

    The parsed Namespace cannot tell ``--learning-rate 1e-4`` from the default
    1e-4, so the same parser runs again with every default replaced by one
    marker object: whatever does not hold the marker was typed by the user. ``parser``: a parser
    built on :func:`build_parser` (the launcher's adds its own group); the trainer's by default.
    """
    parser, unset = parser or build_parser(), object()
    parser.set_defaults(**{dest: unset for dest in vars(parser.parse_args([]))})
    return {dest for dest, value in vars(parser.parse_args(list(argv or []))).items() if value is not unset}


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse CLI options into a validated RunConfig (device defaults not yet applied)."""
    ns = build_parser().parse_args(argv)
    cfg = RunConfig(
        train=TrainConfig(
            mode=ns.mode, model_size=ns.model_size, max_steps=ns.max_steps, num_epochs=ns.num_epochs,
            batch_size=ns.batch_size, grad_accum=ns.grad_accum, global_batch_size=ns.global_batch_size,
            max_seq_length=ns.max_seq_length, precision=ns.precision, compile=ns.compile,
            compile_mode=ns.compile_mode, attn=ns.attn,
            activation_checkpointing=ns.activation_checkpointing, ce_chunk_tokens=ns.ce_chunk_tokens,
            bf16_residual=ns.bf16_residual, bf16_weights=ns.bf16_weights, bf16_moments=ns.bf16_moments,
            ddp_bucket_mb=ns.ddp_bucket_mb,
            loss_kernel=ns.loss_kernel, rope_kernel=ns.rope_kernel,
            cudnn_grouped_kv={"auto": None, "on": True, "off": False}[ns.cudnn_grouped_kv], fp8=ns.fp8,
            seed=ns.seed, eval_steps=ns.eval_steps,
            eval_batches=ns.eval_batches, log_steps=ns.log_steps, max_bad_steps=ns.max_bad_steps,
            deepspeed=ns.deepspeed, logs_dir=ns.logs_dir, verbose=ns.verbose,
            debug_nan_steps=tuple(ns.debug_nan_steps), debug_kill_step=ns.debug_kill_step,
        ),
        data=DataConfig(
            dataset_path=ns.dataset_path, tokenizer_path=ns.tokenizer_path, vocab_size=ns.vocab_size,
            val_fraction=ns.val_fraction, num_proc=ns.num_proc, strict=ns.strict,
        ),
        optim=OptimConfig(
            learning_rate=ns.learning_rate, min_lr_ratio=ns.min_lr_ratio, warmup_steps=ns.warmup_steps,
            weight_decay=ns.weight_decay, beta1=ns.beta1, beta2=ns.beta2, grad_clip=ns.grad_clip,
        ),
        ckpt=CheckpointConfig(
            output_dir=ns.output_dir, save_steps=ns.save_steps, save_total_limit=ns.save_total_limit,
            save_initial=ns.save_initial, save_final=ns.save_final, resume=ns.resume,
        ),
    )
    return validate(cfg), ns
