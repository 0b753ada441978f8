#!/usr/bin/env python3
"""Turn a run's metrics.jsonl into one PNG of training curves.

    python scripts/plot_metrics.py logs/metrics.jsonl                # -> logs/loss_curve.png
    python scripts/plot_metrics.py logs/metrics.jsonl -o run1.png --smooth 0.95

Panels (each only when its data exists): training loss (raw and smoothed),
validation loss per language, validation bits per byte, learning rate,
tokens/s, memory, gradient norm. Runs headless (Agg). Needs matplotlib:
pip install -e ".[plot]".

After a resume, steps between the last checkpoint and the crash appear twice
in metrics.jsonl; the later record of a step wins, since that is the run that
continued.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_NAME = "loss_curve.png"
LANG_COLORS = {"ko": "tab:red", "en": "tab:blue", "all": "black"}


class MetricsError(ValueError):
    """The metrics file cannot be plotted; the message says why and what to do."""


@dataclass
class Metrics:
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0
    first_malformed: Optional[int] = None  # line number
    superseded: int = 0  # records replaced by a later record of the same step


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_metrics(path: Path) -> Metrics:
    """Read train/eval records; malformed lines are counted and skipped."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"metrics file not found: {path} (the trainer writes <logs-dir>/metrics.jsonl)")
    m = Metrics()
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                kind = rec.get("type", "train")
                if kind not in by_kind:
                    continue  # other record types are not plotted
                step = rec["step"]
                if not _finite(step):
                    raise ValueError(step)
            except (ValueError, KeyError, TypeError, AttributeError):
                m.malformed += 1
                m.first_malformed = m.first_malformed or lineno
                continue
            table = by_kind[kind]
            if int(step) in table:
                m.superseded += 1
                del table[int(step)]  # re-insert so the order follows the file
            table[int(step)] = rec
    m.train = sorted(by_kind["train"].values(), key=lambda r: r["step"])
    m.evals = sorted(by_kind["eval"].values(), key=lambda r: r["step"])
    if not m.train:
        detail = f" ({m.malformed} malformed line(s), first at line {m.first_malformed})" if m.malformed else ""
        raise MetricsError(f"no training records in {path}{detail}: is this a metrics.jsonl of a run that logged a step?")
    return m


