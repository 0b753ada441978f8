"""What the trainer saves and restores, and the rank choreography around checkpoint.py.

checkpoint.py knows how to store a directory atomically; this module knows what
a training run must put in it (weights, optimizer, schedule, per-rank RNG,
data position, metadata) and makes every rank agree on the outcome, so a
failed save on rank 0 never leaves the other ranks waiting at a collective.

With --deepspeed the engine holds weights, optimizer and schedule: every rank
writes its part through ds_backend.save_checkpoint_collective and reads it back
with runner.load_from; trainer_state.pt keeps step, data position and RNG, and
names the backend, so neither backend resumes the other's checkpoint.
"""
from __future__ import annotations

import dataclasses
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from . import __version__
from . import distributed as D
from . import ds_backend as DSB
from .checkpoint import (KO_CANNOT_RESUME, CheckpointError, check_output_dir, load_model_state, load_trainer_state,
                         resolve_resume, save_checkpoint)
from .logs import get_logger
from .master_adamw import full_precision_state
from .optim import capture_rng, merge_split_projections, param_group_names, restore_rng

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig
    from .trainer import Trainer


class RunSetupError(RuntimeError):
    """A failure every rank reports the same way: one line, no traceback."""


_KO_OTHER_BACKEND = "다른 백엔드로 저장된 체크포인트입니다"  # "a checkpoint saved by the other backend"


def _agree(result: Any) -> Any:
    """Broadcast rank 0's result (or its error) and raise the error on every rank."""
    result = D.broadcast_object(result)
    if isinstance(result, RunSetupError):
        raise result
    return result


def resolve_resume_on_main(cfg: "RunConfig", info: D.DistInfo) -> Optional[Path]:
    result: Any = None
    if info.is_main:
        try:
            result = resolve_resume(cfg.ckpt.resume or "none", cfg.output_dir,
                                    log=lambda msg: get_logger().warning("%s", msg))
        except CheckpointError as exc:
            result = RunSetupError(str(exc))
    return _agree(result)


