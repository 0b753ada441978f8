"""What the trainer saves and restores, and the rank choreography around checkpoint/store.py.

checkpoint/store.py knows how to store a directory atomically; this module knows what
a training run must put in it (weights, optimizer, schedule, per-rank RNG,
data position, metadata) and makes every rank agree on the outcome, so a
failed save on rank 0 never leaves the other ranks waiting at a collective.

It takes the engine (engines/__init__.py) and plain values, never the trainer:
the trainer hands over its own state as a dict (Trainer.state_dict) and takes
it back (Trainer.load_state_dict). With --deepspeed the engine holds weights,
optimizer and schedule: every rank writes its part through
engines/deepspeed.py's save_checkpoint_collective and reads it back with runner.load_from;
trainer_state.pt keeps step, data position and RNG, and names the backend, so
neither backend resumes the other's checkpoint.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from . import __version__
from . import distributed as D
from .checkpoint.store import (KO_CANNOT_RESUME, CheckpointError, CheckpointTarget, check_output_dir, load_trainer_state,
                         resolve_resume)
from .engines import deepspeed as DSB
from .errors import KoenError
from .logs import get_logger
from .optim import capture_rng

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig


class RunSetupError(KoenError, RuntimeError):
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
    if "torchao" in sys.modules:  # imported by --fp8 alone (fp8.py)
        versions["torchao"] = str(getattr(sys.modules["torchao"], "__version__", "?"))
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


def save_run_checkpoint(engine: Any, target: CheckpointTarget, name: str, *, training_info: Optional[dict],
                        trainer_state: Optional[dict], update_latest: bool = True, log: Any = None) -> Path:
    """Called by every rank with the same arguments (``training_info`` and ``trainer_state`` matter
    on rank 0 only; ``trainer_state`` None saves the model alone). Rank 0 writes; with DeepSpeed every
    rank writes its shard. Returns the checkpoint path on every rank."""
    rank_states = D.gather_objects({"rng": capture_rng()}) if trainer_state is not None else None
    if trainer_state is not None and rank_states is not None:
        trainer_state = {**trainer_state, "backend": engine.name, "rng_per_rank": [s["rng"] for s in rank_states]}
    t0 = time.time()
    try:  # collective: every engine raises the same CheckpointError on every rank
        path = engine.save_checkpoint(target, name, training_info=training_info, trainer_state=trainer_state,
                                      update_latest=update_latest)
    except CheckpointError as exc:
        raise RunSetupError(str(exc)) from None
    if log is not None and D.rank() == 0:
        log.info("checkpoint saved / 체크포인트 저장: %s (%.1fs)", path, time.time() - t0)
    return path


def load_resume_state(engine: Any, path: Path, plan: Any) -> dict[str, Any]:
    """Restore the engine's weights, optimizer and schedule from ``path`` on every rank; return the
    saved trainer state (step, tokens, data position, per-rank RNG) for the trainer to take back."""
    state = load_trainer_state(path)
    check_resume_backend(engine.name, path, state.get("backend"))
    saved_seqs, now_seqs = state.get("sequences_per_step"), plan.sequences_per_step
    if saved_seqs != now_seqs or state.get("seq_len") != plan.seq_len:
        raise RunSetupError(
            f"{KO_CANNOT_RESUME} / {path} was trained with {saved_seqs} sequences x {state.get('seq_len')} tokens "
            f"per step; this run has {now_seqs} x {plan.seq_len} ({plan.describe()}); resuming would change "
            f"the data order: keep the global batch, e.g. --global-batch-size {saved_seqs} "
            f"--max-seq-length {state.get('seq_len')}")
    try:  # weights, optimizer and schedule, each engine from its own files (collective with DeepSpeed)
        engine.load_checkpoint(path, state)
    except KoenError as exc:
        raise RunSetupError(exc if KO_CANNOT_RESUME in str(exc) else f"{KO_CANNOT_RESUME} / {exc}") from None
    return state


def check_resume_backend(backend: str, path: Path, saved: Optional[str] = None) -> None:
    """Refuse a checkpoint of the other backend (``backend``: "ddp" or "deepspeed"): its optimizer
    state is stored in another form. ``saved`` is trainer_state's "backend"; without it the engine's
    folder tells them apart, which is cheap enough to check before the engine starts."""
    saved = saved or ("deepspeed" if DSB.has_engine_state(path) else "ddp")
    if saved == backend:
        return
    if saved == "deepspeed":
        raise RunSetupError(f"{_KO_OTHER_BACKEND} / {path} was saved by the DeepSpeed backend; resume it with "
                            "--deepspeed (and the same number of processes), or start afresh with --resume none "
                            "or another --output-dir")
    raise RunSetupError(f"{_KO_OTHER_BACKEND} / {path} was saved by the DDP backend; resume it without --deepspeed, "
                        "or start afresh with --resume none or another --output-dir")