def series(records: Sequence[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if _finite(v):
            xs.append(float(r["step"]))
            ys.append(float(v) * scale)
    return xs, ys


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def _count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def build_figure(m: Metrics, smooth: float = 0.9, title: str = ""):
    """The figure and the names of its panels, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels: list[tuple[str, Any]] = []

    def add(name, draw):
        panels.append((name, draw))

    xs, loss = series(m.train, "loss")
    if loss:
        def draw_loss(ax):
            ax.plot(xs, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="raw")
            ax.plot(xs, ema(loss, smooth), color="tab:blue", linewidth=1.8, label=f"EMA {smooth:g}")
            ex, ev = series(m.evals, "val_loss")
            if ev:
                ax.plot(ex, ev, "o-", color="black", markersize=3, label="validation (all)")
            ax.set_title(f"training loss (last {loss[-1]:.4f}, smoothed {ema(loss, smooth)[-1]:.4f})")
            ax.set_ylabel("cross-entropy")
            ax.legend(fontsize=8)
        add("train_loss", draw_loss)

    def lang_panel(prefix, label):
        found = {lang: series(m.evals, f"{prefix}_{lang}") for lang in ("ko", "en")}
        if prefix == "val_loss":
            found["all"] = series(m.evals, "val_loss")
        found = {k: v for k, v in found.items() if v[1]}
        if not found:
            return

        def draw(ax):
            for lang, (ex, ev) in found.items():
                ax.plot(ex, ev, "o-", markersize=3, color=LANG_COLORS[lang], label=f"{lang} ({ev[-1]:.4f})")
            ax.set_title(label)
            ax.legend(fontsize=8)
        add(prefix, draw)

    lang_panel("val_loss", "validation loss per language")
    lang_panel("val_bpb", "validation bits per byte")

    def simple(key, name, title, ylabel, color, fmt, scale=1.0, log=False, from_zero=False, sci=False):
        sx, sy = series(m.train, key, scale)
        if not sy:
            return

        def draw(ax):
            ax.plot(sx, sy, color=color, linewidth=1.2)
            ax.set_title(title.format(last=format(sy[-1], fmt), median=format(_median(sy), fmt)))
            ax.set_ylabel(ylabel)
            if log and min(sy) > 0 and max(sy) / min(sy) > 20:  # spikes: log scale only when they span decades
                ax.set_yscale("log")
            if from_zero:  # a 2% dip should look like one
                ax.set_ylim(bottom=0, top=max(sy) * 1.08)
            if sci:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        add(name, draw)

    simple("lr", "lr", "learning rate (last {last})", "lr", "tab:green", ".2e", sci=True)
    simple("tokens_per_s", "tokens_per_s", "throughput (median {median} tokens/s)", "tokens/s", "tab:purple", ",.0f",
           from_zero=True)
    simple("mem_gib", "memory", "peak memory (last {last} GiB)", "GiB", "tab:brown", ".1f", from_zero=True)
    simple("grad_norm", "grad_norm", "gradient norm (median {median})", "norm", "tab:orange", ".3f", log=True)

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    first, last_step = m.train[0]["step"], m.train[-1]["step"]
    pad = max(1.0, 0.02 * (last_step - first))
    for ax, (_, draw) in zip(flat, panels):
        draw(ax)
        ax.set_xlabel("step")
        ax.set_xlim(first - pad, max([last_step] + [r["step"] for r in m.evals]) + pad)  # one step axis for all
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    last = m.train[-1]
    facts = [f"step {int(last['step'])}"]
    if _finite(last.get("tokens_seen")):
        facts.append(_count(last["tokens_seen"]) + " tokens")
    if _finite(last.get("elapsed_s")):
        facts.append(_duration(last["elapsed_s"]))
    _, mfu = series(m.train, "mfu", 100.0)
    if mfu:
        facts.append(f"MFU median {_median(mfu):.1f}%")
    fig.suptitle(f"{title}  ({', '.join(facts)})" if title else ", ".join(facts), fontsize=11)
    fig.tight_layout()
    return fig, [name for name, _ in panels]


def plot_metrics(path: Path, out: Optional[Path] = None, smooth: float = 0.9, dpi: int = 110) -> dict[str, Any]:
    """Write the PNG; returns {"out", "panels", "train", "eval", "malformed", "superseded"}."""
    path = Path(path)
    m = load_metrics(path)
    out = Path(out) if out else path.parent / DEFAULT_NAME
    try:
        fig, names = build_figure(m, smooth=smooth, title=str(path))
    except ImportError as exc:
        raise MetricsError(f"matplotlib is missing ({exc}): pip install -e \".[plot]\"") from exc
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return {"out": out, "panels": names, "train": len(m.train), "eval": len(m.evals),
            "malformed": m.malformed, "first_malformed": m.first_malformed, "superseded": m.superseded}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Plot a run's metrics.jsonl into a PNG.")
    p.add_argument("metrics", type=Path, help="metrics.jsonl written by the trainer (in the logs folder)")
    p.add_argument("-o", "--out", type=Path, help=f"output PNG (default: {DEFAULT_NAME} next to the input)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight for the smoothed loss, in [0, 1)")
    p.add_argument("--dpi", type=int, default=110)
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        print(f"error: --smooth must lie in [0, 1), got {args.smooth}", file=sys.stderr)
        return 2
    try:
        res = plot_metrics(args.metrics, args.out, smooth=args.smooth, dpi=args.dpi)
    except (MetricsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if res["malformed"]:
        print(f"skipped {res['malformed']} malformed line(s) in {args.metrics} (first at line {res['first_malformed']})",
              file=sys.stderr)
    if res["superseded"]:
        print(f"{res['superseded']} record(s) replaced by a later record of the same step (resumed run)")
    print(f"wrote {res['out']} ({len(res['panels'])} panels: {', '.join(res['panels'])}; "
          f"{res['train']} train / {res['eval']} eval records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
