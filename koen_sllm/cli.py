"""Entry logic behind scripts/train_h100_dual.py: parse, set up, train, summarize.

Exit codes: 0 done (or stopped cleanly by a signal), 1 a run-time failure with
a one-line reason, 2 a bad option (a DeepSpeed JSON that contradicts one, or
--deepspeed without the package, included).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Optional, Sequence

from .config import ConfigError, apply_device_defaults, derive_batch_plan, parse_args, resolve_weights
from .errors import KoenError, UsageError
from .config import explicit_options

# The Korean half of a one-line error whose English half names the option or the file.
_KO_CONFIG = "옵션 오류"
KO_FP8 = "FP8 학습을 할 수 없습니다"  # --fp8 without torchao or an FP8 GPU
KO_ATTN = "이 어텐션 커널을 쓸 수 없습니다"  # --attn fa4 / flash-attn without its package or GPU


def print_error(msg: str) -> None:
    print(f"❌ {msg}", file=sys.stderr, flush=True)


def bilingual(msg: str, korean: str = _KO_CONFIG) -> str:
    """``<Korean> / <English>``, unless the message already has its Korean half."""
    return msg if any("\uac00" <= ch <= "\ud7a3" for ch in msg) else f"{korean} / {msg}"


def resolve_config(argv: Sequence[str], world_size: int, has_cuda: bool):
    """Options, then the output folder's recorded run, then the device's defaults: the settings
    the run will use, with the notes to print. Raises ConfigError (exit 2)."""
    from .run_record import resolve_with_record

    cfg, ns = parse_args(argv)
    explicit = explicit_options(argv)  # a DeepSpeed JSON may replace defaults, never these
    resolution = resolve_with_record(cfg, explicit, world_size)
    notes = resolution.notes + apply_device_defaults(cfg, has_cuda)
    return cfg, ns, explicit, notes


def resolve_fully(cfg, explicit, notes, world_size: int, has_cuda: bool) -> list[str]:
    """The values the trainer resolves once the batch plan is known (the DeepSpeed JSON's, the
    weight precision), so a dry run shows exactly what the run will use. Raises ConfigError."""
    if cfg.train.deepspeed is not None:
        from .engines.deepspeed_config import apply_ds_options

        notes = notes + apply_ds_options(cfg, explicit, world_size)
    plan = derive_batch_plan(cfg, world_size)
    resolve_weights(cfg.train, plan.grad_accum, has_cuda, beta2=cfg.optim.beta2)
    return notes


def missing_requirements(cfg) -> list:
    """(error, Korean words) for each package or device the run needs and lacks: DeepSpeed for
    --deepspeed, an FP8 GPU and torchao for --fp8, the package and GPU
    of --attn fa4 / flash-attn. Checked before anything starts, by the trainer and by the
    launcher's resolve step."""
    missing = []
    if cfg.train.deepspeed is not None:
        from .engines.deepspeed import DeepSpeedUnavailable, require_deepspeed

        try:
            require_deepspeed()
        except DeepSpeedUnavailable as exc:
            missing.append((exc, "패키지 없음"))
    if cfg.train.fp8 != "off":
        from .fp8 import Fp8Unavailable, check_fp8_support

        try:
            check_fp8_support(fp8_device(), cfg.train.fp8)
        except Fp8Unavailable as exc:
            missing.append((exc, KO_FP8))
    if cfg.train.attn in ("fa4", "flash-attn"):
        from .attention import AttentionBackendError, check_backend

        try:
            check_backend(cfg.train.attn, load=False)  # the import itself is checked when the model is built
        except AttentionBackendError as exc:
            missing.append((exc, KO_ATTN))
    return missing


