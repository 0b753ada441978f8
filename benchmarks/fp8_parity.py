#!/usr/bin/env python3
"""Whether the native FP8 linear computes torchao's numbers on this machine, and where they part.

    python benchmarks/fp8_parity.py --model-size 1.3b --batch-size 4 --seq-len 2048 --steps 3
    python benchmarks/fp8_parity.py --model-size tiny --batch-size 4 --seq-len 64   # CPU: they agree

Two copies of one model with ``--fp8 tensorwise``'s projections, one through torchao's
``Float8Linear`` and one through the native ``Fp8Linear`` (kernels/fp8_linear.py), compiled (or
eager with ``--no-compile``), run the same batches under bf16 autocast with the same AdamW. After
the first backward it compares every parameter's gradient, in the order the backward produces them
(the last layer first), and names the first that differs: the layer and projection where the two
arithmetics part. A second torchao copy run the same way is the control: on a GPU some kernels
(attention's backward among them) need not give the same bits twice, and what differs between two
runs of one arithmetic is noise, not a finding. Then the losses of each step. On the CPU the two agree bit for bit
(tests/scripts/test_fp8_parity.py); on an H100 their 1.3b loss curves part from the third step
(docs/benchmarks.md, sixth round), which this is for finding. A diagnostic: it asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import print_and_save  # noqa: E402
from koen_sllm import fp8  # noqa: E402
from koen_sllm.model import PRESETS, KoEnLM, model_config_from_preset  # noqa: E402

VOCAB = 32000


def build(size: str, seq: int, device: torch.device, vocab: int) -> dict:
    torch.manual_seed(0)
    base = KoEnLM(model_config_from_preset(size, vocab, seq)).to(device=device, dtype=torch.bfloat16)
    base.check_attention(device, torch.bfloat16)
    models = {"torchao": copy.deepcopy(base), "control": copy.deepcopy(base), "native": base}
    float8 = fp8.require_torchao("fp8_parity.py", "install torchao to compare against it")
    # torchao's own matmuls (never its emulation: that is not the arithmetic being compared)
    for name in ("torchao", "control"):
        float8.convert_to_float8_training(models[name], config=fp8.fp8_config("tensorwise"),
                                          module_filter_fn=fp8.converts)
    # on the GPU with the trainer's checks; on the CPU (no FP8 GPU to check) the native linear runs
    # torch._scaled_mm as it is, which is all ``emulate`` means for it
    fp8.convert_to_fp8(models["native"], "tensorwise", device, impl="native", emulate=device.type != "cuda")
    return models


def grad_rows(a: torch.nn.Module, b: torch.nn.Module) -> list[dict]:
    """Each parameter's gradient in ``a`` against ``b``, the backward's order (last layer first)."""
    rows = []
    for (name, pa), (_, pb) in zip(reversed(list(a.named_parameters())), reversed(list(b.named_parameters()))):
        ga, gb = pa.grad.float(), pb.grad.float()
        diff = (ga - gb).abs()
        rows.append({"param": name, "equal": bool(torch.equal(ga, gb)), "max_abs": float(diff.max()),
                     "rel": float(diff.norm() / gb.norm().clamp(min=1e-30))})
    return rows


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = build(args.model_size, args.seq_len, device, args.vocab)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
               for _ in range(args.steps)]
    steps = {k: (torch.compile(m) if args.compile else m) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr) for k, m in models.items()}
    losses = {k: [] for k in models}
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "losses": losses}
    for i, tokens in enumerate(batches):
        for k, step in steps.items():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = step(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            losses[k].append(loss.item())
        if i == 0:
            report["first_grads"] = grad_rows(models["native"], models["torchao"])
            report["control_grads"] = grad_rows(models["control"], models["torchao"])
        for k, opt in opts.items():
            opt.step()
            opt.zero_grad(set_to_none=True)
    first = next((r for r in report["first_grads"] if not r["equal"]), None)
    report["first_differing_grad"] = first["param"] if first else None
    report["steps_equal"] = [a == b for a, b in zip(losses["native"], losses["torchao"])]
    report["control_steps_equal"] = [a == b for a, b in zip(losses["control"], losses["torchao"])]
    return report


def summary(report: dict) -> list[str]:
    rows = report["first_grads"]
    differ = [r for r in rows if not r["equal"]]
    lines = [f"{report['device']}, torch {report['torch']}: {len(rows) - len(differ)} of {len(rows)} gradients equal "
             f"bit for bit after the first backward"]
    if differ:
        lines.append(f"first to differ in the backward's order: {differ[0]['param']} "
                     f"(max |diff| {differ[0]['max_abs']:.3g}, relative {differ[0]['rel']:.3g})")
        lines += [f"  {r['param']}: relative {r['rel']:.3g}" for r in sorted(differ, key=lambda r: -r["rel"])[:8]]
    control = [r for r in report["control_grads"] if not r["equal"]]
    noise = max((r["rel"] for r in control), default=0.0)
    lines.append(f"control, torchao against itself: {len(rows) - len(control)} of {len(rows)} equal"
                 + (f", first to differ {control[0]['param']}, largest relative {noise:.3g}" if control else ""))
    if differ:
        beyond = [r for r in differ if r["rel"] > 2 * noise]
        lines.append(f"native beyond twice the control's largest: {len(beyond)} gradients"
                     + (f", first {beyond[0]['param']}" if beyond else ""))
    losses = report["losses"]
    for i, (a, b, c) in enumerate(zip(losses["native"], losses["torchao"], losses["control"])):
        lines.append(f"step {i}: native {a:.6f}, torchao {b:.6f}, control {c:.6f}{'' if a == b else '  (differ)'}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="1.3b", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0, help="the batches' random tokens")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager, as a control")
    p.add_argument("--json", type=Path, help="write every gradient's row and the losses here")
    args = p.parse_args(argv)
    report = run(args)
    return print_and_save(summary(report), report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
