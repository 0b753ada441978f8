"""MFU math, the peak table, throughput windows and the progress line."""
import json
import math

import pytest

from koen_sllm.metrics import MetricsSink, Throughput, format_eta, format_progress, mfu, peak_flops


def test_peak_table_matches_device_names():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops("Some Future GPU", "bf16") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None


def test_mfu_of_a_known_case():
    # The 336M peer shape at sequence 2048: 6 x (params - input embedding) + 12 x L x H x T.
    non_embedding = 336_000_000 - 32000 * 1024
    fpt = 6 * non_embedding + 12 * 24 * 1024 * 2048
    value = mfu(125_000, fpt, 989e12)
    assert value == pytest.approx(125_000 * fpt / 989e12)
    assert 0.30 < value < 0.32  # the Trainer peer's 31% reported in the throughput issue
    assert mfu(125_000, fpt, None) is None


def test_throughput_skips_warmup_and_windows():
    m = Throughput(warmup_steps=2)
    m.update(1000, 10.0)  # compile step: ignored
    m.update(1000, 5.0)   # ignored
    assert m.window_rate() is None
    m.update(1000, 1.0)
    m.update(3000, 1.0)
    assert m.window_rate() == pytest.approx(2000.0)
    assert m.window_rate() is None  # the window restarts
    m.update(1000, 2.0)
    assert m.mean_rate() == pytest.approx(5000 / 4.0)
    assert m.mean_step_time() == pytest.approx(4.0 / 3)


def test_progress_line_format_is_stable():
    line = format_progress({"step": 10, "loss": 5.12345, "lr": 1e-4, "grad_norm": 1.2345,
                            "tokens_per_s": 12345.6, "tokens_per_s_per_gpu": 6172.8, "mfu": 0.451,
                            "mem_gib": 12.34, "eta_s": 754}, 100)
    assert line == ("step 10/100 | loss 5.1235 | lr 1.00e-04 | grad_norm 1.234 | tok/s 12,346 | "
                    "tok/s/gpu 6,173 | mfu 45.1% | mem 12.3 GiB | eta 0:12:34")
    assert "mfu n/a" in format_progress({"step": 1, "loss": 1.0, "lr": 1.0}, 2)
    assert format_eta(None) == "?" and format_eta(float("nan")) == "?"


def test_metrics_sink_writes_jsonl(tmp_path):
    sink = MetricsSink(tmp_path / "m" / "metrics.jsonl")
    sink.write({"type": "train", "step": 1, "loss": 2.5})
    sink.write({"type": "eval", "step": 1, "val_loss": 2.7})
    sink.close()
    rows = [json.loads(l) for l in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["train", "eval"] and rows[0]["loss"] == 2.5
    assert all(math.isfinite(r["time"]) for r in rows)


def test_spike_detector_flags_a_jump_but_not_noise_or_descent():
    import random

    from koen_sllm.metrics import SpikeDetector

    rng = random.Random(0)
    det = SpikeDetector()
    descent = [10.0 - 2.0 * i / 100 + rng.gauss(0, 0.1) for i in range(100)]
    assert [det.check(x) for x in descent] == [None] * 100
    median = det.check(descent[-1] + 3.0)
    assert median is not None and abs(median - descent[-1]) < 0.5
    assert det.check(descent[-1] + 3.0) is not None  # a spike never joins the window, so a second is seen too
    assert det.check(float("nan")) is None and det.check(descent[-1]) is None


def test_spike_detector_waits_for_enough_history():
    from koen_sllm.metrics import SpikeDetector

    det = SpikeDetector(window=20)
    assert [det.check(x) for x in (5.0, 5.0, 5.0, 50.0)] == [None] * 4  # too few steps to judge
    det = SpikeDetector(window=20)
    for _ in range(10):
        det.check(5.0)
    assert det.check(5.9) is None and det.check(6.5) == 5.0  # 1.0 nats is the smallest jump flagged


def test_step_clock_counts_periods_and_leaves_pauses_out():
    from koen_sllm.metrics import StepClock

    now = [100.0]
    clock = StepClock(clock=lambda: now[0])
    now[0] = 100.5
    assert clock.lap() == 0.5
    now[0] = 101.25
    assert clock.lap() == 0.75
    with clock.paused():
        now[0] = 111.25  # ten seconds of validation or saving
    now[0] = 111.5
    assert clock.lap() == 0.25
