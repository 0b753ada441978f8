"""The settings a run was started with, kept in its output folder, and the rules for a resume.

A training run writes ``<output-dir>/run.json`` once its schedule is known:
the resolved settings (model, batch, learning rate, schedule, steps, data),
the run id and the command. A later start in the same folder reads it back:

* options not typed again are taken from the record, so ``--train`` alone
  resumes exactly the run that was stopped;
* options that are safe to change (how often to save or log, the micro-batch
  at the same global batch, the GPU count at the same global batch, ...) are
  applied with a note saying what changes;
* options that would change the schedule or the data order are refused with
  the exact command that works. ``--max-steps`` may extend a finished
  schedule, with a note giving the learning rate before and after.

A folder without run.json (made by an older version) falls back to the
settings saved in its newest checkpoint's training_info.json.

Pure dictionary work: no process group, no torch (except for the learning
rate shown in a note), so the launcher's --dry-run applies the same rules.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .config import ConfigError, RunConfig

RECORD_NAME = "run.json"
RECORD_VERSION = 1

# Kept from the record unless typed; typed differently, refused (they change the schedule,
# the data order, the numbers the optimizer state was built for, or the model itself).
# (section, field, option)
FIXED = (
    ("train", "model_size", "--model-size"),
    ("train", "max_seq_length", "--max-seq-length"),
    ("train", "num_epochs", "--num-epochs"),
    ("train", "precision", "--bf16/--fp16/--fp32"),
    ("train", "bf16_residual", "--bf16-residual/--fp32-residual"),
    ("train", "bf16_weights", "--bf16-weights/--fp32-weights"),
    ("train", "deepspeed", "--deepspeed"),
    ("train", "seed", "--seed"),
    ("optim", "learning_rate", "--learning-rate"),
    ("optim", "min_lr_ratio", "--min-lr-ratio"),
    ("optim", "warmup_steps", "--warmup-steps"),
    ("optim", "weight_decay", "--weight-decay"),
    ("optim", "beta1", "--beta1"),
    ("optim", "beta2", "--beta2"),
    ("optim", "eps", "--eps"),
    ("optim", "grad_clip", "--grad-clip"),
    ("data", "dataset_path", "--dataset-path"),
    ("data", "tokenizer_path", "--tokenizer-path"),
    ("data", "vocab_size", "--vocab-size"),
    ("data", "val_fraction", "--val-fraction"),
)
# Kept from the record unless typed; typed differently, applied with a note.
ADJUSTABLE = (
    ("ckpt", "save_steps", "--save-steps"),
    ("ckpt", "save_total_limit", "--save-total-limit"),
    ("train", "eval_steps", "--eval-steps"),
    ("train", "eval_batches", "--eval-batches"),
    ("train", "log_steps", "--log-steps"),
    ("train", "max_bad_steps", "--max-bad-steps"),
    ("train", "compile", "--compile/--no-compile"),
    ("train", "compile_mode", "--compile-mode"),
    ("train", "attn", "--attn"),
    ("train", "activation_checkpointing", "--activation-checkpointing"),
    ("train", "ce_chunk_tokens", "--ce-chunk-tokens"),
    ("train", "ddp_bucket_mb", "--ddp-bucket-mb"),
    ("train", "loss_kernel", "--loss-kernel/--no-loss-kernel"),
    ("train", "rope_kernel", "--rope-kernel"),
    ("train", "cudnn_grouped_kv", "--cudnn-grouped-kv"),
    ("train", "fp8", "--fp8"),  # the weights and the optimizer state are the same with and without it (fp8.py)
    ("train", "bf16_moments", "--bf16-moments/--fp32-moments"),  # the saved moments convert on load
)
_BATCH_DESTS = ("batch_size", "grad_accum", "global_batch_size")
# Runs recorded before the project's own FP8 linear was retired may name it (--fp8-impl native).
# Its weights and optimizer state are torchao's alike, so such a run goes on through torchao's
# tensorwise recipe, with this note: the same scaling, not the same rounding.
RETIRED_FP8_NOTE = ("--fp8-impl native: the run's FP8 matmuls ran through the project's own FP8 linear, "
                    "which is retired; it goes on through torchao's tensorwise recipe (the same scaling: "
                    "the losses will not repeat the earlier run's bit for bit)")


class RunMismatch(ConfigError):
    """A resume asked for a setting that would change the run; the message has the command that works."""


@dataclass
class Resolution:
    """What a start in an output folder does with the recorded run."""
    resuming: bool = False  # the recorded run goes on
    record: Optional[dict] = None
    resume_step: Optional[int] = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading and writing


def record_path(output_dir: Path) -> Path:
    return Path(output_dir) / RECORD_NAME


def read_record(output_dir: Path) -> Optional[dict]:
    """run.json, or the settings of the newest checkpoint in a folder made before run.json existed."""
    path = record_path(output_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _record_from_checkpoint(Path(output_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"실행 기록을 읽을 수 없습니다 / {path} is unreadable ({exc}); fix or remove it "
                          "(the checkpoints beside it keep their own settings)") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"실행 기록이 잘못되었습니다 / {path} is not a koen-sllm run record; remove it or "
                          "use another --output-dir")
    return data


def _record_from_checkpoint(output_dir: Path) -> Optional[dict]:
    ckpt = latest_checkpoint_dir(output_dir)
    if ckpt is None:
        return None
    info = _training_info(ckpt)
    if not info or not isinstance(info.get("config"), dict):
        return None
    plan = info.get("batch_plan") or {}
    return {"version": 0, "run_id": "", "config": info["config"], "max_steps": info.get("max_steps"),
            "global_batch_size": _global_from_plan(plan), "world_size": info.get("world_size"),
            "from_checkpoint": str(ckpt)}


def _global_from_plan(plan: dict) -> Optional[int]:
    try:
        return int(plan["micro_batch"]) * int(plan["world_size"]) * int(plan["grad_accum"])
    except (KeyError, TypeError, ValueError):
        return None


def latest_checkpoint_dir(output_dir: Path) -> Optional[Path]:
    """The checkpoint a resume would start from, found cheaply (the trainer verifies it later)."""
    output_dir = Path(output_dir)
    try:
        name = (output_dir / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name and (output_dir / name / "training_info.json").is_file():
        return output_dir / name
    steps = []
    for p in output_dir.glob("checkpoint-*") if output_dir.is_dir() else ():
        tail = p.name[len("checkpoint-"):]
        if tail.isdigit() and (p / "training_info.json").is_file():
            steps.append((int(tail), p))
    return max(steps)[1] if steps else None


def _training_info(ckpt: Path) -> Optional[dict]:
    try:
        data = json.loads((ckpt / "training_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_step(path: Optional[Path]) -> Optional[int]:
    info = _training_info(Path(path)) if path else None
    try:
        return int(info["step"]) if info else None
    except (KeyError, TypeError, ValueError):
        return None


def build_record(cfg: RunConfig, *, run_id: str, max_steps: int, global_batch_size: int, world_size: int,
                 command: Optional[Iterable[str]] = None, previous: Optional[dict] = None,
                 changes: Iterable[str] = ()) -> dict:
    """The record for a run whose schedule is now known; ``previous`` keeps the history of a resumed run."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    history = list((previous or {}).get("history") or [])
    history.append({"at": now, "run_id": run_id, "world_size": world_size,
                    "command": " ".join(shlex.quote(a) for a in command) if command else "",
                    "changes": list(changes)})
    return {
        "version": RECORD_VERSION,
        "run_id": (previous or {}).get("run_id") or run_id,
        "created": (previous or {}).get("created") or now,
        "updated": now,
        "mode": cfg.train.mode,
        "max_steps": int(max_steps),
        "global_batch_size": int(global_batch_size),
        "world_size": int(world_size),
        "config": cfg.to_dict(),
        "history": history[-50:],
    }


