#!/usr/bin/env python3
"""The optimizer update alone, on a model preset's parameter shapes, on the GPU present:
MasterWeightAdamW (bf16 weights, fp32 masters, one Triton launch per group) against torch's fused
AdamW on fp32 weights, both with a clip divisor (``grad_scale``) and a ``found_inf`` flag as the
trainer passes them. Prints milliseconds per update, the bytes each moves per update and the
bandwidth that makes; checks first that the kernel equals the reference update (bf16 copies exact).

    python benchmarks/bench_optimizer.py --model-size 350m   # also the update with --bf16-moments' storage
    python benchmarks/bench_optimizer.py --model-size 350m --sweep   # the update's tiling, and the gradient norm

``--sweep`` times the update kernel alone for each block, chunk and warp count, with 16-byte vector
accesses and with one element per access (``--vectorize``), and the gradients'
2-norm by the plan's one-launch kernel against ``torch._foreach_norm`` (what the trainer used).
``--overlap`` asks how much of the update could hide behind the next step's forward: the compiled
forward (batch ``--batch-size`` x 2048) alone, the update alone, and both at once, the update on a
second stream. The weights change under the forward there, so that run's numbers are for timing only.

A benchmark: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import cuda_time_ms  # noqa: E402
from koen_sllm.master_adamw import MasterWeightAdamW  # noqa: E402
from koen_sllm.model import KoEnLM, model_config_from_preset  # noqa: E402
from koen_sllm.optim import param_groups  # noqa: E402


def _update_bytes(moment_dtype: torch.dtype) -> int:
    """Bytes per parameter one master-weight update moves: the bf16 gradient read (2), the fp32 master
    read and written (8), the bf16 weight written (2), and both moments read and written."""
    return 12 + 4 * moment_dtype.itemsize


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _setup(model_size: str, vocab: int, bf16_weights: bool, moment_dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset(model_size, vocab, 2048)).cuda()
    kwargs = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    if bf16_weights:
        opt = MasterWeightAdamW(param_groups(model, 0.1), moment_dtype=moment_dtype, **kwargs)
        opt.take_master_weights()
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.1), fused=True, **kwargs)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.grad_scale = torch.full((), 2.0, device="cuda")
    opt.found_inf = torch.zeros((), device="cuda")
    return model, opt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="350m")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time the kernels per block, chunk and warp count")
    ap.add_argument("--overlap", action="store_true", help="time the update alone, the forward alone, and both at once")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences of 2048 tokens in --overlap's forward")
    ap.add_argument("--bf16-moments", action="store_true", help="--sweep with the moments stored in bf16")
    ap.add_argument("--blocks", default="512,1024,2048,4096", help="--sweep: the block sizes to try")
    ap.add_argument("--chunks", default="2048,4096,8192,16384,32768", help="--sweep: the chunk sizes to try")
    ap.add_argument("--warps", default="2,4,8,16", help="--sweep: the warp counts to try")
    ap.add_argument("--vectorize", choices=("both", "on", "off"), default="both",
                    help="--sweep: the kernels with 16-byte vector accesses (on), one element per access (off), or both")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("❌ needs a CUDA GPU (the Triton kernel runs there)", file=sys.stderr)
        return 2
    # The kernel's correctness is the test suite's (pytest -m gpu tests/unit/test_master_adamw.py); this
    # script only times it.
    if args.sweep:
        vectorize = {"both": (False, True), "on": (True,), "off": (False,)}[args.vectorize]
        return sweep(args.model_size, args.vocab, args.repeats, args.bf16_moments, _ints(args.blocks),
                     _ints(args.chunks), _ints(args.warps), vectorize)
    if args.overlap:
        return overlap(args.model_size, args.vocab, args.repeats, args.batch_size)
    rows = []
    # Bytes per parameter per update; torch's: fp32 weight, gradient and both moments, read and written.
    for name, bf16, moments, nbytes in (
            ("MasterWeightAdamW (bf16 weights + fp32 masters)", True, torch.float32, _update_bytes(torch.float32)),
            ("torch fused AdamW (fp32 weights, grad_scale)", False, None, 32),
            ("MasterWeightAdamW, moments in bf16 (the default)", True, torch.bfloat16, _update_bytes(torch.bfloat16))):
        model, opt = _setup(args.model_size, args.vocab, bf16, moments)
        n = sum(p.numel() for p in model.parameters())
        ms = cuda_time_ms(opt.step, args.repeats)
        rows.append((name, ms, nbytes * n / ms / 1e6))
        del model, opt
        torch.cuda.empty_cache()
    print(f"{args.model_size}: {n:,} parameters, {torch.cuda.get_device_name()}")
    for name, ms, gbs in rows:
        print(f"  {name:52s} {ms:7.3f} ms  {gbs:7.0f} GB/s")
    print(f"  ratio torch / ours: {rows[1][1] / rows[0][1]:.3f}x; fp32 moments / bf16 moments: {rows[0][1] / rows[2][1]:.3f}x")
    return 0


def sweep(model_size: str, vocab: int, repeats: int, bf16_moments: bool = False,
          blocks: tuple = (512, 1024, 2048, 4096), chunks: tuple = (2048, 4096, 8192, 16384, 32768),
          warp_counts: tuple = (2, 4, 8, 16), vectorize: tuple = (False, True)) -> int:
    """The update and the gradient norm alone, per tiling, on the preset's largest group."""
    from koen_sllm.kernels.adamw import BLOCK, CHUNK, NUM_WARPS, MultiTensorPlan

    moment_dtype = torch.bfloat16 if bf16_moments else torch.float32
    model, opt = _setup(model_size, vocab, True, moment_dtype)
    nbytes = _update_bytes(moment_dtype)
    group = max(opt.param_groups, key=lambda g: sum(p.numel() for p in g["params"]))
    params = group["params"]
    grads = [p.grad for p in params]
    state = opt._state_lists(params)
    n = sum(p.numel() for p in params)
    step = torch.ones((), device="cuda")
    hyper = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                 grad_scale=opt.grad_scale, found_inf=opt.found_inf)
    print(f"{model_size}: the largest group, {len(params)} tensors, {n:,} elements, {torch.cuda.get_device_name()}")
    print(f"default tiling: block {BLOCK}, chunk {CHUNK}, {NUM_WARPS} warps; moments in {'bf16' if bf16_moments else 'fp32'}")
    print(f"{'vector':>6} {'block':>6} {'chunk':>7} {'warps':>5}  {'update ms':>9} {'GB/s':>6}  {'norm ms':>8} {'GB/s':>6}")
    best = None
    for vector in vectorize:
        for block in blocks:
            for chunk in chunks:
                if chunk < block or chunk % block:
                    continue
                for warps in warp_counts:
                    if block // (32 * warps) > 16:  # more elements per thread: far slower (docs/benchmarks.md)
                        continue
                    plan = MultiTensorPlan(params, *state, block=block, chunk=chunk, num_warps=warps, vectorize=vector)
                    update_ms = cuda_time_ms(lambda: plan.update(grads, step, **hyper), repeats)
                    norm_ms = cuda_time_ms(lambda: plan.grad_sumsq(grads).sum().sqrt(), repeats)
                    print(f"{'yes' if plan.aligned(grads) else 'no':>6} {block:6d} {chunk:7d} {warps:5d}  "
                          f"{update_ms:9.3f} {nbytes * n / update_ms / 1e6:6.0f}  "
                          f"{norm_ms:8.3f} {2 * n / norm_ms / 1e6:6.0f}", flush=True)
                    if best is None or update_ms < best[0]:
                        best = (update_ms, block, chunk, warps, plan.aligned(grads))
    foreach_ms = cuda_time_ms(
        lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))), repeats)
    plan = MultiTensorPlan(params, *state)
    ours, theirs = plan.grad_sumsq(grads).sum().sqrt(), torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
    print(f"torch._foreach_norm + vector_norm: {foreach_ms:.3f} ms ({2 * n / foreach_ms / 1e6:.0f} GB/s); "
          f"norms {ours.item():.6f} / {theirs.item():.6f} (relative difference {abs(ours - theirs).item() / theirs.item():.1e})")
    print(f"fastest update: block {best[1]}, chunk {best[2]}, {best[3]} warps, "
          f"{'vector' if best[4] else 'scalar'} accesses: {best[0]:.3f} ms")
    return 0


