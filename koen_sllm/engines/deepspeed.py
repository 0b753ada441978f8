"""The optional DeepSpeed ZeRO backend: the engine behind the trainer's small interface, and its checkpoints.

The trainer drives DDP with "forward/backward per micro-batch, then one
optimizer step"; :class:`DeepSpeedRunner` offers the same verbs on top of a
DeepSpeed engine, which owns accumulation, clipping, the skip on overflow and
the optimizer. The learning-rate schedule is the project's own
(``optim.build_scheduler``, handed to the engine), so both backends follow the
same curve step for step. The model stays a plain ``KoEnLM``.

Checkpoints stay atomic although DeepSpeed's save is collective (every rank
writes its shard): rank 0 runs ``checkpoint.save_checkpoint`` as for DDP, and
inside its ``extra_writer`` hook tells the other ranks the temporary directory;
all ranks write the engine state into ``<tmp>/deepspeed/`` and vote on the
outcome; only then does rank 0 write the manifest, rename and move ``latest``.
The consolidated fp32 weights go to ``model.safetensors`` as on DDP, so every
checkpoint is also a model directory that transformers loads offline.
docs/deepspeed.md describes the whole backend.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import distributed as D
from ..checkpoint.store import CheckpointError, save_checkpoint
from ..config import OptimConfig
from .deepspeed_config import (  # noqa: F401 - re-exported: the backend's whole API lives here
    SHIPPED_CONFIG, DeepSpeedConfigError, apply_ds_options, build_ds_config, describe,
    load_ds_json, offload_device, zero_stage,
)
from ..optim import build_scheduler, param_groups
from .partial_offload import load_gpu_state, save_gpu_state
from ..errors import KoenError, UsageError
from ..hf import mapping as HF

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint.store import CheckpointTarget
    from . import StepOutcome

__all__ = [  # the config half is re-exported so the trainer imports one module
    "SHIPPED_CONFIG", "DeepSpeedConfigError", "apply_ds_options", "build_ds_config", "describe",
    "load_ds_json", "offload_device", "zero_stage",
    "INSTALL_COMMAND", "ENGINE_DIR", "ENGINE_TAG", "DeepSpeedUnavailable", "DeepSpeedBackendError",
    "require_deepspeed", "estimate_ds_checkpoint_bytes", "build_partitioned_model", "DeepSpeedRunner",
    "has_engine_state",
    "save_checkpoint_collective",
]

INSTALL_COMMAND = 'pip install -e ".[deepspeed]"'
# The Korean halves of the start-up errors when --deepspeed cannot be served ("<Korean> / <English>").
_KO_MISSING = "DeepSpeed 패키지가 설치되어 있지 않습니다"
_KO_BROKEN = "DeepSpeed 패키지를 불러올 수 없습니다"
ENGINE_DIR = "deepspeed"  # inside a checkpoint directory: the engine's own files
ENGINE_TAG = "zero"
_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class DeepSpeedUnavailable(UsageError, RuntimeError):
    """--deepspeed was asked for but the package cannot be imported; the message holds the install command."""


class DeepSpeedBackendError(KoenError, RuntimeError):
    """The engine and the trainer disagree, or a checkpoint does not fit this run; one line with the fix."""


def require_deepspeed():
    """The ``deepspeed`` module, or DeepSpeedUnavailable with the install command."""
    try:
        import deepspeed
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing != "deepspeed" and not missing.startswith("deepspeed."):
            raise DeepSpeedUnavailable(f"{_KO_BROKEN} / --deepspeed: deepspeed is installed but its dependency "
                                       f"{missing!r} is missing; install both with: {INSTALL_COMMAND}") from None
        raise DeepSpeedUnavailable(f"{_KO_MISSING} / --deepspeed needs the deepspeed package, which is not "
                                   f"installed; install it with: {INSTALL_COMMAND}") from None
    except Exception as exc:  # a broken install raises anything (CUDA mismatch, bad ops build)
        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise DeepSpeedUnavailable(f"{_KO_BROKEN} / --deepspeed: deepspeed is installed but fails to import "
                                   f"({why}); reinstall it with: {INSTALL_COMMAND}") from None
    return deepspeed


def estimate_ds_checkpoint_bytes(num_params: int, stage: int) -> int:
    """Bytes one DeepSpeed checkpoint takes: fp32 model.safetensors (4 B/param), fp32 master
    weights and two AdamW moments (12), and below stage 3 the engine's module copy (up to 4; under
    ZeRO-3 the weights live in the optimizer's partitions and the module file holds only their
    shapes), plus slack. Measured on CPU with the 125m preset: 16.00 B/param at stage 3, 20.00 at
    stage 2 in fp32 (docs/deepspeed.md)."""
    per_param = 16 if stage >= 3 else 20
    return int(num_params * per_param * 1.02) + (64 << 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group(ds, device: torch.device) -> None:
    """DeepSpeed always needs a process group; a plain ``python`` run (a world of one) has none.
    Where torch's exists, DeepSpeed's communication layer is still told of it: zero.Init reads the
    world size through that layer before ``deepspeed.initialize`` would set it up."""
    if dist.is_available() and dist.is_initialized():
        ds.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        return
    if "WORLD_SIZE" not in os.environ:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    ds.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def build_partitioned_model(make_model: Callable[[bool], torch.nn.Module], ds_config: dict,
                            device: torch.device) -> torch.nn.Module:
    """The model for ZeRO-3, built so that no rank ever holds all of it.

    ``make_model(init_weights)`` builds the raw model (``KoEnLM(cfg, init_weights)``). Under
    ``deepspeed.zero.Init`` each layer's parameters are partitioned across the ranks as soon as
    that layer is constructed, into host memory when the config offloads parameters, so the
    largest presets are never materialised whole (the default ZeRO-3 path would build the whole
    model on every rank first). The weights are then initialised one parameter at a time: gathered,
    drawn on rank 0 from the run's seed in ``named_parameters()`` order, broadcast and partitioned
    again, so they do not depend on the number of processes. Under a bf16 config the partitions are
    bf16, so the fp32 master weights start from bf16-rounded values. Collective."""
    ds = require_deepspeed()
    _ensure_process_group(ds, device)
    conf = {k: v for k, v in ds_config.items() if k != "scheduler"}  # the project's scheduler runs it
    with ds.zero.Init(config_dict_or_path=conf):
        model = make_model(False)
    main = _rank() == 0
    for name, p in model.named_parameters():  # a tied head is visited once, as in reset_parameters
        with ds.zero.GatheredParameters([p], modifier_rank=0):
            if main:
                model.init_parameter(name, p)
    # ZeRO-3 gathers a layer's weights when that layer's forward runs; the losses read the output
    # layer's weight as a matrix from the model's own forward, so it is fetched for that one instead.
    for p in model.parameters_read_directly():
        ds.zero.register_external_parameter(model, p)
    return model


class DeepSpeedRunner:
    """A DeepSpeed engine driven with the trainer's verbs.

    Per optimizer step, for each of ``gradient_accumulation_steps`` micro-batches
    ``loss = runner.forward_backward(x, y, last_micro)``, then
    ``outcome = runner.step(mean_loss, stop_requested)`` (the trainer's engine verbs,
    engines/__init__.py; ``optimizer_step()`` is the engine's step alone). ``ds_config`` comes from
    :func:`build_ds_config`. ``model`` is the raw module (not compiled, not
    wrapped): with ``compile=True`` the engine compiles it, so the parameter names
    in checkpoints stay the model's own.
    """

    def __init__(self, model: torch.nn.Module, ds_config: dict, *, compile: bool = False):
        ds = require_deepspeed()
        self._ds = ds
        # DeepSpeed's ZeRO code calls a collective torch has renamed; the warning is theirs to fix
        # and would otherwise repeat on every rank's console.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning)
        device = next(model.parameters()).device
        _ensure_process_group(ds, device)
        conf = copy.deepcopy(ds_config)
        sched = conf.pop("scheduler")["params"]  # run by the project's scheduler, below
        sched_cfg = OptimConfig(warmup_steps=sched["warmup_num_steps"], min_lr_ratio=sched["cos_min_ratio"])
        total = sched["total_num_steps"]
        decay = conf["optimizer"]["params"]["weight_decay"]
        self.engine, _, _, self.scheduler = ds.initialize(
            model=model, model_parameters=param_groups(model, decay), config=conf,
            lr_scheduler=lambda opt: build_scheduler(opt, sched_cfg, total))
        # DeepSpeed's own compile takes torch.compile's default mode (None: not compiled)
        self.compile_mode: Optional[str] = "default" if compile else None
        if compile:
            self.engine.compile()
        self.config = ds_config
        self.stage = zero_stage(conf)
        self.grad_accum = int(conf["gradient_accumulation_steps"])

    # ------------------------------------------------------------ training verbs
    @property
    def module(self) -> torch.nn.Module:
        """The raw model (under ZeRO-3 its parameters are partitioned: use hf_state_dict to read them)."""
        return self.engine.module

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (as the DDP path logs it)."""
        return float(self.engine.get_lr()[0])

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss without gradients, for validation (gathers ZeRO-3 parameters as needed)."""
        with torch.no_grad():
            return self.engine(x, y)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool, *,
                         nan_loss: bool = False) -> torch.Tensor:
        """One micro-batch: forward, backward (the engine scales by 1/accumulation and syncs
        gradients at the boundary). Returns the detached, unscaled loss. ``nan_loss`` is the
        test hook behind --debug-nan-steps."""
        if self.engine.is_gradient_accumulation_boundary() != bool(last_micro):
            raise DeepSpeedBackendError(
                f"micro-batch count out of step with the engine: last_micro={last_micro} but DeepSpeed's "
                f"gradient_accumulation_steps is {self.grad_accum}; feed exactly that many micro-batches per step")
        loss = self.engine(x, y)
        if nan_loss:
            loss = loss * float("nan")
        self.engine.backward(loss)
        if not last_micro:
            self.engine.step()  # not a boundary: only advances the engine's micro-step counter
        return loss.detach()

    # The engine verbs the trainer's step uses (engines/__init__.py).
    name = "deepspeed"

    def prepare(self) -> None:
        """Nothing left to do once the engine has started: it compiled and wrapped the model itself."""

    def begin_step(self) -> None:
        pass

    def step(self, mean_loss: torch.Tensor, stop_requested: bool) -> "StepOutcome":
        """The engine scales by 1/accumulation, syncs, clips, and skips a non-finite update on every
        rank alike; one all-reduce then carries the loss and the votes, as on DDP."""
        from . import StepOutcome

        norm, applied = self.optimizer_step()
        flags = torch.tensor([float(not applied), float(stop_requested)], device=mean_loss.device)
        votes = D.all_reduce_sum(torch.cat([mean_loss.reshape(1), flags])).tolist()
        loss, any_bad, any_stop = votes[0] / D.world_size(), votes[1] > 0, votes[2] > 0
        if any_bad and applied:  # the engine all-reduces its overflow check, so this means a bug
            raise DeepSpeedBackendError("ranks disagree on skipping this step; the weights have diverged: "
                                        "resume from the last checkpoint")
        grad_norm = torch.tensor(float("nan") if norm is None else norm)
        return StepOutcome(torch.tensor(loss), grad_norm, not any_bad, any_stop)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(x, y)  # through the engine: ZeRO-3 gathers the weights

    def save_checkpoint(self, target: "CheckpointTarget", name: str, *, training_info: Optional[dict],
                        trainer_state: Optional[dict], update_latest: bool = True) -> Path:
        """Collective and as atomic as the DDP save (save_checkpoint_collective); trainer_state holds
        no optimizer or schedule: they are in the engine's files, partitioned by rank."""
        return save_checkpoint_collective(
            self, target.output_dir, name, hf_config=target.hf_config, tokenizer_dir=target.tokenizer_dir,
            training_info=training_info, trainer_state=trainer_state, update_latest=update_latest,
            keep_last=target.keep_last)

    def load_checkpoint(self, path: Path, trainer_state: dict[str, Any]) -> None:
        """Weights, optimizer shards and schedule from the engine's own files (collective)."""
        self.load_from(path)

    def optimizer_step(self) -> tuple[Optional[float], bool]:
        """The optimizer step after the last micro-batch: (global grad norm before clipping, applied).

        The engine skips the update (applied False) when the gradients are not
        finite; every rank gets the same answer because the check is all-reduced.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            raise DeepSpeedBackendError("the optimizer step was called before the last micro-batch of the step; "
                                        "pass last_micro=True to the final forward_backward")
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if applied and norm is not None and not math.isfinite(norm):
            raise DeepSpeedBackendError(
                f"DeepSpeed applied an update with a non-finite gradient norm ({norm}); the weights are damaged: "
                "resume from the last checkpoint with bf16 (the default) or ZeRO stage 1/2")
        return norm, applied

    # ------------------------------------------------------------ weights and state
    def hf_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Consolidated fp32 weights under transformers' names. Collective: every rank calls;
        rank 0 gets the dict (CPU tensors), the others None.

        The values are the optimizer's fp32 master weights (not the bf16 working
        copy), gathered one parameter at a time, so the export equals a DDP one.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        module, main = self.module, _rank() == 0
        full: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            value = safe_get_full_fp32_param(p)  # collective under ZeRO-3
            if value is None:  # no separate fp32 master: the parameter is the master
                if hasattr(p, "ds_id"):
                    with self._ds.zero.GatheredParameters([p], modifier_rank=None):
                        value = p.detach().clone() if main else None
                else:
                    value = p.detach()
            if main:
                full[name] = value.detach().to("cpu", torch.float32).clone()
        if not main:
            return None
        return _hf_names(module, full)

    def save_into(self, directory: Path, tag: str = ENGINE_TAG) -> None:
        """Write the engine state (weights, optimizer shards, schedule) into ``directory/deepspeed``.
        Collective: every rank calls it with the same ``directory``, which all of them can reach."""
        self.engine.save_checkpoint(str(Path(directory) / ENGINE_DIR), tag=tag, client_state={}, save_latest=False)
        # DeepSpeed leaves the GPU half of a partial optimizer offload out of its own files.
        save_gpu_state(getattr(self.engine, "optimizer", None), Path(directory) / ENGINE_DIR / tag, _rank())

    def load_from(self, directory: Path, tag: str = ENGINE_TAG) -> dict[str, Any]:
        """Restore weights, optimizer and schedule written by :meth:`save_into`; returns the client
        state. Collective. DeepSpeed reads its own files with pickle, so load only checkpoints this
        project wrote (``resolve_resume`` checks their manifest first)."""
        engine_dir = Path(directory) / ENGINE_DIR
        if not has_engine_state(directory, tag):
            raise DeepSpeedBackendError(
                f"{directory} holds no DeepSpeed state ({engine_dir}/{tag} is missing): it was saved by the DDP "
                "backend or is a model-only directory; resume it without --deepspeed, or pass --resume none")
        shards = {int(m.group(1)) for f in (engine_dir / tag).iterdir() if (m := _SHARD_RE.search(f.name))}
        world = dist.get_world_size() if dist.is_initialized() else 1
        if shards and len(shards) != world:
            raise DeepSpeedBackendError(
                f"{directory} holds ZeRO optimizer shards of {len(shards)} processes, this run has {world}; "
                f"resume with {len(shards)} processes (the ZeRO partitioning follows the world size)")
        try:
            path, client_state = self.engine.load_checkpoint(
                str(engine_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        except RuntimeError as exc:
            if "q_proj" in str(exc) and "qkv_proj" in str(exc):  # the engine's own module names
                raise DeepSpeedBackendError(
                    f"{directory} was saved while q, k and v were separate matrices; the DeepSpeed engine cannot "
                    "load that state into today's fused q/k/v layout (docs/checkpoints.md): resume it with the "
                    "version that saved it, or start afresh with --resume none (its model.safetensors still "
                    "loads for export and generation)") from None
            raise
        if path is None:
            raise DeepSpeedBackendError(f"DeepSpeed could not load {engine_dir}/{tag}; the checkpoint is incomplete")
        load_gpu_state(getattr(self.engine, "optimizer", None), engine_dir / tag, _rank())
        return dict(client_state or {})


def _hf_names(module: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map module parameter names to transformers' through ``hf.mapping.hf_state_dict`` applied to a
    weightless copy of the model, so the mapping lives in hf/mapping.py only."""
    if not hasattr(module, "cfg"):
        raise DeepSpeedBackendError(f"{type(module).__name__} is not a KoEnLM; export needs one")
    with torch.device("meta"):
        shell = type(module)(dataclasses.replace(module.cfg))
    params = {n for n, _ in shell.named_parameters(remove_duplicate=False)}
    for name in shell.state_dict():  # persistent buffers are never partitioned: read them directly
        if name not in params and name not in full:
            full[name] = module.get_buffer(name).detach().to("cpu").clone()
    shell.load_state_dict(full, strict=False, assign=True)
    out = HF.hf_state_dict(shell)
    empty = sorted(k for k, v in out.items() if v.is_meta)
    if empty:
        raise DeepSpeedBackendError(f"consolidating the weights missed {empty[:3]}; the engine holds other parameters")
    return out


def has_engine_state(directory: Path, tag: str = ENGINE_TAG) -> bool:
    return (Path(directory) / ENGINE_DIR / tag).is_dir()


# ---------------------------------------------------------------- collective checkpoints


def _engine_save_and_vote(runner: DeepSpeedRunner, tmp: Path, tag: str) -> Optional[str]:
    """Every rank writes its engine files, then all learn whether every rank succeeded."""
    error = None
    try:
        runner.save_into(tmp, tag)
    except Exception as exc:  # reported through the vote, so no rank waits forever
        error = f"rank {_rank()}: {type(exc).__name__}: {exc}".replace("\n", " ")
    errors = [e for e in D.gather_objects(error) if e]
    return errors[0] if errors else None


def save_checkpoint_collective(
    runner: DeepSpeedRunner, root: Path, name: str, *, hf_config: Optional[dict], tokenizer_dir: Optional[Path],
    training_info: Optional[dict], trainer_state: Optional[dict], update_latest: bool = True,
    keep_last: Optional[int] = None, tag: str = ENGINE_TAG,
) -> Path:
    """Save one checkpoint with the engine's state inside, atomically; called by every rank.

    Rank 0's ``hf_config``, ``training_info`` and ``trainer_state`` are used (the
    other ranks may pass anything but None for ``trainer_state``: None on every rank saves the
    model alone, with no engine files, as for ``initial_model``). Returns the published path on every rank, or
    raises CheckpointError with the same message on every rank; earlier
    checkpoints and ``latest`` are untouched on failure. The output directory
    must be shared by all ranks (one node, or a shared filesystem).
    """
    model_state = runner.hf_state_dict()  # collective: before rank 0 goes its own way
    with_engine = trainer_state is not None  # None on every rank: a model directory only (initial_model)
    if _rank() != 0:
        tmp = D.broadcast_object(None) if with_engine else None
        if tmp is not None:
            _engine_save_and_vote(runner, Path(tmp), tag)
        result = D.broadcast_object(None)
    else:
        handed_over = False

        def extra_writer(tmp_dir: Path) -> None:
            nonlocal handed_over
            handed_over = True
            D.broadcast_object(str(tmp_dir))
            error = _engine_save_and_vote(runner, tmp_dir, tag)
            if error:
                raise CheckpointError(f"DeepSpeed could not write its state into {tmp_dir} ({error}); "
                                      "earlier checkpoints are intact")

        try:
            path = save_checkpoint(root, name, model_state=model_state, hf_config=hf_config or {},
                                   tokenizer_dir=tokenizer_dir, training_info=training_info or {},
                                   trainer_state=trainer_state, extra_writer=extra_writer if with_engine else None,
                                   update_latest=update_latest, keep_last=keep_last)
            result: Any = str(path)
        except Exception as exc:  # any failure must still release the ranks waiting below
            if with_engine and not handed_over:
                D.broadcast_object(None)
            result = {"error": str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"}
        D.broadcast_object(result)
    if isinstance(result, dict):
        raise CheckpointError(result["error"])
    return Path(result)
