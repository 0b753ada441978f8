#!/usr/bin/env python3
"""Training throughput of torchtitan's Llama trainer on this project's model shapes: a second peer.

    python benchmarks/bench_torchtitan.py --quick --model-size 350m --batch-size 8     # torchtitan's Trainer (else its model)
    python benchmarks/bench_torchtitan.py --quick --model-size 1.3b --batch-size 4
    python benchmarks/bench_torchtitan.py --mode model --quick                         # its model, a minimal loop
    python benchmarks/bench_torchtitan.py --mode model --device cpu --model-size tiny --seq-len 64 --batch-size 2 --steps 2 --warmup 1

Same shape, tokens and FLOPs count as benchmarks/bench_throughput.py: the preset's Llama
(350m: hidden 1024, 24 layers, 16/4 heads, FFN 2816; 1.3b: hidden 2048, 24 layers, 16/8 heads,
FFN 5632), vocabulary 32,000, four fixed batches of random tokens (seed 0), bf16 autocast over
fp32 weights, torch.compile, fused AdamW, gradient clipping at 1.0; tokens/s from the median step
period after the warm-up steps, MFU = tokens/s x KoEnLM.flops_per_token / the GPU's dense bf16 peak.

--mode trainer does what torchtitan's entry point (torchtitan.train.main) does, on a TOML job
file written here: its Trainer, data loader wrapper, per-block compile, compiled loss,
optimizer and LR-scheduler builders and its training loop, with this shape registered as a
TrainSpec whose data loader serves the random tokens (no tokenizer, no HF data set) and no
checkpointing, validation or activation checkpointing; it logs (reads the loss) every 10 steps,
its default. Steps are timed around Trainer.train_step as periods, like the other benchmarks
(no synchronize is added except before the first step, unless --sync-each-step).
--mode model drives torchtitan's Llama Transformer with a minimal loop (its per-block compile
and compiled loss, torch's fused AdamW, foreach clipping, pinned non-blocking batch copies).
--mode auto (the default) tries the trainer and falls back to the model. The JSON says which ran
("mode") and why ("reason").

torchtitan releases pair with a torch release: 0.3.0 with torch 2.14 (its docs/release.md) and
does not import on torch 2.11 (torch.distributed.fsdp has no DataParallelMeshDims there);
0.2.2 (2026-02-20) is the newest release that imports on torch 2.11, and its JobConfig/TrainSpec
API is the one used here. benchmarks/carry_wheels.sh fetches it and its pure-Python needs. The
`datasets` package it imports at module level (for its HF data loaders, unused here) is replaced
by a stand-in when it is not installed. This is a benchmark, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from koen_sllm.metrics import peak_flops  # noqa: E402
from koen_sllm.model import PRESETS, KoEnLM, model_config_from_preset  # noqa: E402

VOCAB = 32000
SPEC_NAME = "koen_llama3"
LOG_FREQ = 10  # torchtitan's default metrics.log_freq: the loss is read at step 1 and every 10th


# ---------------------------------------------------------------- shapes and settings (no torchtitan needed)


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """torchtitan's Llama FeedForward width from its model args (models/llama3/model/model.py)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def titan_model_args(size: str, seq_len: int) -> dict:
    """TransformerModelArgs keyword arguments for one of this project's presets, with the
    rounding (multiple_of) that gives exactly the preset's FFN width."""
    p = PRESETS[size]
    if p.get("qk_norm") or p.get("tie_embeddings") or p.get("head_dim"):
        raise SystemExit(f"--model-size {size}: torchtitan's Llama has no qk-norm, tied embeddings or wider heads")
    dim, width = p["hidden_size"], p["intermediate_size"]
    multiple_of = next((m for m in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
                        if width % m == 0 and ffn_hidden(dim, m) == width), None)
    if multiple_of is None:
        raise SystemExit(f"--model-size {size}: FFN {width} is not torchtitan's rounding of 8/3 x {dim}")
    return dict(dim=dim, n_layers=p["num_layers"], n_heads=p["num_heads"], n_kv_heads=p["num_kv_heads"],
                vocab_size=VOCAB, multiple_of=multiple_of, ffn_dim_multiplier=None,
                norm_eps=p.get("rms_norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0),
                max_seq_len=seq_len, attn_type="sdpa", attn_mask_type="causal")


def koen_flops_per_token(size: str, seq_len: int) -> int:
    """This project's count (KoEnLM.flops_per_token, docs/model.md) for the same shape."""
    with torch.device("meta"):
        model = KoEnLM(model_config_from_preset(size, VOCAB, seq_len))
    return model.flops_per_token(seq_len)


def flops_per_token_of(model: torch.nn.Module, seq_len: int, n_layers: int, n_heads: int, head_dim: int) -> int:
    """The same formula applied to torchtitan's model: 6 x (parameters - input embedding)
    + 12 x layers x heads x head_dim x seq_len. Equal to koen_flops_per_token when the shapes agree."""
    params = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.children() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return 6 * (params - embedding) + 12 * n_layers * n_heads * head_dim * seq_len


def trainer_settings(args) -> dict:
    """The torchtitan job's settings that decide its speed (recorded in the JSON)."""
    return {"compile": not args.no_compile, "compile_components": ["model", "loss"] if not args.no_compile else [],
            "activation_checkpoint": "none", "optimizer": "AdamW", "optimizer_implementation": "fused",
            "mixed_precision_param": "bfloat16", "dtype": "float32", "attn_type": "sdpa (cuDNN, flash, math)",
            "log_freq": LOG_FREQ, "dataloader_num_workers": args.workers, "dataloader_pin_memory": True,
            "dataloader_persistent_workers": args.workers > 0,
            "dataloader_prefetch_factor": args.prefetch if args.workers > 0 else None,
            "checkpoint": False, "validation": False, "max_norm": 1.0}


def job_toml(args, dump_folder: Path) -> str:
    """torchtitan's job file (0.2.x JobConfig sections) for this run."""
    s = trainer_settings(args)
    lines = [
        "[job]", f'dump_folder = "{dump_folder.as_posix()}"', 'description = "koen-sllm throughput peer"',
        "[metrics]", f"log_freq = {LOG_FREQ}", "enable_tensorboard = false", "disable_color_printing = true",
        "[model]", f'name = "{SPEC_NAME}"', f'flavor = "{args.model_size}"',
        "[optimizer]", 'name = "AdamW"', f"lr = {args.lr}", "beta1 = 0.9", "beta2 = 0.95", "eps = 1e-8",
        "weight_decay = 0.1", 'implementation = "fused"',
        "[lr_scheduler]", "warmup_steps = 1",
        "[training]", f"local_batch_size = {args.batch_size}", f"seq_len = {args.seq_len}",
        f"steps = {args.warmup + args.steps}", "max_norm = 1.0", 'mixed_precision_param = "bfloat16"',
        'dtype = "float32"',
        "[training.dataloader]", f"num_workers = {s['dataloader_num_workers']}", "pin_memory = true",
        f"persistent_workers = {'true' if s['dataloader_persistent_workers'] else 'false'}",
    ]
    if s["dataloader_prefetch_factor"]:
        lines.append(f"prefetch_factor = {s['dataloader_prefetch_factor']}")
    lines += [
        "[checkpoint]", "enable = false",
        "[activation_checkpoint]", 'mode = "none"',
        "[compile]", f"enable = {'false' if args.no_compile else 'true'}", 'components = ["model", "loss"]',
        "[validation]", "enable = false",
        "[debug]", f"seed = {args.seed}",
    ]
    return "\n".join(("\n" + line) if line.startswith("[") and i else line for i, line in enumerate(lines)) + "\n"


def random_batches(seq_len: int, batch: int, seed: int = 0) -> list:
    """bench_throughput.RandomTokens' four batches: the same tokens for every peer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq_len + 1), generator=g) for _ in range(4)]


def summarize(name: str, times: list, args, fpt: int, losses: list, device: torch.device) -> dict:
    """bench_throughput._summarize's keys, so throughput_goal.py reads either report alike."""
    step = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tok_s = args.batch_size * args.seq_len / step
    on_gpu = device.type == "cuda"
    peak = peak_flops(torch.cuda.get_device_name(device), "bf16") if on_gpu else None
    return {"name": name, "median_step_s": step, "tokens_per_s": tok_s,
            "mfu": tok_s * fpt / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
            "flops_per_token": fpt, "first_losses": losses[:5], "last_loss": losses[-1] if losses else None,
            "losses": losses}


# ---------------------------------------------------------------- torchtitan


def stand_in_datasets() -> bool:
    """torchtitan 0.2 imports the `datasets` package at module level for its HF text loaders,
    which this benchmark does not use. Without the package (or where this repository's datasets/
    folder would be found instead), a stand-in module answers the import; True if it was needed."""
    spec = importlib.util.find_spec("datasets")
    if spec is not None and spec.origin is not None:
        return False

    def unavailable(*_a, **_k):
        raise RuntimeError("the datasets package is not installed (bench_torchtitan.py's stand-in)")

    mod = types.ModuleType("datasets")
    mod.Dataset = type("Dataset", (), {})
    mod.IterableDataset = type("IterableDataset", (), {})
    mod.load_dataset = unavailable
    dist = types.ModuleType("datasets.distributed")
    dist.split_dataset_by_node = unavailable
    mod.distributed = dist
    sys.modules["datasets"], sys.modules["datasets.distributed"] = mod, dist
    return True


def titan_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torchtitan")
    except Exception:  # noqa: BLE001 - not installed
        return None


def single_process_env() -> None:
    """What torchrun would set for one process on one GPU."""
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def random_token_dataset_cls():
    from torch.utils.data import IterableDataset

    class RandomTokenDataset(IterableDataset):
        """The four fixed random batches, row by row, forever, as torchtitan's text data set
        yields them: ({"input": tokens[:-1]}, tokens[1:])."""

        def __init__(self, seq_len: int, batch: int, seed: int):
            self.rows = [row for b in random_batches(seq_len, batch, seed) for row in b]

        def __iter__(self):
            i = 0
            while True:
                row = self.rows[i % len(self.rows)]
                i += 1
                yield {"input": row[:-1]}, row[1:]

        def state_dict(self):
            return {}

        def load_state_dict(self, _state):
            return None

    return RandomTokenDataset


def register_spec(args) -> None:
    """This shape as a torchtitan TrainSpec: llama3's builders, a random-token data loader and no
    tokenizer (its sdpa attention needs none)."""
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.models import llama3
    from torchtitan.protocols import train_spec as ts

    dataset_cls = random_token_dataset_cls()

    def build_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **_kw):
        del tokenizer
        return ParallelAwareDataloader(
            dataset_cls(job_config.training.seq_len, job_config.training.local_batch_size, args.seed),
            dp_rank=dp_rank, dp_world_size=dp_world_size,
            **{**dataclasses.asdict(job_config.training.dataloader),
               "batch_size": job_config.training.local_batch_size})

    base = llama3.get_train_spec()
    flavors = {args.model_size: llama3.TransformerModelArgs(**titan_model_args(args.model_size, args.seq_len))}
    spec = dataclasses.replace(base, model_args=flavors, build_dataloader_fn=build_dataloader,
                               build_tokenizer_fn=None, build_validator_fn=None, state_dict_adapter=None)
    if SPEC_NAME not in getattr(ts, "_extra_train_specs", {}):
        ts.register_train_spec(SPEC_NAME, spec)


