#!/usr/bin/env python3
"""The output layer and the loss alone, forward and backward, on the GPU present, in bf16 as the
training step runs them:

* ``compiled``: ``F.cross_entropy`` over the head's logits taken in fp32, under torch.compile
  (the training step's path without the Triton loss);
* ``kernel``: ``losses.fused_linear_cross_entropy`` (the loss and the logits' gradient from one
  Triton pass), under torch.compile as in the training step;
* ``matmuls``: only the head's three products (logits, the hidden states' gradient, the weight's
  gradient): the floor both paths share, so that "loss's own time" = path - matmuls.

    python benchmarks/bench_cross_entropy.py --model-size 350m --batch-size 8
    python benchmarks/bench_cross_entropy.py --sweep    # also the kernel alone per block size and warp count

Prints milliseconds per call, the loss's own time, peak memory and the largest difference of the
two paths' loss and gradients. A benchmark: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import cuda_time_ms  # noqa: E402
from koen_sllm.kernels import cross_entropy as ce_kernel  # noqa: E402
from koen_sllm.losses import IGNORE_INDEX, fused_linear_cross_entropy  # noqa: E402
from koen_sllm.model import PRESETS  # noqa: E402

VOCAB = 32_000  # the benchmarks' vocabulary (benchmarks/bench_throughput.py)


def plain_loss(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


def make_inputs(tokens: int, hidden_size: int, vocab: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (0.02 * torch.randn(vocab, hidden_size, device="cuda", generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    targets[2047::2048] = IGNORE_INDEX  # each sequence's last position, as the loader marks it
    return hidden, weight, targets


def path_step(loss_fn, hidden, weight, targets):
    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return loss
    return step


def matmul_step(hidden, weight):
    grad = torch.randn(hidden.shape[0], weight.shape[0], device="cuda", dtype=torch.bfloat16)
    h, w = hidden.detach(), weight.detach()

    def step():
        h @ w.t()
        grad @ w
        grad.t() @ h
    return step


def sweep(hidden, weight, targets) -> list[dict]:
    """The kernel alone (no matmuls) at each block size and warp count: ms and memory traffic as
    one read and one write of the logits."""
    logits = (hidden.detach() @ weight.detach().t()).contiguous()
    scale = torch.ones(1, device="cuda")
    saved, out = (ce_kernel.BLOCK_V, ce_kernel.NUM_WARPS), []
    print(f"{'block':>6s} {'warps':>6s} {'kernel ms':>10s} {'TB/s':>6s}")
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (2, 4, 8, 16, 32):
            if block // (32 * warps) < 1:
                continue
            ce_kernel.BLOCK_V, ce_kernel.NUM_WARPS = block, warps
            buf = logits.clone()  # the kernel overwrites its input; the values stay finite
            ms = cuda_time_ms(lambda: ce_kernel.loss_and_grad_in_place(buf, targets, scale, IGNORE_INDEX))
            tbs = 2 * logits.numel() * logits.element_size() / ms / 1e9
            out.append({"block": block, "warps": warps, "ms": ms, "tb_s": tbs})
            print(f"{block:6d} {warps:6d} {ms:10.3f} {tbs:6.2f}")
    ce_kernel.BLOCK_V, ce_kernel.NUM_WARPS = saved
    return out


def peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel alone at each block size and warp count")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("❌ no CUDA GPU: this benchmark times the loss's kernels on a GPU", file=sys.stderr)
        return 2
    tokens, hidden_size = args.batch_size * args.seq_len, PRESETS[args.model_size]["hidden_size"]
    hidden, weight, targets = make_inputs(tokens, hidden_size, args.vocab)

    steps = {"compiled": path_step(torch.compile(plain_loss), hidden, weight, targets),
             "kernel": path_step(torch.compile(fused_linear_cross_entropy), hidden, weight, targets)}
    results, outputs = {}, {}
    for name, step in steps.items():
        loss = step()  # compiles
        outputs[name] = (loss.detach().float(), hidden.grad.float(), weight.grad.float())
        results[name] = {"ms": cuda_time_ms(step), "peak_gib": peak_gib(step)}
    floor = cuda_time_ms(matmul_step(hidden, weight))
    results["matmuls"] = {"ms": floor, "peak_gib": float("nan")}

    diffs = [float((a - b).abs().max()) for a, b in zip(outputs["kernel"], outputs["compiled"])]
    print(f"{args.model_size} output layer + loss, {args.batch_size} x {args.seq_len} tokens, vocabulary "
          f"{args.vocab:,}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'path':10s} {'ms/call':>8s} {'loss own ms':>11s} {'peak GiB':>9s}")
    for name, r in results.items():
        own = r["ms"] - floor if name != "matmuls" else 0.0
        print(f"{name:10s} {r['ms']:8.3f} {own:11.3f} {r['peak_gib']:9.2f}")
    print(f"kernel vs compiled: {results['compiled']['ms'] / results['kernel']['ms']:.3f}x the speed; largest "
          f"difference: loss {diffs[0]:.2e}, hidden gradient {diffs[1]:.2e}, weight gradient {diffs[2]:.2e}")
    if args.sweep:
        results["sweep"] = sweep(hidden, weight, targets)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "max_abs_diff": dict(zip(("loss", "hidden_grad", "weight_grad"), diffs)),
                                         "device": torch.cuda.get_device_name()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
