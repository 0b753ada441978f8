#!/usr/bin/env python3
"""Several loss-curve comparisons read together: each lever against every bf16 run of its seed.

    python benchmarks/curve_band.py A.json B.json C.json [--plot band.png] [--json band.json]

Each input is the JSON of one ``bench_throughput.py --curve`` run with a numeric lever (bf16, the
lever from the same weights and batches, bf16 from the next seed). One such run gives one bf16
pair to call the noise; bf16 on a GPU does not repeat bit for bit (attention's backward), so
several runs of the same command give a band instead: the distance between every two bf16 runs,
of the same seed (run to run) and across the two seeds. A lever is inside the band when its mean
distance to the bf16 runs of its own seed is no larger than the largest distance between two
bf16 runs. Distances are the mean absolute difference of the 10-step running means over the
run, as ``bench_throughput.py --curve`` reports them. No GPU needed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import running_mean  # noqa: E402

# What must agree between the runs pooled: the same model, batches and seed.
SAME = ("model_size", "batch_size", "seq_len", "steps", "seed", "data", "lr", "warmup_steps")
LAST = 50  # steps averaged for the end-of-run figure


class BandError(ValueError):
    """Inputs that cannot be pooled; one line naming the file and what differs."""


def distance(a, b, window: int = 10) -> float:
    n = min(len(a), len(b))
    return float(np.abs(running_mean(a, window, n) - running_mean(b, window, n)).mean())


def load_runs(reports: dict[str, dict]) -> tuple[list, list, list]:
    """(bf16 runs of the seed, bf16 runs of the next seed, lever runs), each a (label, losses) list."""
    if not reports:
        raise BandError("no curve reports given")
    first_name, first = next(iter(reports.items()))
    same, nxt, levers = [], [], []
    for name, rep in reports.items():
        results = rep.get("results") or []
        if len(results) != 3 or not all("losses" in r for r in results):
            raise BandError(f"{name}: not a --curve report with a lever (three runs with their losses)")
        for key in SAME:
            if rep.get("args", {}).get(key) != first.get("args", {}).get(key):
                raise BandError(f"{name}: {key} is {rep.get('args', {}).get(key)!r}, "
                                f"but {first_name} has {first.get('args', {}).get(key)!r}; pool runs of one command")
        tag = f" ({Path(name).stem})"
        same.append((results[0]["name"] + tag, results[0]["losses"]))
        levers.append((results[1]["name"] + tag, results[1]["losses"]))
        nxt.append((results[2]["name"] + tag, results[2]["losses"]))
    return same, nxt, levers


def band(reports: dict[str, dict]) -> dict:
    """The bf16 band and each lever's distances to the bf16 runs of its seed (module docstring)."""
    same, nxt, levers = load_runs(reports)
    bf16 = same + nxt
    pairs = {"run to run": [distance(a[1], b[1]) for a, b in itertools.combinations(same, 2)]
             + [distance(a[1], b[1]) for a, b in itertools.combinations(nxt, 2)],
             "seed to seed": [distance(a[1], b[1]) for a in same for b in nxt]}
    widest = max(itertools.chain(*pairs.values()))
    out = {"bf16_runs": len(bf16), "band": {k: [min(v), max(v)] if v else None for k, v in pairs.items()},
           "band_max": widest, "levers": [],
           "last_mean": {label: float(np.mean(losses[-LAST:])) for label, losses in bf16 + levers},
           "last_steps": LAST}
    for label, losses in levers:
        d = [distance(losses, ref) for _, ref in same]
        out["levers"].append({"name": label, "to_bf16": d, "mean": float(np.mean(d)),
                              "inside": bool(np.mean(d) <= widest)})
    return out


def report_lines(b: dict) -> list[str]:
    lines = [f"bf16 band over {b['bf16_runs']} runs: "
             + "; ".join(f"{k} {v[0]:.3f}-{v[1]:.3f}" for k, v in b["band"].items() if v)
             + f" (largest {b['band_max']:.3f})"]
    for lev in b["levers"]:
        lines.append(f"{lev['name']}: to the bf16 runs of its seed {', '.join(f'{d:.3f}' for d in lev['to_bf16'])} "
                     f"(mean {lev['mean']:.3f}): {'inside' if lev['inside'] else 'outside'} the band")
    lines.append(f"mean of the last {b['last_steps']} steps: "
                 + "; ".join(f"{k} {v:.3f}" for k, v in b["last_mean"].items()))
    return lines


def plot_band(reports: dict[str, dict], out: Path) -> None:
    """Each run's 10-step running mean minus the mean of the bf16 runs of the seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    same, nxt, levers = load_runs(reports)
    n = min(len(x[1]) for x in same + nxt + levers)
    ref = np.mean([running_mean(x[1], 10, n) for x in same], axis=0)
    steps = np.arange(10, n + 1)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, (label, losses) in enumerate(same + nxt):
        ax.plot(steps, running_mean(losses, 10, n) - ref, color="gray", alpha=0.6, linewidth=1,
                linestyle="-" if i < len(same) else "--", label="bf16 runs (dashed: next seed)" if i == 0 else None)
    for (label, losses), color in zip(levers, itertools.cycle(("tab:blue", "tab:green", "tab:red", "tab:purple"))):
        ax.plot(steps, running_mean(losses, 10, n) - ref, color=color, linewidth=1.8, label=label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("10-step mean loss minus bf16's mean")
    ax.set_title(next(iter(reports.values())).get("title", "loss curves against the bf16 band"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="JSON files of bench_throughput.py --curve runs")
    p.add_argument("--plot", type=Path, help="draw each run against the bf16 runs' mean into this PNG")
    p.add_argument("--json", type=Path, help="write the band and the levers' distances here")
    args = p.parse_args(argv)
    reports = {}
    for path in args.reports:
        try:
            reports[str(path)] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            p.error(f"{path}: cannot read it as JSON ({exc})")
    try:
        b = band(reports)
        if args.plot:
            plot_band(reports, args.plot)
    except BandError as exc:
        p.error(str(exc))
    print("\n".join(report_lines(b)))
    if args.json:
        args.json.write_text(json.dumps(b, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
