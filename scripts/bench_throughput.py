#!/usr/bin/env python3
"""Training throughput: this project's training step against the transformers Trainer peer.

    python scripts/bench_throughput.py --quick                      # a few minutes on one GPU
    python scripts/bench_throughput.py --model-size 350m --batch-size 8 --seq-len 2048
    python scripts/bench_throughput.py --only ours --model-size 1.3b --attn cudnn

Both sides train the same Llama shape on the same random tokens (vocabulary
32000) with bf16, torch.compile and fused AdamW, one after the other in this
process, on whatever GPU is present. "ours" runs koen_sllm.trainer.Trainer's
own train_step (the code ./run_h100_dual.sh uses); the peer is
transformers.Trainer on LlamaForCausalLM built from the same config and weights.
Warm-up steps (compilation) are excluded. Prints a table and writes JSON.
This is a benchmark, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from koen_sllm import distributed as D  # noqa: E402
from koen_sllm.config import parse_args as parse_run_args  # noqa: E402
from koen_sllm.metrics import peak_flops, peak_memory_gib  # noqa: E402
from koen_sllm.trainer import Trainer  # noqa: E402

VOCAB = 32000


class RandomTokens:
    """Fixed random token batches: the loader interface without any I/O."""

    def __init__(self, seq_len: int, micro_batch: int, seed: int = 0, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, VOCAB, (micro_batch, seq_len + 1), generator=g) for _ in range(4)]
        pin = torch.cuda.is_available()
        self.pairs = [tuple(t.contiguous().pin_memory() if pin else t.contiguous() for t in (b[:, :-1], b[:, 1:]))
                      for b in self.batches]
        self.i, self.num_samples, self.epoch = 0, 10**9, 0.0

    def next_batch(self):
        pair = self.pairs[self.i % len(self.pairs)]
        self.i += 1
        return pair


def run_ours(args) -> dict:
    argv = ["--train", "--model-size", args.model_size, "--batch-size", str(args.batch_size),
            "--max-seq-length", str(args.seq_len), "--max-steps", str(args.steps + args.warmup),
            "--attn", args.attn, "--learning-rate", "3e-4", "--bf16"]
    if args.no_compile:
        argv.append("--no-compile")
    cfg, _ = parse_run_args(argv)
    from koen_sllm.config import apply_device_defaults

    apply_device_defaults(cfg, torch.cuda.is_available())
    info = D.init_distributed()
    tr = Trainer(cfg, info)
    tr.build(VOCAB, RandomTokens(args.seq_len, args.batch_size))
    tr.finalize()
    tr.model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _, _ = tr.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    fpt = tr.raw_model.flops_per_token(args.seq_len)
    res = _summarize("koen_sllm", times[args.warmup:], args, fpt, losses)
    del tr
    return res


def run_peer(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer as HFTrainer, TrainerCallback, TrainingArguments

    from koen_sllm.model import KoEnLM, model_config_from_preset

    mcfg = model_config_from_preset(args.model_size, VOCAB, args.seq_len)
    ours = KoEnLM(mcfg)
    hf_cfg = ours.hf_config(2, 3, 0)
    if hf_cfg.get("architectures", [""])[0] != "LlamaForCausalLM":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(hf_cfg["model_type"], **{k: v for k, v in hf_cfg.items() if k != "model_type"})
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:
        config = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(ours.hf_state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    fpt = ours.flops_per_token(args.seq_len)  # the same shape: one FLOPs count for both sides
    del ours
    tokens = RandomTokens(args.seq_len, args.batch_size)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            b = tokens.batches[(i // args.batch_size) % len(tokens.batches)][i % args.batch_size, :-1]
            return {"input_ids": b, "labels": b}

    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    out = Path(args.json).parent / "hf_trainer_tmp"
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        bf16=True, torch_compile=not args.no_compile, optim="adamw_torch_fused", learning_rate=3e-4,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_pin_memory=True,
        lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
    )
    torch.cuda.reset_peak_memory_stats()
    HFTrainer(model=model, args=targs, train_dataset=DS(), callbacks=[Timer()]).train()
    return _summarize("transformers.Trainer", times[args.warmup:], args, fpt, losses)


def _summarize(name, times, args, fpt, losses) -> dict:
    step = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tok_s = args.batch_size * args.seq_len / step
    peak = peak_flops(torch.cuda.get_device_name(), "bf16")
    return {"name": name, "median_step_s": step, "tokens_per_s": tok_s,
            "mfu": tok_s * fpt / peak if peak else None, "peak_mem_gib": peak_memory_gib(torch.device("cuda")),
            "flops_per_token": fpt, "first_losses": losses[:5], "last_loss": losses[-1] if losses else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="350m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--attn", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--only", choices=("ours", "peer"))
    p.add_argument("--quick", action="store_true", help="15 measured steps after 5 warm-up steps")
    p.add_argument("--json", default="outputs/bench_throughput.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("❌ bench_throughput.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.steps, args.warmup = 15, 5
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for which, fn in (("ours", run_ours), ("peer", run_peer)):
        if args.only and args.only != which:
            continue
        results.append(fn(args))
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    device = torch.cuda.get_device_name()
    print(f"\n{args.model_size} | batch {args.batch_size} x seq {args.seq_len} | {device} | torch {torch.__version__}")
    print(f"{'trainer':<24}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'step s':>9}")
    for r in results:
        m = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"{r['name']:<24}{r['tokens_per_s']:>12,.0f}{m:>8}{r['peak_mem_gib']:>10.1f}{r['median_step_s']:>9.3f}")
    if len(results) == 2:
        print(f"ratio koen_sllm / transformers.Trainer: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args),
                                           "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