def write_record(output_dir: Path, record: dict) -> Path:
    """Atomically: a reader sees the old record or the new one, never half of one."""
    path = record_path(output_dir)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- the rules


def resolve_with_record(cfg: RunConfig, explicit: Iterable[str], world_size: int,
                        fresh_command: str = "./run_h100_dual.sh") -> Resolution:
    """Apply the output folder's recorded settings to ``cfg`` (before device defaults).

    ``explicit``: the destinations typed on the command line (config.explicit_options).
    Raises RunMismatch (a ConfigError) for a start that would damage or silently change the run.
    """
    explicit = set(explicit)
    out = cfg.output_dir
    record = read_record(out)
    if record is None:
        return Resolution()
    rec_mode = (record.get("config") or {}).get("train", {}).get("mode") or record.get("mode") or "train"
    resume = cfg.ckpt.resume or ("auto" if cfg.train.mode == "train" else "none")
    step = checkpoint_step(latest_checkpoint_dir(out))
    if rec_mode == "train" and step is not None:
        if cfg.train.mode == "test":
            raise RunMismatch(
                f"테스트는 학습 실행의 폴더에 쓰지 않습니다 / --test would write into {out}, which holds a training "
                f"run (step {step}); drop --output-dir (tests use outputs/test/) or pass another --output-dir")
        if resume == "none":
            raise RunMismatch(
                f"기존 학습을 덮어쓸 수 없습니다 / --resume none would start a new run over {out}, which holds a "
                f"training run (step {step}); resume it with --train, or start afresh with --output-dir "
                f"{_sibling(out)}")
    if rec_mode != "train" or resume == "none":
        notes = [f"{out} holds an earlier test run; this run replaces it"] if rec_mode != "train" and step else []
        if rec_mode != "train" and cfg.train.mode == "train" and resume == "auto":
            cfg.ckpt.resume = "none"  # a test run's checkpoint is no start for training
        return Resolution(notes=notes)
    if resume != "auto":
        given = Path(resume).expanduser()
        if not given.is_absolute():
            given = out / given if (out / given).exists() else Path.cwd() / given
        if given.resolve().parent != Path(out).resolve():
            return Resolution()  # a checkpoint from elsewhere: its own checks apply
        step = checkpoint_step(given)
    res = Resolution(resuming=step is not None, record=record, resume_step=step)
    if step is None:
        return res  # nothing saved yet: the recorded settings are not binding
    _apply(cfg, record, explicit, world_size, res, fresh_command)
    return res