def fp8_device():
    """The GPU this process will train on (distributed.init_distributed picks the same), for --fp8's check."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)


def _dry_run(cfg, explicit, notes, world_size: int, has_cuda: bool) -> int:
    try:
        notes = resolve_fully(cfg, explicit, notes, world_size, has_cuda)
    except ConfigError as exc:
        print_error(bilingual(str(exc)))
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(cfg.to_json())
    return 0


def _take_folders(cfg, info) -> Optional[list]:
    """One writer per folder: rank 0 locks the output and logs folders for the life of the run
    (the kernel releases them if it dies). Returns the held locks, or None when a folder is busy
    (the reason printed by rank 0). Every rank learns the outcome, so none waits at a collective."""
    from . import distributed as D
    from .run_lock import FolderBusy, FolderLock

    locks, error = [], None
    if info.is_main:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": os.environ.get("KOEN_RUN_ID", ""),
                 "mode": cfg.train.mode, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "command": " ".join(sys.argv)}
        folders = [(cfg.output_dir, "output folder", "--output-dir")]
        if cfg.logs_dir != cfg.output_dir:
            folders.append((cfg.logs_dir, "logs folder", "--logs-dir"))
        try:
            for folder, what, option in folders:
                lock = FolderLock(folder, what, option)
                lock.acquire(owner)
                locks.append(lock)
        except (FolderBusy, OSError) as exc:
            error = str(exc) if isinstance(exc, FolderBusy) else \
                f"폴더를 잠글 수 없습니다 / cannot lock {folder} ({exc}); check its permissions or pass another {option}"
            for lock in locks:
                lock.release()
    error = D.broadcast_object(error)
    if error:
        if info.is_main:
            print_error(error)
        return None
    return locks


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from .parent_watch import die_with_parent, under_torchrun

    if under_torchrun():
        die_with_parent()
    try:
        parse_args(argv)  # option errors first, before torch is imported
    except ConfigError as exc:
        print_error(bilingual(f"{exc} (see --help)"))
        return 2

    import torch

    from . import distributed as D
    from .logs import close_handlers, setup_logging

    world_size, has_cuda = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available()
    try:
        cfg, ns, explicit, notes = resolve_config(argv, world_size, has_cuda)
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print_error(bilingual(str(exc)))
        return 2
    if ns.dry_run:
        return _dry_run(cfg, explicit, notes, world_size, has_cuda)
    missing = missing_requirements(cfg)  # now, not after the data is prepared and the model built
    if missing:
        if int(os.environ.get("RANK", "0")) == 0:
            exc, korean = missing[0]
            print_error(bilingual(str(exc), korean))
        return 2

    try:
        info = D.init_distributed()
    except Exception as exc:
        print_error(f"프로세스 그룹 참여 실패 / could not join the process group: {exc}")
        return 1
    locks = _take_folders(cfg, info)
    if locks is None:
        D.cleanup()
        return 1
    log = setup_logging(cfg.logs_dir, info.rank, cfg.train.verbose)
    code = 1
    try:
        code = _run(cfg, info, notes, log, explicit)
        if code == 0:
            # Tear the group down together: a rank that closes its sockets while a peer's
            # gloo threads still talk to it can abort that peer on its way out.
            D.barrier()
    except KeyboardInterrupt:
        log.error("interrupted")
        code = 130
    finally:
        close_handlers(log)
        D.cleanup()
        for lock in locks:
            lock.release()
    return code


def _record_run(cfg, trainer, info, notes, log) -> None:
    """Keep the settings that now drive the run in its output folder (rank 0), so that a plain
    ``--train`` resumes it as it was. A failed write costs the next resume its defaults, not
    this run: a warning, not a stop."""
    if not info.is_main:
        return
    from .config import RunConfig
    from .optim import default_warmup
    from .run_record import build_record, read_record, write_record

    resolved = RunConfig.from_dict(cfg.to_dict())
    resolved.train.max_steps = trainer.max_steps
    resolved.train.global_batch_size = trainer.plan.sequences_per_step
    if resolved.optim.warmup_steps is None:
        resolved.optim.warmup_steps = default_warmup(trainer.max_steps)
    try:
        previous = read_record(cfg.output_dir) if trainer.step > 0 else None
    except ConfigError:
        previous = None
    record = build_record(resolved, run_id=os.environ.get("KOEN_RUN_ID") or time.strftime("%Y%m%d-%H%M%S"),
                          max_steps=trainer.max_steps, global_batch_size=trainer.plan.sequences_per_step,
                          world_size=info.world_size, command=sys.argv, previous=previous, changes=notes)
    try:
        write_record(cfg.output_dir, record)
    except OSError as exc:
        log.warning("⚠️  could not write the run record in %s (%s): a later resume needs its options typed "
                    "again / 실행 기록 저장 실패", cfg.output_dir, exc)


def _run(cfg, info, notes, log, explicit=frozenset()) -> int:
    from .trainer import Trainer

    t0 = time.time()
    mode = "test / 테스트 모드" if cfg.train.mode == "test" else "train / 학습 모드"
    log.info("koen-sllm trainer | mode %s | %d process(es) | device %s | backend %s",
             mode, info.world_size, info.device.type, info.backend or "none")
    if info.device.type == "cpu":
        log.warning("⚠️  no GPU found: running on CPU with gloo; this is for checking the pipeline, not for "
                    "real training / GPU 없음: CPU(gloo)로 실행합니다 (검증용)")
    for note in notes:
        log.info("note: %s", note)
    log.debug("configuration:\n%s", cfg.to_json())
    try:
        trainer = Trainer(cfg, info, explicit)
        trainer.setup()
        _record_run(cfg, trainer, info, notes, log)
        summary = trainer.train()
    except KoenError as exc:  # one line, and the exit code its type stands for (errors.py)
        # Every rank checks the same options the same way; rank 0 speaks for a bad one.
        (log.error if info.is_main or not isinstance(exc, UsageError) else log.info)("❌ %s", exc)
        return exc.exit_code
    except Exception as exc:  # keep the traceback in the detail log, one line on the console
        log.debug("traceback", exc_info=True)
        log.error("❌ %s: %s (full traceback in %s)", type(exc).__name__, exc,
                  cfg.logs_dir / f"training_detail_rank_{info.rank}.log")
        return 1

    minutes = (time.time() - t0) / 60
    head = "Training stopped (signal) / 학습 중단됨" if summary.stopped_by_signal else "Training complete / 학습 완료"
    log.info("=" * 60)
    log.info("✅ %s", head)
    log.info("   steps: %d | final loss %.4f | bad steps skipped: %d | time %.1f min",
             summary.steps, summary.final_loss, summary.bad_steps, minutes)
    if summary.loss_spikes:
        log.info("   loss spikes: %d (warnings above; \"spike\" records in metrics.jsonl)", summary.loss_spikes)
    if trainer.last_val:
        log.info("   validation: %s", " | ".join(f"{k} {v:.4f}" for k, v in sorted(trainer.last_val.items())))
    log.info("   checkpoint: %s", summary.last_checkpoint)
    log.info("   outputs: %s", cfg.output_dir)
    log.info("   logs: %s (metrics: %s)", cfg.logs_dir, cfg.logs_dir / "metrics.jsonl")
    if trainer.data.used_dummy:
        (log.warning if info.is_main else log.info)(
            "   ⚠️  trained on DUMMY data: prepare real data with scripts/run_preprocessing.sh --recipe1")
    log.info("=" * 60)
    return 0
