#!/usr/bin/env python3
"""Training throughput: this project's training step against the transformers Trainer peer.

    python benchmarks/bench_throughput.py --quick                      # a few minutes on one GPU
    python benchmarks/bench_throughput.py --model-size 350m --batch-size 8 --seq-len 2048
    python benchmarks/bench_throughput.py --only ours --model-size 1.3b --attn cudnn
    python benchmarks/bench_throughput.py --only ours --ce-chunk-tokens 4096 --profile   # a lever, with a kernel breakdown
    python benchmarks/bench_throughput.py --curve --data datasets/prepared/mixed_pretraining/train.bin --steps 200

Both sides train the same Llama shape on the same random tokens (vocabulary
32000) with bf16, torch.compile and fused AdamW, one after the other in this
process, on whatever GPU is present. "ours" runs koen_sllm.trainer.Trainer's
own train_step (the code ./run_h100_dual.sh uses); the peer is
transformers.Trainer on LlamaForCausalLM built from the same config and weights,
configured as a user tuning it would (peer_training_kwargs: the loss read every 10 steps, two
loader workers, non-blocking copies, no per-step NaN check or progress bar; --peer-* options
bring back the earlier, untuned peer), and the report records those settings (peer_settings).
Warm-up steps (compilation) are excluded. A step's time is its period (from one
step's end to the next one's, as a training loop sees it), with no synchronize added
for the clock; --sync-each-step times each step between two synchronizes instead.
Prints a table and writes JSON.

--curve compares learning instead of speed: both sides start from the same
weights and read the same token file in the same order with the same targets,
optimizer groups and schedule (this project's, handed to the Trainer), and every
step's loss is kept; a second run of ours with another seed shows the noise.
--curve with a numeric lever (--fp8 RECIPE, --bf16-moments) compares the lever with the
same run without it instead (no peer; without --bf16-moments means with --fp32-moments): the run
without the lever, the lever from the same weights and batches, and the run without the lever
with the next seed as the noise band.
--profile adds where the GPU time of three steady-state steps goes (matmuls, attention,
fused elementwise kernels, optimizer, idle); the profiler slows the host, so its idle share
is an upper bound. --trace FILE.json.gz writes a Chrome trace of two more steps (open it in
Perfetto) for reading what the host does while the GPU waits. --liger swaps in liger-kernel's
Triton kernels (if installed) to measure them as a lever.
This is a benchmark, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_analysis import compare_curves, plot_curves, profile_steps, trace_steps  # noqa: E402
from koen_sllm import distributed as D  # noqa: E402
from koen_sllm.config import TrainConfig as RunDefaults, apply_device_defaults  # noqa: E402
from koen_sllm.config import parse_args as parse_run_args  # noqa: E402
from koen_sllm.metrics import peak_flops, peak_memory_gib  # noqa: E402
from koen_sllm.kernels import flash_attn4  # noqa: E402
from koen_sllm.losses import IGNORE_INDEX  # noqa: E402
from koen_sllm.optim import build_optimizer, build_scheduler  # noqa: E402
from koen_sllm.trainer import Trainer  # noqa: E402
from koen_sllm.hf import mapping as HF  # noqa: E402

VOCAB = 32000


class RandomTokens:
    """Fixed random token batches: the loader interface without any I/O."""

    def __init__(self, seq_len: int, micro_batch: int, seed: int = 0, pin: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, VOCAB, (micro_batch, seq_len + 1), generator=g) for _ in range(4)]
        pin = pin and torch.cuda.is_available()  # pageable: the copy to the GPU holds the host until done
        self.pairs = [tuple(t.contiguous().pin_memory() if pin else t.contiguous() for t in (b[:, :-1], b[:, 1:]))
                      for b in self.batches]
        self.i, self.num_samples, self.epoch = 0, 10**9, 0.0

    def next_batch(self):
        pair = self.pairs[self.i % len(self.pairs)]
        self.i += 1
        return pair


class FileTokens:
    """Consecutive windows of a packed token file, in order, for both trainers alike.

    Window k is tokens [k*T, k*T + T + 1). The last target of every sequence is
    ignored, because transformers' causal-LM loss shifts the labels inside the
    model and so never sees it: both sides then score exactly the same targets."""

    def __init__(self, path: Path, seq_len: int, micro_batch: int):
        from koen_sllm.data.pack import open_tokens

        self.tokens, self.seq_len, self.micro_batch = open_tokens(path), seq_len, micro_batch
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < micro_batch:
            raise SystemExit(f"{path}: {len(self.tokens):,} tokens are too few for batch {micro_batch} x {seq_len}")
        self.i, self.num_samples, self.epoch = 0, self.num_windows, 0.0

    def window(self, k: int) -> torch.Tensor:
        start = (k % self.num_windows) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def next_batch(self):
        rows = torch.stack([self.window(self.i + r) for r in range(self.micro_batch)])
        self.i += self.micro_batch
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
        y[:, -1] = IGNORE_INDEX
        return (x.pin_memory(), y.pin_memory()) if torch.cuda.is_available() else (x, y)


def run_config(args, seed: int, plain: bool = False):
    """``plain`` drops the numeric levers (--fp8; --bf16-moments becomes --fp32-moments): the run a lever
    curve compares with."""
    argv = ["--train", "--model-size", args.model_size, "--batch-size", str(args.batch_size),
            "--max-seq-length", str(args.seq_len), "--max-steps", str(args.steps + args.warmup),
            "--attn", args.attn, "--learning-rate", str(args.lr), "--bf16", "--seed", str(seed),
            "--ce-chunk-tokens", str(args.ce_chunk_tokens), "--grad-accum", str(args.grad_accum)]
    if args.fp32_residual:
        argv.append("--fp32-residual")
    if args.fp32_weights:
        argv.append("--fp32-weights")
    if args.bf16_moments:  # the default where the master-weight optimizer runs; named so that plain differs
        argv.append("--fp32-moments" if plain else "--bf16-moments")
    elif args.fp32_moments:
        argv.append("--fp32-moments")
    if args.warmup_steps is not None:
        argv += ["--warmup-steps", str(args.warmup_steps)]
    if args.no_compile:
        argv.append("--no-compile")
    elif args.compile_mode != "auto":
        argv += ["--compile-mode", args.compile_mode]
    # The kernel levers through the run's own options, the path users take.
    if args.expand_kv:
        argv += ["--cudnn-grouped-kv", "off"]  # the earlier path: K/V expanded to the query head count
    if args.rope_forward == "kernel":
        argv.append("--rope-kernel")
    if args.cross_entropy == "compiled":
        argv.append("--no-loss-kernel")
    if args.fp8 != "off" and not plain:
        argv += ["--fp8", args.fp8]
    cfg, _ = parse_run_args(argv)
    apply_device_defaults(cfg, torch.cuda.is_available())
    return cfg


def numeric_lever(args) -> str:
    """The levers that change the arithmetic, named as the curve reports them ('' for none)."""
    parts = []
    if args.fp8 != "off":
        parts.append(f"fp8 {args.fp8} (torchao)")
    if args.bf16_moments:
        parts.append("bf16 moments")
    return " + ".join(parts)


def token_source(args):
    if args.data:
        return FileTokens(args.data, args.seq_len, args.batch_size)
    return RandomTokens(args.seq_len, args.batch_size, pin=not args.pageable_batches)


def run_ours(args, seed: int = 0, name: str = "koen_sllm", plain: bool = False) -> dict:
    """``plain``: without the numeric levers (a lever curve runs the default and the lever in one process)."""
    if args.fa4_deterministic:
        flash_attn4.deterministic_backward = True  # FA4's ordered backward, as deterministic algorithms ask
    tr = Trainer(run_config(args, seed, plain), D.init_distributed())
    tr.build(VOCAB, token_source(args))
    if args.liger:
        from liger_levers import apply_liger

        print(f"liger-kernel: {apply_liger(tr.raw_model, args.liger)}")
    tr.finalize()  # settles and probes attention (auto's kernel, the grouped-K/V path); compiles at the first step
    print(f"attention: {tr.attention}", flush=True)
    levers = tr.engine.levers  # the DDP engine's switches (engines/ddp.py)
    if args.update_after_vote:
        levers.early_update = False  # the earlier order: read the vote, then launch the update
    if args.update_after_vote or args.clip_separate:
        levers.clip_in_update = False  # clip_grad_norm_ scales the gradients in a pass of its own
    tr.engine.train()
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    torch.cuda.synchronize()
    last = time.perf_counter()
    for i in range(args.warmup + args.steps):
        if args.sync_each_step:
            torch.cuda.synchronize()
            last = time.perf_counter()
        loss, _, _ = tr.train_step()
        if args.sync_each_step:
            torch.cuda.synchronize()
        now = time.perf_counter()  # without the extra sync: the step's period, as the trainer's loop sees it
        times.append(now - last)
        last = now
        losses.append(float(loss))
    fpt = tr.raw_model.flops_per_token(args.seq_len)
    res = _summarize(name, times[args.warmup:], args, fpt, losses)
    res["attention"] = tr.attention
    if args.profile:
        res["profile"] = profile_steps(tr.train_step, 3)
    if args.trace:
        res["trace"] = str(trace_steps(tr.train_step, 2, args.trace))
    del tr
    return res


def run_peer(args) -> dict:
    import transformers.trainer as hf_trainer
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer as HFTrainer, TrainerCallback, TrainingArguments

    spec = importlib.util.find_spec("datasets")
    if spec is not None and spec.origin is None:
        # Without the datasets package, this repository's datasets/ folder (on sys.path for
        # koen_sllm) imports as an empty namespace package, and the Trainer would look for
        # datasets.Dataset in it: tell the Trainer there is no datasets package.
        hf_trainer.is_datasets_available = lambda: False

    from koen_sllm.model import KoEnLM, model_config_from_preset

    mcfg = model_config_from_preset(args.model_size, VOCAB, args.seq_len)
    torch.manual_seed(args.seed)  # the initial weights ours starts from (Trainer.build seeds the same way)
    ours = KoEnLM(mcfg)
    hf_cfg = HF.hf_config(ours, 2, 3, 0)
    if hf_cfg.get("architectures", [""])[0] != "LlamaForCausalLM":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(hf_cfg["model_type"], **{k: v for k, v in hf_cfg.items() if k != "model_type"})
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:
        config = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(HF.hf_state_dict(ours), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    fpt = ours.flops_per_token(args.seq_len)  # the same shape: one FLOPs count for both sides
    del ours
    tokens = token_source(args)
    served = [0]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            if args.data:  # the k-th item asked for is window k, whatever index the sampler picks
                b = tokens.window(served[0])[:-1]
                served[0] += 1
            else:
                b = tokens.batches[(i // args.batch_size) % len(tokens.batches)][i % args.batch_size, :-1]
            return {"input_ids": b, "labels": b}

    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        last = None

        def on_step_begin(self, *a, **k):
            if args.sync_each_step or self.last is None:
                torch.cuda.synchronize()
                self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.sync_each_step:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    out = Path(args.json).parent / "hf_trainer_tmp"
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, seed=args.seed, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1,
        adam_beta2=0.95, max_grad_norm=1.0, **peer_training_kwargs(args),
    )
    optimizers = (None, None)
    if args.curve:  # this project's decay groups and schedule, so only model and loop differ
        cfg = run_config(args, args.seed)
        opt = build_optimizer(model, cfg.optim, torch.device("cuda"))
        optimizers = (opt, build_scheduler(opt, cfg.optim, args.steps + args.warmup))
    model.to("cuda")
    torch.cuda.reset_peak_memory_stats()
    HFTrainer(model=model, args=targs, train_dataset=DS(), callbacks=[Timer()], optimizers=optimizers).train()
    res = _summarize("transformers.Trainer", times[args.warmup:], args, fpt, losses)
    res["peer_settings"] = peer_settings(args)
    return res


def peer_training_kwargs(args) -> dict:
    """The transformers Trainer's speed-relevant TrainingArguments, as a user tuning it would set them.

    Defaults (the honest peer): bf16 autocast over fp32 weights, torch.compile, fused AdamW,
    TF32 on, the loss read every --peer-logging-steps (10) steps, --peer-workers (2) persistent
    loader workers with pinned batches copied without blocking the host, no per-step NaN/inf check
    of the loss (transformers' default reads the loss on the host every step for it), no progress
    bar, no evaluation, checkpointing or token counting. The peer of the earlier figures in
    docs/benchmarks.md (logging every step, no workers, the NaN/inf check, a blocking copy, the
    progress bar):
    --peer-logging-steps 1 --peer-workers 0 --peer-nan-filter --peer-blocking-copy --peer-progress-bar.
    --curve keeps one log per step and no workers whatever the options: the loss curve needs every
    step's loss, and its token windows are served in order by a counter each worker would copy
    (a curve is not a speed figure)."""
    logging_steps = 1 if args.curve else args.peer_logging_steps
    workers = 0 if args.curve else args.peer_workers
    kwargs = dict(
        bf16=True, tf32=True, torch_compile=not args.no_compile, optim="adamw_torch_fused",
        logging_steps=logging_steps, logging_nan_inf_filter=args.peer_nan_filter,
        dataloader_num_workers=workers, dataloader_pin_memory=True, dataloader_persistent_workers=workers > 0,
        dataloader_prefetch_factor=args.peer_prefetch if workers > 0 else None,
        accelerator_config={"non_blocking": not args.peer_blocking_copy},
        disable_tqdm=not args.peer_progress_bar, eval_strategy="no", save_strategy="no",
        include_num_input_tokens_seen="no", report_to=[],
    )
    return kwargs


def peer_settings(args) -> dict:
    """What the peer ran with, for the JSON report and next to every ratio printed."""
    kw = peer_training_kwargs(args)
    keys = ("bf16", "tf32", "torch_compile", "optim", "logging_steps", "logging_nan_inf_filter",
            "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
            "dataloader_prefetch_factor", "disable_tqdm", "eval_strategy", "save_strategy",
            "include_num_input_tokens_seen")
    settings = {k: kw[k] for k in keys}
    settings["accelerator_config.non_blocking"] = kw["accelerator_config"]["non_blocking"]
    settings["attn_implementation"] = "sdpa"
    settings["weights"] = "fp32, bf16 autocast"
    return settings


def peer_settings_text(settings: dict) -> str:
    """One line of the settings that decide the peer's speed."""
    s = settings
    workers = s["dataloader_num_workers"]
    loader = (f"{workers} persistent workers, prefetch {s['dataloader_prefetch_factor']}" if workers
              else "no loader workers")
    return (f"logging_steps={s['logging_steps']}, {loader}, pinned, "
            f"{'non-blocking' if s['accelerator_config.non_blocking'] else 'blocking'} copy, "
            f"nan/inf filter {'on' if s['logging_nan_inf_filter'] else 'off'}, "
            f"progress bar {'off' if s['disable_tqdm'] else 'on'}, bf16, "
            f"{'torch_compile, ' if s['torch_compile'] else ''}{s['optim']}, SDPA")


def _summarize(name, times, args, fpt, losses) -> dict:
    step = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tok_s = args.batch_size * args.grad_accum * args.seq_len / step
    peak = peak_flops(torch.cuda.get_device_name(), "bf16")
    return {"name": name, "median_step_s": step, "tokens_per_s": tok_s,
            "mfu": tok_s * fpt / peak if peak else None, "peak_mem_gib": peak_memory_gib(torch.device("cuda")),
            "flops_per_token": fpt, "first_losses": losses[:5], "last_loss": losses[-1] if losses else None,
            "losses": losses}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="350m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--attn", default="auto")
    p.add_argument("--fa4-deterministic", action="store_true",
                   help="ours: FA4's backward in its ordered, bit-reproducible mode instead of atomic additions")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="auto",
                   help="ours: torch.compile mode (the trainer's; reduce-overhead = CUDA graphs, auto takes them on one GPU)")
    p.add_argument("--expand-kv", action="store_true",
                   help="ours: expand K/V to the query head count for cuDNN attention (the earlier path)")
    defaults = RunDefaults()
    p.add_argument("--rope-forward", choices=("compiled", "kernel"),
                   default="kernel" if defaults.rope_kernel else "compiled",
                   help="ours: the q/k rotation's forward as Inductor-fused torch operations or the "
                        "Triton kernel its backward uses (default: the trainer's)")
    p.add_argument("--cross-entropy", choices=("compiled", "kernel"),
                   default="kernel" if defaults.loss_kernel else "compiled",
                   help="ours: the loss as F.cross_entropy fused by Inductor, or the loss and its gradient "
                        "from one Triton pass (default: the trainer's)")
    p.add_argument("--pageable-batches", action="store_true",
                   help="random batches in pageable host memory instead of pinned (the copy then blocks the host)")
    p.add_argument("--only", choices=("ours", "peer"))
    p.add_argument("--quick", action="store_true", help="15 measured steps after 5 warm-up steps")
    p.add_argument("--json", default="outputs/bench_throughput.json")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (both sides)")
    p.add_argument("--warmup-steps", type=int, help="learning-rate warm-up (default: the trainer's, 1%% of steps)")
    p.add_argument("--seed", type=int, default=0, help="initial weights (both sides)")
    p.add_argument("--ce-chunk-tokens", type=int, default=0, help="ours: chunked output layer + loss (0 = off)")
    p.add_argument("--fp32-residual", action="store_true",
                   help="ours: the residual stream in fp32, as transformers (the default is bf16 since 2026-12)")
    p.add_argument("--fp32-weights", action="store_true",
                   help="ours: fp32 weights cast by autocast and torch's fused AdamW (the default is bf16 weights "
                        "with fp32 masters in the optimizer since 2026-12)")
    moments = p.add_mutually_exclusive_group()
    moments.add_argument("--bf16-moments", action="store_true",
                         help="ours: AdamW's moments stored in bf16 by the master-weight optimizer (the trainer's "
                              "default since 2026-12; with --curve, compared with --fp32-moments)")
    moments.add_argument("--fp32-moments", action="store_true",
                         help="ours: AdamW's moments in fp32 (the trainer's --fp32-moments, the default before 2026-12)")
    p.add_argument("--fp8", choices=("off", "tensorwise", "rowwise"), default="off",
                   help="ours: the projections' matmuls in FP8 (the trainer's --fp8); "
                        "MFU stays against the dense bf16 peak")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="ours: micro-batches per optimizer step (with --only ours; not with --curve)")
    p.add_argument("--liger", help="ours: liger-kernel parts to swap in, comma-separated: rmsnorm,swiglu,rope,flce or all")
    p.add_argument("--profile", action="store_true", help="ours: GPU time by kernel kind over 3 more steps")
    p.add_argument("--trace", type=Path, metavar="FILE.json.gz",
                   help="ours: a gzipped Chrome trace of 2 more steps (kernels, host operators and launches)")
    p.add_argument("--update-after-vote", action="store_true",
                   help="ours: launch the optimizer only after the host has read the step's vote (the earlier order)")
    p.add_argument("--clip-separate", action="store_true",
                   help="ours: clip the gradients in their own pass (clip_grad_norm_), not inside the fused update")
    p.add_argument("--peer-logging-steps", type=int, default=10,
                   help="peer: read the loss every N steps (1 = a host sync every step, as in the earlier figures)")
    p.add_argument("--peer-workers", type=int, default=2, help="peer: data-loader worker processes (0 = none)")
    p.add_argument("--peer-prefetch", type=int, default=2, help="peer: batches each loader worker prepares ahead")
    p.add_argument("--peer-nan-filter", action="store_true",
                   help="peer: transformers' default logging_nan_inf_filter, which reads the loss every step")
    p.add_argument("--peer-blocking-copy", action="store_true",
                   help="peer: accelerate's default blocking host-to-GPU batch copy (non_blocking=False)")
    p.add_argument("--peer-progress-bar", action="store_true", help="peer: keep the tqdm progress bar")
    p.add_argument("--sync-each-step", action="store_true",
                   help="synchronize the GPU around every timed step (the method before step periods were used)")
    p.add_argument("--data", type=Path, help="a packed token file (train.bin) instead of random tokens")
    p.add_argument("--curve", action="store_true",
                   help="compare loss curves on --data: ours, the peer, and ours with seed+1 (the noise); "
                        "with --fp8 or --bf16-moments: the run without the lever, the lever, and without it with seed+1")
    p.add_argument("--plot", type=Path, help="with --curve: draw the curves into this PNG")
    p.add_argument("--replot", type=Path, metavar="JSON", help="redraw --plot from a saved --curve JSON; no GPU needed")
    return p


