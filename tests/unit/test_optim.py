"""Weight-decay groups, the lr schedule and RNG state that loads with weights_only."""
import io
import random

import numpy as np
import pytest
import torch

from koen_sllm.config import OptimConfig
from koen_sllm.optim import build_scheduler, capture_rng, lr_factor, param_groups, restore_rng


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4, bias=True)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed_tokens.weight  # tied: must appear once


def test_no_decay_on_norms_biases_embeddings():
    toy = _Toy()
    groups = param_groups(toy, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(toy.proj.weight)}
    assert groups[1]["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups)
    assert total == len({id(p) for p in toy.parameters()})


def test_warmup_then_cosine_to_min_ratio():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 100, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_applies_factor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(learning_rate=1e-3, warmup_steps=4, min_lr_ratio=0.0), 20)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 / 4)
    for _ in range(3):
        opt.step(); sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)


def test_rng_state_round_trips_with_weights_only():
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    state = capture_rng()
    buf = io.BytesIO(); torch.save(state, buf); buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    restore_rng(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
