"""Analysis for benchmarks/bench_throughput.py: where a step's GPU time goes, and how two loss curves compare.

Kept apart from the benchmark runner so the numbers can be recomputed from saved results
(``bench_throughput.py --replot``) on a machine without a GPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


KERNEL_KINDS = (  # first match wins; names of cuBLAS/CUTLASS/cuDNN/Triton kernels on Hopper
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "cublas", "wgmma")),
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach")),
    ("cross-entropy", ("cross_entropy", "log_softmax", "logsumexp", "nll")),
    ("fused elementwise (Triton)", ("triton",)),
    ("copies and casts", ("copy", "cast", "memcpy", "memset", "fill")),
)


def cuda_time_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn()`` on the GPU, by CUDA events around ``repeats`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def profile_steps(step_fn, n: int) -> dict:
    """GPU time per kernel kind over n steps in steady state, against their span: the rest is the GPU idling.

    One extra step runs first inside the profiler and is left out: the synchronize before the
    profiler drains the GPU's queue, so that step starts on an idle GPU and waits for the host's
    launch overhead, which in steady state runs while the previous step's kernels still execute."""
    prof, host_wall_us = run_profiled(step_fn, n + 1, mark_steps=True)
    spans, marks = [], {}
    for ev in prof.events():  # device-side rows only: each kernel or copy once, with its duration
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name.startswith("bench step "):  # the GPU span of the kernels one step launched
            marks[ev.name] = ev.time_range.start
            continue
        if getattr(ev, "is_user_annotation", False) or "#" in ev.name:
            continue  # user annotations ("Optimizer.step#AdamW.step") span kernels counted already
        spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    end = max(stop for _, stop, _ in spans)
    start = marks.get("bench step 1")
    steady = start is not None
    if steady:  # from the first kernel of the second step to the last kernel of the last one
        spans = [(max(a, start), b, name) for a, b, name in spans if b > start]
        wall_us = end - start
    else:  # no GPU-side step marks (older profilers): the host's wall time of all n + 1 steps
        wall_us, n = host_wall_us, n + 1
    return summarize_kernels(spans, wall_us, n) | {"steady_state": steady}


