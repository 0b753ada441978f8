#!/usr/bin/env python3
"""One decoder layer's projection matmuls alone, on the GPU present: forward, input gradient and
weight gradient of q/k/v, o, gate/up and down, as the compiled training step issues them
(``F.linear`` forward, ``mm`` backward), in bf16. Two questions, each answered in one process:

* separate projections (q, k, v; gate, up: what the model has) against fused ones (one q/k/v
  matmul, one gate/up matmul: the same FLOPs in fewer, wider products);
* the 4-byte memsets cuBLAS issues before many of its Hopper kernels (each with the stream's
  gaps around it), counted and timed under cuBLAS workspace settings (``--variants``: each
  variant re-runs this script in a process of its own with its environment).

    python benchmarks/bench_matmuls.py --model-size 350m --batch-size 8

Prints milliseconds per layer, achieved TFLOP/s, kernels and memsets per layer. A benchmark:
nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import cuda_time_ms, run_profiled  # noqa: E402
from koen_sllm.model import PRESETS  # noqa: E402

VARIANTS = {  # name -> environment for a process of its own
    "default": {},
    "cublaslt": {"TORCH_BLAS_PREFER_CUBLASLT": "1"},
    "no-workspace": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
    "cublaslt-no-workspace": {"TORCH_BLAS_PREFER_CUBLASLT": "1", "CUBLASLT_WORKSPACE_SIZE": "0"},
}


def layer_shapes(model_size: str) -> dict[str, list[int]]:
    """Output widths of each projection group reading the hidden state, and the down projection."""
    p = PRESETS[model_size]
    head_dim = p.get("head_dim") or p["hidden_size"] // p["num_heads"]
    return {"q": p["num_heads"] * head_dim, "kv": p["num_kv_heads"] * head_dim,
            "o_in": p["num_heads"] * head_dim, "ffn": p["intermediate_size"], "hidden": p["hidden_size"]}


def make_step(tokens: int, s: dict, fused: bool):
    """A closure running one layer's projection matmuls forward and backward; returns it and its FLOPs."""
    h, dev, bf = s["hidden"], "cuda", torch.bfloat16
    groups = [[s["q"] + 2 * s["kv"]], [2 * s["ffn"]]] if fused else [[s["q"], s["kv"], s["kv"]], [s["ffn"], s["ffn"]]]
    x = torch.randn(tokens, h, device=dev, dtype=bf)
    weights = [[torch.randn(n, h, device=dev, dtype=bf) * 0.02 for n in g] for g in groups]
    grads_out = [[torch.randn(tokens, n, device=dev, dtype=bf) for n in g] for g in groups]
    o_w = torch.randn(h, s["o_in"], device=dev, dtype=bf) * 0.02
    down_w = torch.randn(h, s["ffn"], device=dev, dtype=bf) * 0.02
    attn_out = torch.randn(tokens, s["o_in"], device=dev, dtype=bf)
    act = torch.randn(tokens, s["ffn"], device=dev, dtype=bf)
    g_h = torch.randn(tokens, h, device=dev, dtype=bf)

    def step():
        for ws, gs in zip(weights, grads_out):
            for w in ws:
                F.linear(x, w)  # forward
            for w, g in zip(ws, gs):
                # input gradient (the compiled step folds the sum of the separate ones into a
                # later elementwise kernel, so it is left out here) and weight gradient
                torch.mm(g, w)
                torch.mm(g.t(), x)
        for w, inp in ((o_w, attn_out), (down_w, act)):  # the two projections into the residual stream
            F.linear(inp, w)
            torch.mm(g_h, w)
            torch.mm(g_h.t(), inp)

    widths = [n for g in groups for n in g]
    flops = 6 * tokens * h * (sum(widths) + s["o_in"] + s["ffn"])
    return step, flops


def count_kernels(fn, n: int = 3) -> tuple[float, float]:
    """(kernels, memsets) per call, from the profiler's device-side rows."""
    prof, _ = run_profiled(fn, n)
    rows = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memsets = sum(1 for e in rows if "memset" in e.name.lower())
    return (len(rows) - memsets) / n, memsets / n


def measure(args) -> dict:
    tokens, s = args.batch_size * args.seq_len, layer_shapes(args.model_size)
    out = {}
    for fused in (False, True):
        step, flops = make_step(tokens, s, fused)
        ms = cuda_time_ms(step)
        kernels, memsets = count_kernels(step)
        out["fused" if fused else "separate"] = {"ms": ms, "tflops": flops / ms / 1e9,
                                                 "kernels": kernels, "memsets": memsets}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: measure, print JSON
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("❌ no CUDA GPU: this benchmark times cuBLAS on a GPU", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(measure(args)))
        return 0
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"❌ unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    results = {}
    child = [sys.executable, __file__, "--one", "--model-size", args.model_size,
             "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    for name in names:
        run = subprocess.run(child, env={**os.environ, **VARIANTS[name]}, capture_output=True, text=True)
        if run.returncode:
            print(f"{name}: failed\n{run.stderr[-2000:]}")
            continue
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{args.model_size} layer projections, {args.batch_size} x {args.seq_len} tokens, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'variant':24s} {'shape':9s} {'ms/layer':>9s} {'TFLOP/s':>8s} {'kernels':>8s} {'memsets':>8s}")
    for name, res in results.items():
        for shape, r in res.items():
            print(f"{name:24s} {shape:9s} {r['ms']:9.3f} {r['tflops']:8.0f} {r['kernels']:8.1f} {r['memsets']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