def _sibling(out: Path) -> str:
    return shlex.quote(str(Path(out).with_name(Path(out).name + "-2")))


def _show(v: Any) -> str:
    return "default" if v is None else str(v)


def _apply(cfg: RunConfig, record: dict, explicit: set[str], world_size: int, res: Resolution,
           fresh_command: str) -> None:
    rc = RunConfig.from_dict(record["config"])
    refused: list[tuple[str, Any, Any]] = []
    for section, name, option in FIXED:
        now, then = getattr(getattr(cfg, section), name), getattr(getattr(rc, section), name)
        if name in explicit and now != then and not _same_path(section, name, now, then):
            refused.append((option, then, now))
        setattr(getattr(cfg, section), name, then)
    for section, name, option in ADJUSTABLE:
        now, then = getattr(getattr(cfg, section), name), getattr(getattr(rc, section), name)
        if name in explicit:
            if now != then:
                res.notes.append(f"{option}: {_show(then)} -> {_show(now)} (recorded {_show(then)})")
        else:
            setattr(getattr(cfg, section), name, then)
    if record["config"].get("train", {}).get("fp8_impl") == "native" and cfg.train.fp8 == "tensorwise":
        res.notes.append(RETIRED_FP8_NOTE)
    _apply_batch(cfg, rc, record, explicit, world_size, res, refused)
    _apply_max_steps(cfg, record, explicit, res, refused)
    if refused:
        what = "; ".join(f"{opt} {_show(new)} (the run has {_show(old)})" for opt, old, new in refused)
        keep = " ".join(opt.split("/")[0] for opt, _, _ in refused)
        raise RunMismatch(
            f"이어서 학습할 설정과 다릅니다 / resuming {cfg.output_dir} at step {res.resume_step} would change "
            f"the run: {what}; to resume, drop {keep} (the recorded settings apply); to start a new run with "
            f"them, add --output-dir {_sibling(cfg.output_dir)}")
    res.notes.insert(0, f"resuming the run recorded in {record_path(cfg.output_dir)} at step {res.resume_step} "
                        "with its settings / 기록된 설정으로 이어서 학습합니다")


