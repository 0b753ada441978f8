"""The benchmark's profile arithmetic on made-up kernel spans (the GPU runs are in docs/benchmarks.md)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench_analysis import summarize_kernels  # noqa: E402


def test_kernel_kinds_idle_share_and_gaps():
    # Two steps of 100 us each: a matmul, a Triton kernel 2 us later, then 30 us of nothing,
    # then attention overlapping a copy on another stream.
    spans = []
    for step in range(2):
        t = 100.0 * step
        spans += [(t, t + 40, "nvjet_sm90_tst_256x128"), (t + 42, t + 50, "triton_poi_fused_mul_silu"),
                  (t + 80, t + 100, "cudnn_generated_sdpa_fprop"), (t + 85, t + 90, "Memcpy HtoD")]
    out = summarize_kernels(spans, wall_us=200.0, n=2)
    assert out["wall_ms_per_step"] == pytest.approx(0.1)
    share = out["percent_of_wall"]
    assert share["matmul"] == 40.0 and share["attention"] == 20.0 and share["fused elementwise (Triton)"] == 8.0
    assert share["copies and casts"] == 5.0  # counted as a kind, though it overlaps the attention kernel
    assert share["GPU idle"] == 32.0  # 2 + 30 us per step: the copy hides under the attention kernel
    gaps = out["idle_gaps"]
    assert gaps["small_gaps_per_step"] == 1.0 and gaps["small_gaps_ms_per_step"] == pytest.approx(0.002)
    # the long gaps: 30 us inside each step and none between the steps (step 2 starts at 100)
    assert gaps["large_gaps_per_step"] == 1.0 and gaps["large_gaps_ms_per_step"] == pytest.approx(0.030)
    assert gaps["longest"][0] == (30.0, "triton_poi_fused_mul_silu", "cudnn_generated_sdpa_fprop")
    assert out["top_kernels_ms_per_step"][0] == ("nvjet_sm90_tst_256x128", 0.04)
    assert out["kernels"][0] == ("nvjet_sm90_tst_256x128", 0.04, 1.0)  # ms and launches per step
    assert out["launches_per_step"] == 4.0