def summarize_kernels(spans, wall_us: float, n: int) -> dict:
    """Kernel kinds, the longest kernels and the idle gaps of (start, end, name) spans over n steps."""
    kinds: dict[str, float] = {}
    per_name: dict[str, float] = {}
    launches: dict[str, int] = {}
    for start, stop, name in spans:
        us = stop - start
        kind = next((k for k, keys in KERNEL_KINDS if any(w in name.lower() for w in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
        per_name[name[:90]] = per_name.get(name[:90], 0.0) + us
        launches[name[:90]] = launches.get(name[:90], 0) + 1
    intervals = _busy_intervals([(a, b, name[:60]) for a, b, name in spans])
    busy = sum(stop - start for start, stop, *_ in intervals)
    top = sorted(per_name.items(), key=lambda kv: -kv[1])
    table = {k: round(100 * v / wall_us, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    table["GPU idle"] = round(100 * max(0.0, wall_us - busy) / wall_us, 1)
    return {"steps": n, "wall_ms_per_step": wall_us / n / 1e3, "percent_of_wall": table,
            "top_kernels_ms_per_step": [(k, round(v / n / 1e3, 3)) for k, v in top[:15]],
            # (name, ms per step, launches per step) of the 40 longest: where the launches and
            # the memory-bound time go, kernel by kernel
            "kernels": [(k, round(v / n / 1e3, 3), round(launches[k] / n, 1)) for k, v in top[:40]],
            "launches_per_step": round(len(spans) / n, 1),
            "idle_gaps": idle_gaps(intervals, n)}


def trace_steps(step_fn, n: int, path: Path) -> Path:
    """A gzipped Chrome trace of n steps: kernels, copies, and the host's operator calls and
    launches, for reading what the host does while the GPU idles. Without Python frames:
    recording those slows the host several times over, and the GPU then waits for it everywhere."""
    import gzip
    import shutil

    prof, _ = run_profiled(step_fn, n)
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return path


def run_profiled(step_fn, n: int, mark_steps: bool = False):
    """n steps under the profiler (host operators and GPU kernels), started on a drained GPU;
    returns the profile and the host's wall time in microseconds. ``mark_steps`` wraps each
    step in a "bench step i" annotation, whose GPU-side span says where step i's kernels start."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            with record_function(f"bench step {i}") if mark_steps else nullcontext():
                step_fn()
        torch.cuda.synchronize()
        host_wall_us = (time.perf_counter() - t0) * 1e6
    return prof, host_wall_us


def _busy_intervals(spans) -> list[list]:
    """The union of (start, end, name) kernel spans in time order, as [start, end, first name,
    last name] per busy interval (kernels on other streams overlap). Between two intervals the
    GPU idles, and the names say which kernels bound the gap."""
    out: list[list] = []
    for start, stop, name in sorted(spans):
        if out and start <= out[-1][1]:
            if stop >= out[-1][1]:
                out[-1][1], out[-1][3] = stop, name
        else:
            out.append([start, stop, name, name])
    return out


def idle_gaps(busy: list[list], steps: int, small_us: float = 10.0, top: int = 8) -> dict:
    """Where the GPU idles between the first and the last kernel: the gaps shorter than
    ``small_us`` (launch latency between queued kernels, what CUDA graphs shorten) apart from
    the long ones (the GPU waiting for the host), the longest named by their neighbours."""
    gaps = [(b[0] - a[1], a[3], b[2]) for a, b in zip(busy, busy[1:])]  # (us, kernel before, kernel after)
    small = [g for g in gaps if g[0] < small_us]
    large = sorted((g for g in gaps if g[0] >= small_us), key=lambda g: -g[0])
    per_step = max(1, steps)
    return {"small_gap_us": small_us,
            "small_gaps_per_step": round(len(small) / per_step, 1),
            "small_gaps_ms_per_step": round(sum(g[0] for g in small) / per_step / 1e3, 3),
            "large_gaps_per_step": round(len(large) / per_step, 1),
            "large_gaps_ms_per_step": round(sum(g[0] for g in large) / per_step / 1e3, 3),
            "longest": [(round(g[0], 1), g[1], g[2]) for g in large[:top]]}


def running_mean(xs, window: int = 10, n: int | None = None) -> np.ndarray:
    """The ``window``-step running means of the first ``n`` losses (all of them by default)."""
    a = np.asarray(xs[:n], dtype=np.float64)
    return np.convolve(a, np.ones(window) / window, mode="valid")


def compare_curves(ours: list, peer: list, noise: list, window: int = 10) -> dict:
    """Differences of 10-step running means (one step's loss is noisy on its own), skipping
    the first window, where both start from the same weights and trivially agree."""
    n = min(len(ours), len(peer), len(noise))
    o, p_, s = (running_mean(x, window, n) for x in (ours, peer, noise))
    d_peer, d_noise = np.abs(o - p_), np.abs(o - s)
    return {"steps": n, "window": window, "ours_vs_peer_mean": float(d_peer.mean()), "ours_vs_peer_max": float(d_peer.max()),
            "noise_mean": float(d_noise.mean()), "noise_max": float(d_noise.max()),
            "last20": [float(np.mean(x[n - 20:n])) for x in (ours, peer, noise)]}


def plot_curves(results: list, out: Path, title: str) -> None:
    """Per-step losses (faint) and their 10-step means of each run, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    for r, color in zip(results, ("tab:red", "tab:blue", "tab:gray")):
        y = np.asarray(r["losses"], dtype=np.float64)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        if len(y) >= 10:
            ax.plot(x[9:], running_mean(y), color=color, linewidth=1.8,
                    label=f"{r['name']} (10-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
