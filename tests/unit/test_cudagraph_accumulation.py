"""Gradient accumulation under CUDA graphs (--compile-mode reduce-overhead, and auto on one GPU).

A replayed backward hands back gradients that live in the graphs' memory pool, and a parameter's
first gradient is that tensor itself; later micro-batches add into it. That is safe while the whole
step is one generation of graphs (one ``cudagraph_mark_step_begin`` per step, not per micro-batch)
and no gradient outlives its step: a gradient kept into the next step would be overwritten by that
step's replays (pytorch#169545). The CPU tests hold the engine to the second condition; the GPU tests
run the real graphs against the default compile.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from koen_sllm.config import apply_device_defaults, parse_args
from koen_sllm.distributed import DistInfo
from koen_sllm.engines.ddp import DDPEngine
from koen_sllm.model import KoEnLM, model_config_from_preset

VOCAB, SEQ, BATCH = 64, 16, 2


def _engine(device: torch.device, argv: list[str]) -> DDPEngine:
    cfg, _ = parse_args(["--model-size", "tiny", "--batch-size", str(BATCH), "--grad-accum", "2", *argv])
    apply_device_defaults(cfg, has_cuda=device.type == "cuda")
    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset("tiny", VOCAB, SEQ)).to(device)
    engine = DDPEngine(model, cfg, DistInfo(0, 0, 1, device, None), grad_accum=2, max_steps=10)
    engine.prepare()
    return engine


def _batches(device: torch.device, step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1 + step)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        out.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    return out


def _accumulate(engine: DDPEngine, batches, *, nan_loss: bool = False) -> torch.Tensor:
    """Both micro-batches of one step; returns their summed loss."""
    engine.begin_step()
    total = engine.forward_backward(*batches[0], sync=False).float()
    return total + engine.forward_backward(*batches[1], sync=True, nan_loss=nan_loss).float()


def _gradients(engine: DDPEngine) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in engine.raw_model.named_parameters()}


@pytest.mark.parametrize("early_update", [True, False])
@pytest.mark.parametrize("bad_step", [False, True])
def test_no_gradient_outlives_its_step(early_update, bad_step):
    """What the graphs rely on: after an applied or a skipped step every gradient is gone."""
    engine = _engine(torch.device("cpu"), ["--no-compile"])
    if early_update:  # the GPU's fused AdamW, which updates before the vote is read
        engine.optimizer = torch.optim.AdamW(engine.raw_model.parameters(), lr=1e-3, fused=True)
        engine.decide_levers()
    engine.levers = replace(engine.levers, cudagraphs=True)
    assert engine.levers.early_update is early_update
    loss = _accumulate(engine, _batches(engine.device), nan_loss=bad_step)
    assert all(p.grad is not None for p in engine.raw_model.parameters())
    outcome = engine.step(loss / 2, stop_requested=False)
    assert outcome.applied is not bad_step
    kept = [n for n, p in engine.raw_model.named_parameters() if p.grad is not None]
    assert not kept, f"gradients kept past the step: {kept[:3]}"


def _gpu_engines() -> tuple[DDPEngine, DDPEngine]:
    device = torch.device("cuda")
    default = _engine(device, ["--compile-mode", "default", "--attn", "flash"])
    graphs = _engine(device, ["--compile-mode", "reduce-overhead", "--attn", "flash"])
    assert graphs.levers.cudagraphs and not default.levers.cudagraphs
    return default, graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reduce_overhead_accumulates_like_the_default_compile_on_the_gpu():
    default, graphs = _gpu_engines()
    batches = _batches(default.device)
    _accumulate(default, batches)
    expected = _gradients(default)
    for _ in range(3):  # warm-up, recording, then a replay
        _accumulate(graphs, batches)
        got = _gradients(graphs)
        graphs.optimizer.zero_grad(set_to_none=True)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-2, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accumulating_steps_as_graphs_train_like_the_default_compile_on_the_gpu():
    """Whole steps (two micro-batches, the update, the next step's replays over the same pool):
    the weights after four steps match the default compile's."""
    default, graphs = _gpu_engines()
    for step in range(4):
        batches = _batches(default.device, step)
        for engine in (default, graphs):
            loss = _accumulate(engine, batches)
            assert engine.step(loss / 2, stop_requested=False).applied
    expected = dict(default.raw_model.named_parameters())
    for name, p in graphs.raw_model.named_parameters():
        torch.testing.assert_close(p.float(), expected[name].float(), rtol=1e-2, atol=1e-4, msg=name)
