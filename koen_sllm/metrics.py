"""Honest training metrics: tokens/s, MFU from a device-keyed peak table, memory, ETA.

MFU = achieved model FLOPs per second per device / the device's dense peak for
the precision in use. An unknown device reports no MFU rather than a wrong one.
A --fp8 run (bf16 autocast, the projections' matmuls in FP8) is still measured against
the dense bf16 peak, so its MFU can exceed what bf16 matmuls could reach.
Warm-up steps (compilation, allocator growth) are left out of the averages.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, from vendor datasheets.
# Matched in order against torch.cuda.get_device_name(); the first hit wins, so
# more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM (HBM3) and GH200 report plain "H100 80GB HBM3"
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("H800",), 989e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("A10G",), 70e12),
    (("A10",), 125e12),
    (("RTX 4090",), 165e12),
    (("RTX 3090",), 71e12),
)


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Peak FLOP/s for MFU, or None when the device or precision has no honest entry."""
    if precision not in ("bf16", "fp16"):
        return None  # fp32 runs on different units; an MFU against bf16 peak would mislead
    name = device_name.upper()
    for keys, flops in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return flops
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    if not peak or tokens_per_s_per_device <= 0:
        return None
    return tokens_per_s_per_device * flops_per_token / peak


def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Throughput:
    """Tokens per second over the steps since the last report, skipping warm-up."""

    warmup_steps: int = 2
    _steps_seen: int = 0
    _window_tokens: int = 0
    _window_time: float = 0.0
    _total_tokens: int = 0
    _total_time: float = 0.0

    def update(self, tokens: int, seconds: float) -> None:
        self._steps_seen += 1
        if self._steps_seen <= self.warmup_steps:
            return
        self._window_tokens += tokens
        self._window_time += seconds
        self._total_tokens += tokens
        self._total_time += seconds

    def window_rate(self) -> Optional[float]:
        """Tokens/s since the previous call (None while still warming up)."""
        if self._window_time <= 0:
            return None
        rate = self._window_tokens / self._window_time
        self._window_tokens, self._window_time = 0, 0.0
        return rate

    def mean_rate(self) -> Optional[float]:
        return self._total_tokens / self._total_time if self._total_time > 0 else None

    def mean_step_time(self) -> Optional[float]:
        measured = self._steps_seen - self.warmup_steps
        return self._total_time / measured if measured > 0 and self._total_time > 0 else None


class StepClock:
    """Wall-clock time per optimizer step, without synchronizing the device for it.

    The loop waits for the device once a step anyway (reading the all-reduced vote), so
    the time between two consecutive returns from a step is that step's period, the host
    work in between included; a second synchronize only to read a clock would leave the
    GPU idle while the host logs and launches the next step. Validation and checkpoint
    saves run inside ``paused()`` and are left out.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.last = clock()

    def lap(self) -> float:
        now = self.clock()
        elapsed, self.last = now - self.last, now
        return elapsed

    @contextmanager
    def paused(self):
        began = self.clock()
        try:
            yield
        finally:
            self.last += self.clock() - began


class SpikeDetector:
    """Flags a training loss far above the recent ones (a loss spike), to warn about, never to act on.

    A step is a spike when its loss exceeds the median of the last ``window`` losses by more
    than ``min_jump`` nats and by more than ``mads`` times their median absolute deviation,
    so ordinary batch-to-batch noise and the steep early descent do not count. Spikes stay
    out of the window, so one spike does not hide the next.
    """

    def __init__(self, window: int = 20, min_jump: float = 1.0, mads: float = 6.0):
        self.window, self.min_jump, self.mads = window, min_jump, mads
        self.recent: list[float] = []

    def check(self, loss: float) -> Optional[float]:
        """The window's median when ``loss`` is a spike, else None (and ``loss`` joins the window)."""
        if not math.isfinite(loss):
            return None
        if len(self.recent) >= self.window // 2:
            ordered = sorted(self.recent)
            median = ordered[len(ordered) // 2]
            mad = sorted(abs(x - median) for x in self.recent)[len(self.recent) // 2]
            if loss - median > max(self.min_jump, self.mads * mad):
                return median
        self.recent = (self.recent + [loss])[-self.window:]
        return None


def format_progress(rec: dict[str, Any], max_steps: int) -> str:
    """The one progress line (docs/architecture.md): the launcher's --status parses it."""
    def num(key, fmt, default="n/a"):
        v = rec.get(key)
        return default if v is None else format(v, fmt)

    mfu_v = rec.get("mfu")
    mem = rec.get("mem_gib")
    return (
        f"step {rec['step']}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
        f"grad_norm {num('grad_norm', '.3f')} | tok/s {num('tokens_per_s', ',.0f')} | "
        f"tok/s/gpu {num('tokens_per_s_per_gpu', ',.0f')} | "
        f"mfu {'n/a' if mfu_v is None else f'{100 * mfu_v:.1f}%'} | "
        f"mem {'n/a' if mem is None else f'{mem:.1f} GiB'} | eta {format_eta(rec.get('eta_s'))}"
    )


@dataclass
class MetricsSink:
    """Rank-0 metrics: one JSON object per line, plus TensorBoard when installed."""

    jsonl_path: Path
    tensorboard_dir: Optional[Path] = None
    _tb: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is an optional extra
                self._tb = None
            else:
                self._tb = SummaryWriter(log_dir=str(self.tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            prefix = record.get("type", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time") and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
