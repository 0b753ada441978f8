#!/usr/bin/env python3
"""Does a preset train on this machine under a DeepSpeed config? Memory at each phase of the start.

    python benchmarks/bench_zero3_fit.py --model-size 8b --batch-size 1 --steps 3
    python benchmarks/host_memory.py --json host.json --floor-gib 6 -- \\
        python benchmarks/bench_zero3_fit.py --model-size 8b --deepspeed configs/ds_zero3_offload.json --no-compile

One process on one GPU, through the trainer's own code (Trainer.build, the DeepSpeed runner,
Trainer.train_step) on random tokens, without the run's checks of data and disk (an 8b checkpoint
needs about 130 GiB of disk, which says nothing about whether the model trains). After each phase,
built (under ZeRO-3 the weights are partitioned while they are built), engine started (optimizer
partitions allocated) and each step, it prints and records the peak GPU memory, this process's
resident host memory and the host memory still available, so a run stopped for memory (by
host_memory.py --floor-gib, or by the kernel) shows how far it got. Writes --json after every
phase. A benchmark: nothing here asserts a number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from bench_throughput import VOCAB, RandomTokens  # noqa: E402
from host_memory import GIB, available_bytes, tree_rss_bytes  # noqa: E402
from koen_sllm import distributed as D  # noqa: E402
from koen_sllm.config import apply_device_defaults, explicit_options, parse_args as parse_run_args  # noqa: E402
from koen_sllm.engines import deepspeed as DSB  # noqa: E402
from koen_sllm.metrics import peak_flops, peak_memory_gib  # noqa: E402
from koen_sllm.trainer import Trainer  # noqa: E402

DEFAULT_CONFIG = HERE.parent / "configs" / "ds_zero3_offload.json"


def snapshot(phase: str, started: float, device: torch.device, **extra) -> dict:
    rec = {"phase": phase, "seconds": round(time.monotonic() - started, 1),
           "gpu_peak_gib": round(peak_memory_gib(device) or 0.0, 2),
           "host_rss_gib": round(tree_rss_bytes(os.getpid()) / GIB, 2),
           "host_available_gib": round(available_bytes() / GIB, 2), **extra}
    print(" | ".join(f"{k} {v}" for k, v in rec.items()), flush=True)
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="8b")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--deepspeed", default=str(DEFAULT_CONFIG), help="the DeepSpeed JSON (default: the shipped ZeRO-3 offload file)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path, default=Path("outputs/bench_zero3_fit.json"))
    args = p.parse_args()
    cuda = torch.cuda.is_available()  # on CPU (DS_ACCELERATOR=cpu) it checks the code path, not memory
    argv = ["--train", "--model-size", args.model_size, "--batch-size", str(args.batch_size),
            "--max-seq-length", str(args.seq_len), "--max-steps", str(args.steps), "--deepspeed", args.deepspeed]
    if args.no_compile:
        argv.append("--no-compile")
    cfg, _ = parse_run_args(argv)
    apply_device_defaults(cfg, cuda)
    started = time.monotonic()
    report = {"args": vars(args) | {"json": str(args.json), "deepspeed": args.deepspeed},
              "device": torch.cuda.get_device_name() if cuda else "cpu", "phases": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def record(rec: dict) -> None:
        report["phases"].append(rec)
        args.json.write_text(json.dumps(report, indent=2))

    tr = Trainer(cfg, D.init_distributed(), explicit_options(argv))
    tr.plan = tr._batch_plan()  # the JSON merged into the options first, as the trainer's setup does
    tr.build(VOCAB, RandomTokens(args.seq_len, tr.plan.micro_batch, pin=cuda))
    dev = tr.device
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    record(snapshot("built", started, dev, params=tr.num_params, backend=DSB.describe(tr.ds_config)))
    tr.engine = DSB.DeepSpeedRunner(tr.raw_model, tr.ds_config, compile=bool(cfg.train.compile))
    tr.finalize()
    record(snapshot("engine started", started, dev))
    tokens = tr.plan.tokens_per_step
    peak = peak_flops(torch.cuda.get_device_name(), cfg.train.precision) if cuda else None
    for step in range(1, args.steps + 1):
        sync()
        t0 = time.perf_counter()
        loss, _, _ = tr.train_step()
        sync()
        dt = time.perf_counter() - t0
        mfu = tokens / dt * tr.flops_per_token / peak if peak else None
        record(snapshot(f"step {step}", started, dev, loss=round(float(loss), 4), step_s=round(dt, 2),
                        tokens_per_s=round(tokens / dt), mfu=round(mfu, 4) if mfu else None))
    report["fits"] = True
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
