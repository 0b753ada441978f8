#!/usr/bin/env python3
"""Causal attention alone, forward and backward, at a preset's head shapes, one backend after the
other on the GPU present (bf16, the layout and grouped K/V the model uses):

    python benchmarks/bench_attention.py --model-size 350m --batch-size 8 --backends cudnn,fa4,fa4:deterministic

For each backend: the first call's seconds (FA4 compiles its kernels then); milliseconds of the
forward and of forward + backward (``--iters`` calls queued between CUDA events, median of 5) and
their TFLOP/s (causal: half the square; the backward counted as 2.5 forwards); the GPU time of
forward + backward's kernels alone (the profiler's: where the host's launching is slower than the
kernels, as FA4's Python launch path can be at these sizes, the timing above is the host's and this
one is what a training step sees); and how far its output and gradients are from the first
backend's (largest absolute difference, and the relative error of the whole tensor); and whether
its gradients repeat bit for bit over ``--repeats`` more calls on the same inputs (kernels that add
partial gradients atomically do not). ``fa4:deterministic`` is FA4 with its ordered backward (what
``torch.use_deterministic_algorithms(True)`` selects). A benchmark: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import run_profiled  # noqa: E402
from koen_sllm.attention import causal_attention, check_backend, cudnn_takes_grouped_kv  # noqa: E402
from koen_sllm.kernels import flash_attn4  # noqa: E402
from koen_sllm.model import PRESETS  # noqa: E402


def inputs(preset: dict, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    heads, kv_heads = preset["num_heads"], preset["num_kv_heads"]
    head_dim = preset["hidden_size"] // heads
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim), (batch, seq, kv_heads, head_dim))
    return [torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_() for s in shapes]


def timed(fn, iters: int, repeats: int = 5) -> float:
    """Milliseconds per call of ``fn``: ``iters`` calls queued between two CUDA events (so the GPU,
    not the host's launching, sets the time, as in a training step), the median of ``repeats``."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def kernel_ms(fn, n: int = 5) -> float:
    """Milliseconds per call that the GPU spends in kernels (the profiler's device-side rows),
    whatever the host's launching costs: FA4's launch path in Python can outlast its kernels
    at these sizes, which a training step hides behind the kernels queued before it."""
    prof, _ = run_profiled(fn, n)
    rows = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.end - e.time_range.start for e in rows) / 1e3 / n


def repeat_differences(forward_backward, grads: list[torch.Tensor], repeats: int) -> tuple[int, float]:
    """How many of ``repeats`` more calls gave gradients that differ from ``grads`` in any bit, and
    the largest absolute difference among them."""
    differing, largest = 0, 0.0
    for _ in range(repeats):
        again = forward_backward()
        if not all(torch.equal(a, b) for a, b in zip(again, grads)):
            differing += 1
            largest = max(largest, max((a.float() - b.float()).abs().max().item() for a, b in zip(again, grads)))
    return differing, largest


def repeat_text(differing: int, repeats: int, largest: float) -> str:
    if not differing:
        return f"repeat bit for bit ({repeats} calls)"
    return f"differ in {differing} of {repeats} calls (max |diff| {largest:.2e})"


def measure(spec: str, q, k, v, dout, grouped: bool, iters: int, repeats: int) -> dict:
    backend, _, mode = spec.partition(":")
    if mode not in ("", "deterministic") or (mode and backend != "fa4"):
        raise ValueError(f"{spec!r}: only fa4 takes a mode (fa4:deterministic)")
    check_backend(backend)
    flash_attn4.deterministic_backward = True if mode else None
    try:
        return _measure(backend, q, k, v, dout, grouped, iters, repeats) | {"backend": spec}
    finally:
        flash_attn4.deterministic_backward = None