def overlap(model_size: str, vocab: int, repeats: int, batch: int) -> int:
    """The forward and the update, alone and concurrently (the update on a side stream)."""
    model, opt = _setup(model_size, vocab, True)
    compiled = torch.compile(model)
    tokens = torch.randint(0, vocab, (batch, 2048), device="cuda")
    side = torch.cuda.Stream()

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(tokens, tokens)  # the graph it builds for a backward is dropped at once

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step()
        forward()
        torch.cuda.current_stream().wait_stream(side)

    def serial():
        opt.step()
        forward()

    forward()  # compile outside the timings
    fwd_ms, upd_ms = cuda_time_ms(forward, repeats), cuda_time_ms(opt.step, repeats)
    serial_ms, both_ms = cuda_time_ms(serial, repeats), cuda_time_ms(both, repeats)
    hidden = (serial_ms - both_ms) / upd_ms
    print(f"{model_size}, batch {batch} x 2048, {torch.cuda.get_device_name()}")
    print(f"  forward alone {fwd_ms:.3f} ms, update alone {upd_ms:.3f} ms, one after the other {serial_ms:.3f} ms")
    print(f"  the update on a second stream during the forward: {both_ms:.3f} ms: "
          f"{hidden:.0%} of the update hidden ({serial_ms - both_ms:.3f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