def run_trainer(args, out_dir: Path) -> dict:
    """torchtitan.train.main on a job file written here, with train_step timed."""
    import torchtitan.train as tt

    register_spec(args)
    single_process_env()
    times: list[float] = []
    losses: list[float] = []
    found: dict = {}

    class TimedTrainer(tt.Trainer):
        last = None

        def __init__(self, job_config):
            super().__init__(job_config)
            found["flops_per_token_torchtitan"] = int(self.metrics_processor.num_flops_per_token)
            m = self.model_args
            found["flops_per_token_model"] = flops_per_token_of(self.model_parts[0], args.seq_len, m.n_layers,
                                                                m.n_heads, m.dim // m.n_heads)
            found["ffn_hidden"] = ffn_hidden(m.dim, m.multiple_of, m.ffn_dim_multiplier)
            log = self.metrics_processor.log

            def log_and_keep(step, global_avg_loss, *a, **k):
                losses.append(float(global_avg_loss))
                # torchtitan resets the peak-memory statistics at every log: keep the peak before it does
                found["peak_mem_gib"] = max(found.get("peak_mem_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30)
                return log(step, global_avg_loss, *a, **k)

            self.metrics_processor.log = log_and_keep

        def train(self):
            torch.cuda.reset_peak_memory_stats()
            return super().train()

        def train_step(self, data_iterator):
            if args.sync_each_step or self.last is None:
                torch.cuda.synchronize()
                self.last = time.perf_counter()
            super().train_step(data_iterator)
            if args.sync_each_step:
                torch.cuda.synchronize()
            now = time.perf_counter()  # the step's period, as torchtitan's loop sees it
            times.append(now - self.last)
            self.last = now

    dump = out_dir / "torchtitan_run"  # torchtitan's dump folder; the job file goes there too
    dump.mkdir(parents=True, exist_ok=True)
    toml = dump / f"{args.model_size}_b{args.batch_size}.toml"
    toml.write_text(job_toml(args, dump))
    # torchtitan.train.main's steps. main() itself cannot be called: its ConfigManager.parse_args
    # defaults to the sys.argv of import time, which holds this script's options.
    tt.init_logger()
    config = tt.ConfigManager().parse_args(["--job.config_file", str(toml)])
    trainer = None
    try:
        trainer = TimedTrainer(config)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    res = summarize("torchtitan", times[args.warmup:], args, koen_flops_per_token(args.model_size, args.seq_len),
                    losses, torch.device("cuda"))
    if res["peak_mem_gib"] is not None:
        found["peak_mem_gib"] = max(found.get("peak_mem_gib", 0.0), res["peak_mem_gib"])
    res.update(found)
    res["job_file"] = toml.read_text()
    return res


def run_model(args) -> dict:
    """torchtitan's Llama Transformer (its per-block compile and compiled loss) in a minimal loop."""
    from torchtitan.config import JobConfig
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.models import llama3
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    margs = llama3.TransformerModelArgs(**titan_model_args(args.model_size, args.seq_len))
    with torch.device("meta"):
        model = llama3.Transformer(margs)
    job = JobConfig()
    job.compile.enable = not args.no_compile
    job.compile.components = ["model", "loss"]
    if job.compile.enable:
        apply_compile(model, job.compile)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    loss_fn = build_cross_entropy_loss(job)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=fused, foreach=not fused)
    batches = random_batches(args.seq_len, args.batch_size, args.seed)
    pairs = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]
    if fused:
        pairs = [(x.pin_memory(), y.pin_memory()) for x, y in pairs]
    found = {"flops_per_token_model": flops_per_token_of(model, args.seq_len, margs.n_layers, margs.n_heads,
                                                         margs.dim // margs.n_heads),
             "ffn_hidden": ffn_hidden(margs.dim, margs.multiple_of, margs.ffn_dim_multiplier)}

    def sync():
        if fused:
            torch.cuda.synchronize()

    if fused:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    sync()
    last = time.perf_counter()
    for i in range(args.warmup + args.steps):
        if args.sync_each_step:
            sync()
            last = time.perf_counter()
        x, y = pairs[i % len(pairs)]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0 or (i + 1) % LOG_FREQ == 0:  # torchtitan's logging cadence: a host read of the loss
            losses.append(float(loss.detach()))
        if args.sync_each_step:
            sync()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    res = summarize("torchtitan", times[args.warmup:], args, koen_flops_per_token(args.model_size, args.seq_len),
                    losses, device)
    res.update(found)
    return res


def cleanup() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="350m", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="15 measured steps after 5 warm-up steps")
    p.add_argument("--mode", choices=("auto", "trainer", "model"), default="auto",
                   help="torchtitan's Trainer, its model in a minimal loop, or the trainer with the model as fallback")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of --mode model")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="trainer: data-loader worker processes")
    p.add_argument("--prefetch", type=int, default=2, help="trainer: batches each worker prepares ahead")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync-each-step", action="store_true", help="synchronize the GPU around every timed step")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench_torchtitan.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 15, 5
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("❌ bench_torchtitan.py needs a CUDA GPU (or --device cpu --mode model for a smoke run)", file=sys.stderr)
        return 2
    if device.type != "cuda" and args.mode != "model":
        p.error("--device cpu runs --mode model only: torchtitan's Trainer places itself on a GPU")
    titan_model_args(args.model_size, args.seq_len)  # the shape exists in torchtitan's terms, or a clear error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (none under autocast) as the other peers
    torch.backends.cudnn.allow_tf32 = True
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "torchtitan": titan_version(),
              "args": {k: str(v) for k, v in vars(args).items()}, "partial": True, "results": []}
    write(args.json, report)
    stub = stand_in_datasets()
    report["datasets_stand_in"] = stub
    reasons = []
    result = None
    order = {"auto": ("trainer", "model"), "trainer": ("trainer",), "model": ("model",)}[args.mode]
    for mode in order:
        try:
            if mode == "trainer":
                result = run_trainer(args, args.json.parent)
            else:
                result = run_model(args)
            report["mode"] = "trainer" if mode == "trainer" else "model+minimal loop"
            break
        except Exception as e:  # noqa: BLE001 - recorded, then the next mode or a failed report
            traceback.print_exc()
            last = traceback.extract_tb(e.__traceback__)[-1]
            reasons.append(f"{mode}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                           f"(at {Path(last.filename).name}:{last.lineno})")
            cleanup()
    version = report["torchtitan"]
    if result is None:
        report["mode"] = "none"
        report["reason"] = "; ".join(reasons) or "torchtitan is not installed"
        if version and not version.startswith("0.2"):
            report["reason"] += (f" (this script drives torchtitan 0.2's JobConfig/TrainSpec API; torchtitan {version} "
                                 "pairs with another torch: benchmarks/carry_wheels.sh fetches 0.2.2)")
        report.pop("partial")
        write(args.json, report)
        print(f"torchtitan {version} did not run: {report['reason']}", file=sys.stderr)
        return 1
    if report["mode"] == "trainer":
        report["reason"] = (f"torchtitan {version}'s own Trainer and training loop (torchtitan.train.main's steps) "
                            "on a generated job file")
    else:
        report["reason"] = ("; ".join(reasons) + "; so torchtitan's model in a minimal loop") if reasons \
            else "--mode model: torchtitan's model in a minimal loop"
    result["mode"], result["reason"], result["torchtitan"] = report["mode"], report["reason"], version
    result["settings"] = trainer_settings(args) if report["mode"] == "trainer" else {
        "compile": not args.no_compile, "optimizer": "torch AdamW, fused" if device.type == "cuda" else "torch AdamW",
        "mixed_precision": "bf16 autocast, fp32 weights", "attn_type": "sdpa (cuDNN, flash, math)",
        "loss_read_every": LOG_FREQ, "batches": "pinned, non-blocking copies"}
    if result.get("flops_per_token_model") not in (None, result["flops_per_token"]):
        print(f"⚠ torchtitan's model counts {result['flops_per_token_model']:,} FLOPs per token against "
              f"{result['flops_per_token']:,} for this project's: the shapes differ", file=sys.stderr)
    report["results"] = [result]
    report.pop("partial")
    write(args.json, report)
    m = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a"
    mem = f"{result['peak_mem_gib']:.1f}" if result["peak_mem_gib"] is not None else "n/a"
    print(f"\n{args.model_size} | batch {args.batch_size} x seq {args.seq_len} | {report['device']} | "
          f"torch {torch.__version__} | torchtitan {version} ({report['mode']})")
    print(f"{'trainer':<24}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'step s':>9}")
    print(f"{'torchtitan':<24}{result['tokens_per_s']:>12,.0f}{m:>8}{mem:>10}{result['median_step_s']:>9.3f}")
    print(f"losses {result['losses'][:3]} ... {result['last_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