def check_output_dir_on_main(cfg: "RunConfig", info: D.DistInfo, need_bytes: int, per_checkpoint_bytes: int) -> None:
    """The output folder's writability and free space, checked by rank 0 and agreed by every rank.

    Called by all ranks. Rank 0 alone probes the folder (one writer, one disk), and its outcome
    is broadcast: were rank 0 to raise on its own, the other ranks would fail at the next
    collective with a gloo/NCCL "connection closed" that hides the real reason.
    """
    result: Any = None
    if info.is_main:
        try:
            check_output_dir(cfg.output_dir, need_bytes, per_checkpoint_bytes=per_checkpoint_bytes)
        except CheckpointError as exc:
            result = RunSetupError(str(exc))
        except Exception as exc:  # anything else (statvfs on a stale mount) must still reach the other ranks
            why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            result = RunSetupError(f"출력 폴더를 확인할 수 없습니다 / cannot check output directory {cfg.output_dir} "
                                   f"({why}); pass --output-dir PATH on a working disk")
    _agree(result)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "koen_sllm": __version__}
    for name in ("transformers", "sentencepiece", "safetensors", "numpy", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


def git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def save_run_checkpoint(tr: "Trainer", name: str, *, update_latest: bool = True, with_state: bool = True,
                        last_loss: Optional[float] = None) -> Path:
    """Called by every rank; rank 0 writes (with DeepSpeed, every rank writes its shard).
    Returns the checkpoint path on every rank."""
    rank_states = D.gather_objects({"rng": capture_rng()}) if with_state else None
    t0 = time.time()
    if tr.runner is not None:
        return _save_with_engine(tr, name, update_latest, with_state, last_loss, rank_states, t0)
    result: Any = None
    if tr.info.is_main:
        info = _training_info(tr, last_loss)
        state = _trainer_state(tr, info, rank_states) if with_state else None
        if state is not None:
            state["optimizer"], state["scheduler"] = tr.optimizer.state_dict(), tr.scheduler.state_dict()
            if tr.scaler is not None:
                state["scaler"] = tr.scaler.state_dict()
        try:
            hf = tr.raw_model.hf_config(tr.tokenizer.bos_id, tr.tokenizer.eos_id, tr.tokenizer.pad_id)
            # The fp32 masters, where the model runs on bf16 copies of them (substituted under the
            # model's own names, before the fused projections are split into transformers' ones).
            own = full_precision_state(tr.optimizer, tr.raw_model.state_dict())
            model_state = tr.raw_model.hf_state_dict(own)
            result = save_checkpoint(
                tr.cfg.output_dir, name, model_state=model_state, hf_config=hf,
                tokenizer_dir=tr.data.tokenizer_dir, training_info=info, trainer_state=state,
                update_latest=update_latest, keep_last=tr.cfg.ckpt.save_total_limit,
            )
            tr.log.info("checkpoint saved / 체크포인트 저장: %s (%.1fs)", result, time.time() - t0)
        except CheckpointError as exc:
            result = RunSetupError(str(exc))
    return _agree(result)


def _save_with_engine(tr: "Trainer", name: str, update_latest: bool, with_state: bool,
                      last_loss: Optional[float], rank_states: Optional[list], t0: float) -> Path:
    """The DeepSpeed save: collective, equally atomic; no optimizer/scheduler in trainer_state
    (they are in the engine's files, partitioned by rank)."""
    info = state = hf = None
    if tr.info.is_main:
        info = _training_info(tr, last_loss)
        state = _trainer_state(tr, info, rank_states) if with_state else None
        hf = tr.raw_model.hf_config(tr.tokenizer.bos_id, tr.tokenizer.eos_id, tr.tokenizer.pad_id)
    try:
        path = DSB.save_checkpoint_collective(
            tr.runner, tr.cfg.output_dir, name, hf_config=hf, tokenizer_dir=tr.data.tokenizer_dir,
            training_info=info, trainer_state=state, update_latest=update_latest,
            keep_last=tr.cfg.ckpt.save_total_limit)
    except CheckpointError as exc:  # raised with the same message on every rank
        raise RunSetupError(str(exc)) from None
    if tr.info.is_main:
        tr.log.info("checkpoint saved / 체크포인트 저장: %s (%.1fs)", path, time.time() - t0)
    return path


def _backend(tr: "Trainer") -> str:
    return "deepspeed" if tr.ds_config is not None else "ddp"


def _training_info(tr: "Trainer", last_loss: Optional[float]) -> dict[str, Any]:
    info = {
        "step": tr.step, "tokens_seen": tr.tokens_seen, "train_loss": last_loss,
        "val": dict(tr.last_val), "lr": tr.lr if tr.step else 0.0,
        "elapsed_s": round(tr.elapsed_before + (time.time() - getattr(tr, "_start_time", time.time())), 1),
        "world_size": tr.info.world_size, "batch_plan": {
            "micro_batch": tr.plan.micro_batch, "seq_len": tr.plan.seq_len,
            "world_size": tr.plan.world_size, "grad_accum": tr.plan.grad_accum,
            "tokens_per_step": tr.plan.tokens_per_step},
        "max_steps": tr.max_steps, "model": dataclasses.asdict(tr.model_cfg),
        "num_params": tr.num_params, "config": tr.cfg.to_dict(), "backend": _backend(tr),
        "data": {k: tr.data.meta.get(k) for k in ("input_hash", "tokenizer_hash") if k in tr.data.meta},
        "used_dummy_data": bool(tr.data.used_dummy), "versions": library_versions(), "git_commit": git_commit(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if tr.ds_config is not None:
        info["deepspeed_config"] = tr.ds_config  # the complete engine config that trained
    return info


def _trainer_state(tr: "Trainer", info: dict[str, Any], rank_states: list) -> dict[str, Any]:
    return {
        "backend": _backend(tr), "step": tr.step, "tokens_seen": tr.tokens_seen, "elapsed_s": info["elapsed_s"],
        "loader": tr.loader.state_dict(), "rng_per_rank": [s["rng"] for s in rank_states],
        "sequences_per_step": tr.plan.sequences_per_step, "seq_len": tr.plan.seq_len,
        "world_size": tr.info.world_size,
    }


def load_resume_state(tr: "Trainer", path: Path) -> dict[str, Any]:
    """Restore weights, optimizer, schedule, RNG and data position from `path` on every rank."""
    state = load_trainer_state(path)
    check_resume_backend(tr, path, state.get("backend"))
    saved_seqs, now_seqs = state.get("sequences_per_step"), tr.plan.sequences_per_step
    if saved_seqs != now_seqs or state.get("seq_len") != tr.plan.seq_len:
        raise RunSetupError(
            f"{KO_CANNOT_RESUME} / {path} was trained with {saved_seqs} sequences x {state.get('seq_len')} tokens "
            f"per step; this run has {now_seqs} x {tr.plan.seq_len} ({tr.plan.describe()}); resuming would change "
            f"the data order: keep the global batch, e.g. --global-batch-size {saved_seqs} "
            f"--max-seq-length {state.get('seq_len')}")
    if tr.runner is not None:
        try:
            tr.runner.load_from(path)  # collective: weights, optimizer shards, schedule
        except DSB.DeepSpeedBackendError as exc:
            raise RunSetupError(f"{KO_CANNOT_RESUME} / {exc}") from None
    else:
        tr.raw_model.load_hf_state_dict(load_model_state(path))
        model = tr.raw_model
        # Checkpoints saved before q/k/v were fused hold their moments per matrix.
        tr.optimizer.load_state_dict(merge_split_projections(
            state["optimizer"], param_group_names(model), lambda name: len(model.fused_blocks(name) or [name])))
        tr.scheduler.load_state_dict(state["scheduler"])
        if tr.scaler is not None and "scaler" in state:
            tr.scaler.load_state_dict(state["scaler"])
    tr.loader.load_state_dict(state["loader"])
    tr.step, tr.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    tr.elapsed_before = float(state.get("elapsed_s", 0.0))
    rng = state.get("rng_per_rank") or []
    if tr.info.rank < len(rng):
        restore_rng(rng[tr.info.rank])
    if state.get("world_size") != tr.info.world_size:
        tr.log.warning("resuming %d-process state with %d processes: same global batch, data continues at the "
                       "same token position", state.get("world_size"), tr.info.world_size)
    tr.last_checkpoint = path
    return state


def check_resume_backend(tr: "Trainer", path: Path, saved: Optional[str] = None) -> None:
    """Refuse a checkpoint of the other backend: its optimizer state is stored in another form.
    ``saved`` is trainer_state's "backend"; without it the engine's folder tells them apart,
    which is cheap enough to check before the engine starts."""
    saved = saved or ("deepspeed" if DSB.has_engine_state(path) else "ddp")
    if saved == _backend(tr):
        return
    if saved == "deepspeed":
        raise RunSetupError(f"{_KO_OTHER_BACKEND} / {path} was saved by the DeepSpeed backend; resume it with "
                            "--deepspeed (and the same number of processes), or start afresh with --resume none "
                            "or another --output-dir")
    raise RunSetupError(f"{_KO_OTHER_BACKEND} / {path} was saved by the DDP backend; resume it without --deepspeed, "
                        "or start afresh with --resume none or another --output-dir")
