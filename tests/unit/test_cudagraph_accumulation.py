"""Gradient accumulation under CUDA graphs (--compile-mode reduce-overhead).

A replayed backward writes its gradients into the graphs' memory pool, and a parameter's first
gradient is that output tensor itself: the next micro-batch's replay would overwrite it
(pytorch#169545). The engine moves the first micro-batch's gradients out of the pool. On the CPU the
pool is simulated by overwriting the tensors the first backward produced; on a GPU the real graphs run.
"""
from __future__ import annotations

import pytest
import torch

from koen_sllm.config import apply_device_defaults, parse_args
from koen_sllm.distributed import DistInfo
from koen_sllm.engines.ddp import DDPEngine, Levers
from koen_sllm.model import KoEnLM, model_config_from_preset

VOCAB, SEQ, BATCH = 64, 16, 2


def _engine(device: torch.device, argv: list[str], *, cudagraphs: bool | None = None) -> DDPEngine:
    cfg, _ = parse_args(["--model-size", "tiny", "--batch-size", str(BATCH), "--grad-accum", "2", *argv])
    apply_device_defaults(cfg, has_cuda=device.type == "cuda")
    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset("tiny", VOCAB, SEQ)).to(device)
    engine = DDPEngine(model, cfg, DistInfo(0, 0, 1, device, None), grad_accum=2, max_steps=10)
    if cudagraphs is None:
        engine.prepare()
    else:  # uncompiled, with the lever set by hand: the CPU test of the engine's own part
        engine.levers = Levers(cudagraphs=cudagraphs)
    return engine


def _batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        out.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    return out


def _accumulate(engine: DDPEngine, batches, after_first=None) -> dict[str, torch.Tensor]:
    """Both micro-batches of one step; ``after_first`` runs between them."""
    engine.begin_step()
    engine.forward_backward(*batches[0], sync=False)
    if after_first is not None:
        after_first()
    engine.forward_backward(*batches[1], sync=True)
    return {n: p.grad.detach().float().clone() for n, p in engine.raw_model.named_parameters()}


@pytest.mark.parametrize("cudagraphs", [True, False])
def test_first_gradients_survive_a_replay_that_reuses_their_memory(cudagraphs):
    device = torch.device("cpu")
    batches = _batches(device)
    expected = _accumulate(_engine(device, ["--no-compile"], cudagraphs=False), batches)

    engine = _engine(device, ["--no-compile"], cudagraphs=cudagraphs)
    produced: list[torch.Tensor] = []  # the tensors the first backward stored as .grad
    hooks = [p.register_post_accumulate_grad_hook(lambda p: produced.append(p.grad))
             for p in engine.raw_model.parameters()]

    def replay_overwrites_the_pool():
        for h in hooks:
            h.remove()
        for g in produced:
            g.fill_(1e3)  # what the next replay would do to the graphs' outputs

    got = _accumulate(engine, batches, after_first=replay_overwrites_the_pool)
    assert len(produced) == len(expected)
    if cudagraphs:
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], msg=f"{name}: first micro-batch's gradient lost")
    else:  # without the move, the overwritten output is the gradient: the simulation does bite
        assert any(not torch.allclose(grad, expected[n]) for n, grad in got.items())


def test_one_micro_batch_steps_copy_nothing():
    device = torch.device("cpu")
    engine = _engine(device, ["--no-compile"], cudagraphs=True)
    produced: dict[str, torch.Tensor] = {}

    def remember(p: torch.Tensor, name: str) -> None:
        produced[name] = p.grad

    for name, p in engine.raw_model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: remember(p, name))
    engine.begin_step()
    engine.forward_backward(*_batches(device)[0], sync=True)  # the step's only (last) micro-batch
    assert all(p.grad is produced[n] for n, p in engine.raw_model.named_parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reduce_overhead_accumulates_like_the_default_compile_on_the_gpu():
    device = torch.device("cuda")
    batches = _batches(device)
    expected = _accumulate(_engine(device, ["--compile-mode", "default", "--attn", "flash"]), batches)
    engine = _engine(device, ["--compile-mode", "reduce-overhead", "--attn", "flash"])
    assert engine.levers.cudagraphs
    for _ in range(3):  # warm-up, recording, then replays
        got = _accumulate(engine, batches)
        engine.optimizer.zero_grad(set_to_none=True)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-2, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_without_the_copy_the_replays_lose_the_first_gradients_on_the_gpu(monkeypatch):
    """The reason for the copy, on the real graphs. Should torch stop reusing that memory
    (pytorch#169545 fixed), this fails, and the copy can go."""
    device = torch.device("cuda")
    batches = _batches(device)
    expected = _accumulate(_engine(device, ["--compile-mode", "default", "--attn", "flash"]), batches)
    monkeypatch.setattr(DDPEngine, "_own_gradients", lambda self: None)
    engine = _engine(device, ["--compile-mode", "reduce-overhead", "--attn", "flash"])
    try:
        for _ in range(3):
            got = _accumulate(engine, batches)
            engine.optimizer.zero_grad(set_to_none=True)
    except RuntimeError as exc:  # torch's own check caught the overwrite
        assert "overwritten" in str(exc) or "CUDAGraph" in str(exc), exc
        return
    assert any(not torch.allclose(grad, expected[n], rtol=1e-2, atol=1e-5) for n, grad in got.items()), \
        "CUDA graph replays no longer overwrite the first micro-batch's gradients: the engine's copy can go"
