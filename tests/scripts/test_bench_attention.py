"""benchmarks/bench_attention.py's CPU-side parts: the bit-for-bit repeat check and the backend specs."""
from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from koen_sllm.config import repo_root
from koen_sllm.kernels import flash_attn4


def load_module():
    spec = importlib.util.spec_from_file_location("bench_attention", repo_root() / "benchmarks" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ba = load_module()


def test_repeats_that_equal_the_first_bit_for_bit_are_counted_as_such():
    grads = [torch.ones(3), torch.zeros(2)]
    assert ba.repeat_differences(lambda: [g.clone() for g in grads], grads, 4) == (0, 0.0)
    assert ba.repeat_text(0, 4, 0.0) == "repeat bit for bit (4 calls)"


def test_a_repeat_differing_in_the_last_bit_is_caught_with_its_size():
    grads = [torch.ones(3)]
    nudged = torch.nextafter(torch.ones(3), torch.full((3,), 2.0))  # one ulp above 1.0
    calls = itertools.cycle([[grads[0].clone()], [nudged]])
    differing, largest = ba.repeat_differences(lambda: next(calls), grads, 4)
    assert differing == 2 and largest == pytest.approx(2 ** -23)
    assert ba.repeat_text(differing, 4, largest) == "differ in 2 of 4 calls (max |diff| 1.19e-07)"


@pytest.mark.parametrize("spec", ["cudnn:deterministic", "fa4:fast"])
def test_only_fa4_takes_a_mode_and_only_deterministic(spec):
    with pytest.raises(ValueError, match="only fa4 takes a mode"):
        ba.measure(spec, None, None, None, None, False, 1, 1)


def test_fa4_deterministic_is_set_for_its_measurement_only(monkeypatch):
    seen = []
    monkeypatch.setattr(ba, "check_backend", lambda name: None)
    monkeypatch.setattr(ba, "_measure", lambda backend, *a: seen.append((backend, flash_attn4.deterministic_backward))
                        or {"backend": backend})
    assert ba.measure("fa4:deterministic", None, None, None, None, False, 1, 1) == {"backend": "fa4:deterministic"}
    ba.measure("fa4", None, None, None, None, False, 1, 1)
    assert seen == [("fa4", True), ("fa4", None)] and flash_attn4.deterministic_backward is None