def _same_path(section: str, name: str, now: Any, then: Any) -> bool:
    if section != "data" or name not in ("dataset_path", "tokenizer_path") or not now or not then:
        return False
    return Path(now).expanduser().resolve() == Path(then).expanduser().resolve()


def _apply_batch(cfg: RunConfig, rc: RunConfig, record: dict, explicit: set[str], world_size: int,
                 res: Resolution, refused: list) -> None:
    """The global batch (sequences per optimizer step) fixes the data order: it never changes;
    the micro-batch and the process count may, the accumulation making up the difference."""
    t = cfg.train
    recorded_global = record.get("global_batch_size") or rc.train.global_batch_size
    if recorded_global is None:
        return
    recorded_global = int(recorded_global)
    if "batch_size" not in explicit:
        t.batch_size = rc.train.batch_size
    if "global_batch_size" in explicit:
        if t.global_batch_size != recorded_global:
            refused.append(("--global-batch-size", recorded_global, t.global_batch_size))
        t.global_batch_size = recorded_global
    elif "grad_accum" in explicit and t.grad_accum is not None:
        typed = t.batch_size * world_size * t.grad_accum
        if typed != recorded_global:
            refused.append(("--grad-accum", f"{recorded_global // max(1, t.batch_size * world_size)}"
                            f" at --batch-size {t.batch_size}", t.grad_accum))
        t.global_batch_size = recorded_global
    else:
        t.grad_accum = None
        t.global_batch_size = recorded_global
    per_pass = t.batch_size * world_size
    if recorded_global % per_pass:
        raise RunMismatch(
            f"배치 크기를 맞출 수 없습니다 / the run's global batch is {recorded_global} sequences, which "
            f"--batch-size {t.batch_size} x {world_size} processes = {per_pass} does not divide; use a "
            f"--batch-size that divides {recorded_global // world_size if recorded_global % world_size == 0 else recorded_global} "
            f"(or another process count)")
    accum = recorded_global // per_pass
    old = (rc.train.batch_size, int(record.get("world_size") or 0))
    if (t.batch_size, world_size) != old:
        res.notes.append(f"batch: {old[0]} per process x {old[1]} -> {t.batch_size} x {world_size} with "
                         f"{accum} accumulation step(s); same global batch of {recorded_global} sequences")
    if accum > 1 and t.bf16_weights:
        # bf16 weights are exact only with one micro-batch per optimizer step (resolve_weights).
        fits = recorded_global // world_size if recorded_global % world_size == 0 else None
        raise RunMismatch(
            f"배치 크기를 맞출 수 없습니다 / this run keeps bf16 weights, which need one micro-batch per step, but "
            f"--batch-size {t.batch_size} x {world_size} processes needs {accum} to make the global batch of "
            f"{recorded_global}; " + (f"use --batch-size {fits}" if fits else "use the recorded process count"))


def _apply_max_steps(cfg: RunConfig, record: dict, explicit: set[str], res: Resolution,
                     refused: list) -> None:
    t = cfg.train
    recorded = record.get("max_steps")
    if recorded is None:
        recorded = RunConfig.from_dict(record["config"]).train.max_steps
    if recorded is None:
        return
    recorded = int(recorded)
    if "max_steps" not in explicit or t.max_steps == recorded:
        t.max_steps = recorded
        return
    step = res.resume_step or 0
    if t.max_steps > recorded and step >= recorded:
        before, after = _lr_at(cfg, step, recorded), _lr_at(cfg, step, t.max_steps)
        res.notes.append(f"--max-steps {recorded} -> {t.max_steps}: extends the finished schedule; the cosine "
                         f"decay is laid over {t.max_steps} steps, so the learning rate at step {step} goes "
                         f"from {before:.3g} to {after:.3g} / 학습 스케줄을 {t.max_steps} 스텝으로 늘립니다")
        return
    why = "the run has not finished its schedule" if step < recorded else "a shorter schedule"
    refused.append(("--max-steps", recorded, f"{t.max_steps} ({why})"))


def _lr_at(cfg: RunConfig, step: int, max_steps: int) -> float:
    from .optim import default_warmup, lr_factor  # torch is there wherever a resume is resolved

    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else default_warmup(max_steps)
    return o.learning_rate * lr_factor(step, max_steps, warmup, o.min_lr_ratio)
