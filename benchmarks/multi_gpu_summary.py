#!/usr/bin/env python3
"""The summary table of benchmarks/multi_gpu_checks.sh, from the metrics its runs wrote.

    python benchmarks/multi_gpu_summary.py outputs/multi_gpu_checks 2

Each part appears only when its runs left metrics; a part that did not run says so.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Optional


def records(run_logs: Path) -> list[dict]:
    path = run_logs / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def losses(run_logs: Path) -> dict[int, float]:
    """Per-step training loss; after a resume the later record of a step wins."""
    return {r["step"]: r["loss"] for r in records(run_logs) if r.get("type") == "train"}


def speed(run_logs: Path) -> Optional[dict]:
    train = [r for r in records(run_logs) if r.get("type") == "train" and r.get("tokens_per_s")][2:]
    if not train:
        return None
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "mem_gib": max((r.get("mem_gib") or 0.0) for r in train), "logged": len(train)}


def compare(a: dict[int, float], b: dict[int, float], steps) -> Optional[dict]:
    common = [s for s in steps if s in a and s in b]
    if not common:
        return None
    diffs = [abs(a[s] - b[s]) for s in common]
    return {"steps": f"{common[0]}-{common[-1]}", "n": len(common), "max": max(diffs),
            "mean": sum(diffs) / len(diffs), "last": (a[common[-1]], b[common[-1]])}


def main(work: Path, gpus: int) -> list[str]:
    lines = [f"# Multi-GPU checks ({gpus} GPUs), from {work}", ""]

    one, many = speed(work / "scaling-1" / "ddp" / "logs"), speed(work / f"scaling-{gpus}" / "ddp" / "logs")
    lines.append("## Scaling (DDP)")
    if one and many:
        ratio = many["tokens_per_s"] / one["tokens_per_s"]
        lines += ["| GPUs | tokens/s (all GPUs) | tokens/s per GPU | peak GiB (rank 0) |", "|---:|---:|---:|---:|",
                  f"| 1 | {one['tokens_per_s']:,.0f} | {one['tokens_per_s']:,.0f} | {one['mem_gib']:.1f} |",
                  f"| {gpus} | {many['tokens_per_s']:,.0f} | {many['tokens_per_s'] / gpus:,.0f} | {many['mem_gib']:.1f} |",
                  "", f"{gpus} GPUs / 1 GPU: **{ratio:.2f}x** (ideal {gpus}x)"]
    else:
        lines.append("not run or no metrics")

    lines += ["", "## Same global batch on 1 and on several GPUs"]
    a, b = losses(work / "curve-1" / "logs"), losses(work / f"curve-{gpus}" / "logs")
    c = compare(a, b, sorted(a))
    if c:
        lines.append(f"steps {c['steps']}: per-step |loss difference| mean {c['mean']:.2e}, max {c['max']:.2e}; "
                     f"last step {c['last'][0]:.4f} (1 GPU) vs {c['last'][1]:.4f} ({gpus} GPUs)")
    else:
        lines.append("not run or no metrics")

    lines += ["", "## Launcher: background run, --status, --stop, resume"]
    ldir = work / "launcher"
    straight, stopped = losses(ldir / "straight" / "logs"), losses(ldir / "stopped" / "logs")
    saved = sorted(int(m.group(1)) for p in (ldir / "stopped" / "out").glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    last = max(straight) if straight else 0
    stop_step = max((s for s in saved if s < last), default=None)
    status = (ldir / "status.log").read_text(encoding="utf-8", errors="replace") if (ldir / "status.log").exists() else ""
    run_line = next((ln.strip() for ln in status.splitlines() if "running" in ln), "(no --status output)")
    lines.append(f"--status: {run_line}")
    ranks = [p.name for p in sorted((ldir / "stopped" / "logs").glob("training_rank_*.log")) if p.stat().st_size > 0]
    lines.append(f"per-rank logs: {', '.join(ranks) or 'none'}")
    if stop_step is not None:
        c = compare(straight, stopped, range(stop_step + 1, last + 1))
        lines.append(f"--stop saved checkpoint-{stop_step}; the resumed run went on to step {max(stopped)}")
        if c:
            lines.append(f"resumed steps {c['steps']} against the straight run: max |loss difference| {c['max']:.2e}"
                         + (" (bit-identical)" if c["max"] == 0 else ""))
    else:
        lines.append("no checkpoint from --stop found (not run, or the stop did not save)")

    lines += ["", "## DeepSpeed ZeRO-2 against DDP on the same GPUs"]
    rows = [(name, speed(work / "deepspeed" / name / "logs")) for name in ("ddp", "zero2")]
    if any(r for _, r in rows):
        lines += ["| backend | tokens/s | peak GiB per GPU (rank 0) |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['tokens_per_s']:,.0f} | {r['mem_gib']:.1f} |" if r else f"| {name} | failed | |"
                  for name, r in rows]
    else:
        lines.append("not run or no metrics")

    lines += ["", "## DDP gradient bucket size"]
    sized = sorted((float(p.name.split("-", 1)[1]), speed(p / "ddp" / "logs"))
                   for p in work.glob("buckets-*") if re.fullmatch(r"buckets-\d+(\.\d+)?", p.name))
    if sized:
        lines += [f"| bucket MB | tokens/s ({gpus} GPUs) | vs 25 MB (the scaling part) |", "|---:|---:|---:|"]
        for mb, r in ([(25.0, many)] if many else []) + sized:
            ratio = f"{r['tokens_per_s'] / many['tokens_per_s']:.3f}x" if r and many else ""
            lines.append(f"| {mb:g} | {r['tokens_per_s']:,.0f} | {ratio} |" if r else f"| {mb:g} | failed | |")
    else:
        lines.append("not run or no metrics")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    print("\n".join(main(Path(sys.argv[1]), int(sys.argv[2]))))