def main() -> int:
    p = build_parser()
    args = p.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        out = args.plot or args.replot.with_suffix(".png")
        plot_curves(report["results"], out, report.get("title", ""))
        print(f"wrote {out}")
        return 0
    if args.curve and not args.data:
        p.error("--curve needs --data (e.g. datasets/prepared/mixed_pretraining/train.bin)")
    if args.grad_accum < 1:
        p.error(f"--grad-accum must be at least 1, got {args.grad_accum}")
    if args.grad_accum > 1 and (args.curve or args.only != "ours"):
        p.error("--grad-accum is for this project's side alone: add --only ours (and no --curve)")
    if not torch.cuda.is_available():
        print("❌ bench_throughput.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.steps, args.warmup = 15, 5
    if args.curve:
        args.warmup = 0  # every step's loss counts; the median step time still skips compilation
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    results = []
    lever = numeric_lever(args)
    if args.curve and lever:  # without the lever, the lever from the same weights and batches, without it seed+1 (the noise)
        base = "koen_sllm fp32 moments" if args.bf16_moments else "koen_sllm bf16"
        runs = [("ours", lambda: run_ours(args, args.seed, base, plain=True)),
                ("ours", lambda: run_ours(args, args.seed, f"koen_sllm {lever}")),
                ("ours", lambda: run_ours(args, args.seed + 1, f"{base} seed {args.seed + 1}", plain=True))]
    else:
        runs = [("ours", lambda: run_ours(args, args.seed)), ("peer", lambda: run_peer(args))]
        if args.curve:
            runs.append(("ours", lambda: run_ours(args, args.seed + 1, f"koen_sllm seed {args.seed + 1}")))
    for which, fn in runs:
        if args.only and args.only != which:
            continue
        results.append(fn())
        # Written after every run, so a run cut short by a time limit keeps the ones before it.
        Path(args.json).write_text(json.dumps({"partial": True, "args": {k: str(v) for k, v in vars(args).items()},
                                               "results": results}, indent=2))
        print(f"{results[-1]['name']}: {results[-1]['tokens_per_s']:,.0f} tokens/s; losses {results[-1]['losses'][:3]} ...",
              flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    device = torch.cuda.get_device_name()
    print(f"\n{args.model_size} | batch {args.batch_size} x seq {args.seq_len} | {device} | torch {torch.__version__}")
    print(f"{'trainer':<24}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'step s':>9}")
    for r in results:
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{r['name']:<24}{r['tokens_per_s']:>12,.0f}{m:>8}{r['peak_mem_gib']:>10.1f}{r['median_step_s']:>9.3f}")
    if len(results) >= 2 and results[1]["name"] == "transformers.Trainer":
        print(f"ratio koen_sllm / transformers.Trainer: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x "
              f"(Trainer: {peer_settings_text(results[1]['peer_settings'])})")
    for r in results:
        if "profile" in r:
            prof = r["profile"]
            print(f"GPU time of {r['name']}, % of {prof['wall_ms_per_step']:.1f} ms per step: " +
                  ", ".join(f"{k} {v}" for k, v in prof["percent_of_wall"].items()))
            for name, ms in prof["top_kernels_ms_per_step"][:8]:
                print(f"  {ms:8.3f} ms  {name}")
            gaps = prof["idle_gaps"]
            print(f"  idle: {gaps['small_gaps_per_step']:g} gaps under {gaps['small_gap_us']:g} us per step "
                  f"({gaps['small_gaps_ms_per_step']:.2f} ms), {gaps['large_gaps_per_step']:g} longer ones "
                  f"({gaps['large_gaps_ms_per_step']:.2f} ms); longest:")
            for us, before, after in gaps["longest"][:5]:
                print(f"    {us:9.1f} us  after {before}  before {after}")
    report = {"device": device, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    peer = next((r for r in results if "peer_settings" in r), None)
    if peer:
        report["peer_settings"] = peer["peer_settings"]
    if args.curve and len(results) == 3:
        report["curve"] = compare_curves(*(r["losses"] for r in results))
        c = report["curve"]
        c["compared"] = f"{lever} against bf16" if lever else "ours against the Trainer"
        print(f"loss curves over {c['steps']} steps (10-step means), {c['compared']}: |a - b| mean {c['ours_vs_peer_mean']:.4f} "
              f"max {c['ours_vs_peer_max']:.4f}; |a - a seed+1| (noise) mean {c['noise_mean']:.4f} "
              f"max {c['noise_max']:.4f}; last 20 steps: a {c['last20'][0]:.4f}, b {c['last20'][1]:.4f}, "
              f"seed+1 {c['last20'][2]:.4f}")
        if args.plot:
            report["title"] = f"{args.model_size}, batch {args.batch_size} x {args.seq_len}, {args.data.name}, {device}"
            plot_curves(results, args.plot, report["title"])
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
