"""Entry logic behind scripts/train_h100_dual.py: parse, set up, train, summarize.

Exit codes: 0 done (or stopped cleanly by a signal), 1 a run-time failure with
a one-line reason, 2 a bad option (a DeepSpeed JSON that contradicts one, or
--deepspeed without the package, included).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from .config import ConfigError, apply_device_defaults, parse_args
from .ds_config import explicit_options


def _print_err(msg: str) -> None:
    print(f"❌ {msg}", file=sys.stderr, flush=True)


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, ns = parse_args(argv)
        explicit = explicit_options(argv)  # a DeepSpeed JSON may replace defaults, never these
    except ConfigError as exc:
        _print_err(f"{exc} (see --help)")
        return 2

    import torch

    from . import distributed as D
    from .logs import close_handlers, setup_logging

    try:
        notes = apply_device_defaults(cfg, torch.cuda.is_available())
    except ConfigError as exc:
        _print_err(str(exc))
        return 2
    if ns.dry_run:
        if cfg.train.deepspeed is not None:  # show the values the run will use, the JSON's included
            from .ds_config import apply_ds_options

            try:
                notes += apply_ds_options(cfg, explicit, int(os.environ.get("WORLD_SIZE", "1")))
            except ConfigError as exc:
                _print_err(str(exc))
                return 2
        if int(os.environ.get("RANK", "0")) == 0:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(cfg.to_json())
        return 0
    if cfg.train.deepspeed is not None:
        from .ds_backend import DeepSpeedUnavailable, require_deepspeed

        try:  # now, not after the data is prepared and the model built
            require_deepspeed()
        except DeepSpeedUnavailable as exc:
            _print_err(str(exc))
            return 2

    try:
        info = D.init_distributed()
    except Exception as exc:
        _print_err(f"could not join the process group: {exc}")
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
    return code


def _run(cfg, info, notes, log, explicit=frozenset()) -> int:
    from .attention import AttentionBackendError
    from .checkpoint import CheckpointError
    from .ds_backend import DeepSpeedBackendError
    from .run_state import RunSetupError
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
        summary = trainer.train()
    except (RunSetupError, CheckpointError, ConfigError, AttentionBackendError, DeepSpeedBackendError) as exc:
        # Every rank checks the same options the same way; rank 0 speaks for a bad one.
        (log.error if info.is_main or not isinstance(exc, ConfigError) else log.info)("❌ %s", exc)
        return 2 if isinstance(exc, (ConfigError, AttentionBackendError)) else 1
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
