"""benchmarks/fp8_parity.py: the native FP8 linear against torchao's, gradient by gradient; on the
CPU they agree, and an arithmetic changed on purpose is named where it first shows."""
from __future__ import annotations

import json

import torch

import fp8_parity
from fp8_support import needs_torchao
from koen_sllm.kernels import fp8_linear

TINY = ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "64", "--vocab", "320"]


@needs_torchao
def test_compiled_on_the_cpu_the_two_agree_bit_for_bit(tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert fp8_parity.main([*TINY, "--steps", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["first_differing_grad"] is None and all(r["equal"] for r in report["first_grads"])
    assert report["steps_equal"] == [True, True, True]
    assert report["first_grads"][0]["param"] == "lm_head.weight"  # the backward's order: the output layer first
    printed = capsys.readouterr().out
    assert "17 of 17 gradients equal bit for bit" in printed
    assert "control, torchao against itself: 17 of 17 equal" in printed
    assert report["control_steps_equal"] == [True, True, True]


@needs_torchao
def test_a_changed_arithmetic_is_named_where_the_backward_first_meets_it(monkeypatch, capsys):
    # the output gradients cast to e4m3 instead of e5m2 in the native linear only
    monkeypatch.setattr(fp8_linear, "E5M2", torch.float8_e4m3fn)
    assert fp8_parity.main([*TINY, "--steps", "2", "--no-compile"]) == 0
    printed = capsys.readouterr().out
    assert "first to differ in the backward's order: layers.1.mlp.down_proj.weight" in printed
    assert "(differ)" in printed