def _measure(backend: str, q, k, v, dout, grouped: bool, iters: int, repeats: int) -> dict:

    def forward():
        return causal_attention(q, k, v, backend, grouped)

    def forward_backward():
        return torch.autograd.grad(forward(), (q, k, v), dout)

    t0 = time.perf_counter()
    out = forward()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(3):
        forward_backward()
    with torch.no_grad():
        fwd_ms = timed(forward, iters)
    differing, largest = repeat_differences(forward_backward, grads, repeats)
    return {"first_call_s": first_s, "forward_ms": fwd_ms,
            "forward_backward_ms": timed(forward_backward, iters),
            "forward_backward_kernel_ms": kernel_ms(forward_backward),
            "repeats_differing": differing, "repeats_max_abs_diff": largest,
            "out": out.detach(), "grads": [g.detach() for g in grads]}


def distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - b.float())
    return diff.abs().max().item(), (diff.norm() / b.float().norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="350m", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--backends", default="cudnn,fa4",
                   help="comma-separated --attn values (fa4:deterministic: FA4 with its ordered backward; auto here "
                        "is PyTorch's SDPA choice, not the model's); the first is the reference")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5,
                   help="more calls whose gradients must equal the first's bit for bit")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    preset = PRESETS[args.model_size]
    q, k, v = inputs(preset, args.batch_size, args.seq_len)
    dout = torch.randn_like(q)
    grouped = cudnn_takes_grouped_kv(torch.cuda.get_device_capability())
    b, t, h, d = q.shape
    fwd_flops = 4 * b * h * t * t * d / 2  # two matmuls of 2*T*T*D per head, half the square (causal)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.model_size} heads {h}/{k.shape[2]} "
          f"of dim {d}, batch {b} x {t}, bf16")
    rows, reference = [], None
    for backend in args.backends.split(","):
        try:
            r = measure(backend, q, k, v, dout, grouped, args.iters, args.repeats)
        except Exception as exc:  # one backend failing leaves the others' rows
            print(f"{backend:>10}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            rows.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
            continue
        reference = reference or r
        out_max, out_rel = distance(r["out"], reference["out"])
        grad_rel = max(distance(g, ref)[1] for g, ref in zip(r["grads"], reference["grads"]))
        row = {"backend": backend, "first_call_s": round(r["first_call_s"], 2),
               "forward_ms": round(r["forward_ms"], 3), "forward_backward_ms": round(r["forward_backward_ms"], 3),
               "forward_tflops": round(fwd_flops / r["forward_ms"] / 1e9, 1),
               "forward_backward_tflops": round(3.5 * fwd_flops / r["forward_backward_ms"] / 1e9, 1),
               "forward_backward_kernel_ms": round(r["forward_backward_kernel_ms"], 3),
               "forward_backward_kernel_tflops": round(3.5 * fwd_flops / r["forward_backward_kernel_ms"] / 1e9, 1),
               "out_max_abs_diff": out_max, "out_rel_err": out_rel, "grad_max_rel_err": grad_rel,
               "repeats": args.repeats, "repeats_differing": r["repeats_differing"],
               "repeats_max_abs_diff": r["repeats_max_abs_diff"]}
        rows.append(row)
        print(f"{backend:>10}: first call {row['first_call_s']:.1f} s; forward {row['forward_ms']:.3f} ms "
              f"({row['forward_tflops']} TFLOP/s), forward+backward {row['forward_backward_ms']:.3f} ms "
              f"({row['forward_backward_tflops']} TFLOP/s), of which kernels {row['forward_backward_kernel_ms']:.3f} ms "
              f"({row['forward_backward_kernel_tflops']} TFLOP/s); vs {reference['backend']}: out max |diff| "
              f"{out_max:.2e}, rel {out_rel:.2e}, grads rel {grad_rel:.2e}; gradients "
              + repeat_text(r["repeats_differing"], args.repeats, r["repeats_max_abs_diff"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "model_size": args.model_size,
                                         "batch_size": b, "seq_len": t, "rows": rows}, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
