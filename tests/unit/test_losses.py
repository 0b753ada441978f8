"""The output layer + cross-entropy against the plain path: in chunks (CPU), and with the logits'
gradient computed in the forward (losses.fused_linear_cross_entropy: on CPU, its Triton kernel in
Triton's CPU interpreter and, where there is one, on a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import koen_sllm.model as model_mod
from koen_sllm import losses
from koen_sllm.config import ConfigError, parse_args
from koen_sllm.losses import (IGNORE_INDEX, chunked_linear_cross_entropy, fused_ce_runs, fused_linear_cross_entropy,
                              linear_ce_loss_grad)
from koen_sllm.model import KoEnLM, model_config_from_preset
from triton_interpreter import needs_triton, run_in_interpreter

N, C, V = 300, 32, 500


def inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    weight = (0.1 * torch.randn(V, C, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE_INDEX
    return hidden, weight, targets


def grads(loss_fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets)
    (3.0 * loss).backward()  # a scale on the loss must reach the gradients
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 64, 299, 300, 4096])
def test_fp32_equals_the_plain_path(chunk):
    h, w, t = inputs()
    ref = grads(plain, h, w, t)
    got = grads(lambda *a: chunked_linear_cross_entropy(*a, chunk=chunk), h, w, t)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_follows_the_plain_path():
    h, w, t = inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(plain, h, w, t)
        got = grads(lambda *a: chunked_linear_cross_entropy(*a, chunk=64), h, w, t)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # master weights' dtype
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    # bf16 matmuls: the head's gradient is summed in fp32 here, in bf16 there
    torch.testing.assert_close(got[1], ref[1], rtol=0.02, atol=2e-4)
    torch.testing.assert_close(got[2], ref[2], rtol=0.02, atol=2e-3)


def test_ignored_targets_do_not_count_and_no_grad_needs_no_gradients():
    h, w, t = inputs(2)
    t[:] = IGNORE_INDEX
    t[5] = 7
    only = F.cross_entropy(F.linear(h[5:6], w), t[5:6])
    torch.testing.assert_close(chunked_linear_cross_entropy(h, w, t, chunk=16), only)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, t, chunk=16), only)
    with pytest.raises(ValueError, match="chunk"):
        chunked_linear_cross_entropy(h, w, t, chunk=0)


def model_loss_and_grads(x, chunk: int = 0):
    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset("tiny", 300, 32, ce_chunk_tokens=chunk))
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_the_model_trains_the_same_through_each_loss_path(path, monkeypatch):
    x = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(3))
    ref = model_loss_and_grads(x)  # the plain path (on CPU the fused loss is not chosen)
    if path == "fused":
        monkeypatch.setattr(model_mod, "fused_ce_runs", lambda hidden, enabled: enabled)
    got = model_loss_and_grads(x, chunk=40 if path == "chunked" else 0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    for name, g in ref[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_chunked_loss_matches_eager():
    h, w, t = inputs(4)
    ref = grads(lambda *a: chunked_linear_cross_entropy(*a, chunk=64), h, w, t)
    compiled = torch.compile(lambda *a: chunked_linear_cross_entropy(*a, chunk=64))
    got = grads(compiled, h, w, t)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_option_is_parsed_and_validated():
    cfg, _ = parse_args(["--ce-chunk-tokens", "4096"])
    assert cfg.train.ce_chunk_tokens == 4096
    with pytest.raises(ConfigError, match="--ce-chunk-tokens"):
        parse_args(["--ce-chunk-tokens", "-1"])
    with pytest.raises(ConfigError, match="--ce-chunk-tokens"):
        model_config_from_preset("tiny", 300, 32, ce_chunk_tokens=-5)


# ---------------------------------------------------------------- the loss and its gradient at once
def test_fused_fp32_equals_the_plain_path():
    h, w, t = inputs()
    ref = grads(plain, h, w, t)
    got = grads(fused_linear_cross_entropy, h, w, t)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)


def test_bf16_weights_and_bf16_autocast_follow_the_plain_path():
    h, w, t = inputs(1, torch.bfloat16)
    ref, got = grads(plain, h, w, t), grads(fused_linear_cross_entropy, h, w, t)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], ref[1:]):  # the same bf16 logits' gradient into the same bf16 matmuls
        torch.testing.assert_close(a, b, rtol=0.02, atol=1e-4)

    h, w, t = inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = grads(plain, h, w, t), grads(fused_linear_cross_entropy, h, w, t)
    assert got[1].dtype == got[2].dtype == torch.float32  # fp32 weights get fp32 gradients back
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=0.02, atol=1e-4)


def test_ignored_targets_do_not_count_and_none_counted_gives_nan_and_zero_gradients():
    h, w, t = inputs(2)
    t[:] = IGNORE_INDEX
    t[5] = 7
    only = F.cross_entropy(F.linear(h[5:6], w), t[5:6])
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, t), only)
    t[5] = IGNORE_INDEX
    loss, grad = linear_ce_loss_grad(h.detach(), w.detach(), t)
    assert torch.isnan(loss) and torch.isnan(plain(h, w, t))  # as F.cross_entropy
    assert torch.count_nonzero(grad) == 0


def test_compiled_fused_loss_matches_eager():
    h, w, t = inputs(4)
    ref = grads(fused_linear_cross_entropy, h, w, t)
    got = grads(torch.compile(fused_linear_cross_entropy), h, w, t)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_fused_loss_is_chosen_only_on_a_gpu_in_bf16_with_gradients(monkeypatch):
    h = torch.zeros(2, 4)
    assert not fused_ce_runs(h)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(losses, "_HAVE_TRITON", True)
    assert not fused_ce_runs(h)  # fp32
    assert fused_ce_runs(h.bfloat16())
    assert not fused_ce_runs(h.half())  # fp16: tiny gradients would round to zero before the loss scale
    with torch.no_grad():
        assert not fused_ce_runs(h.bfloat16())  # validation keeps the plain loss
    assert losses.fused_ce_offered(True, torch.bfloat16) and not losses.fused_ce_offered(True, torch.float16)
    assert not fused_ce_runs(h.bfloat16(), enabled=False)  # --no-loss-kernel
    assert not losses.fused_ce_offered(True, torch.bfloat16, enabled=False)


def test_the_loss_kernel_is_a_run_option_that_reaches_the_model(tmp_path):
    """--no-loss-kernel / --rope-kernel / --cudnn-grouped-kv travel from the command line to the
    model's configuration, the path benchmarks take too."""
    from koen_sllm.config import parse_args

    cfg, _ = parse_args([])
    assert (cfg.train.loss_kernel, cfg.train.rope_kernel, cfg.train.cudnn_grouped_kv) == (True, False, None)
    cfg, _ = parse_args(["--no-loss-kernel", "--rope-kernel", "--cudnn-grouped-kv", "off"])
    assert (cfg.train.loss_kernel, cfg.train.rope_kernel, cfg.train.cudnn_grouped_kv) == (False, True, False)
    mcfg = model_config_from_preset("tiny", 1000, 64, loss_kernel=cfg.train.loss_kernel,
                                    rope_kernel=cfg.train.rope_kernel, cudnn_grouped_kv=cfg.train.cudnn_grouped_kv)
    assert (mcfg.loss_kernel, mcfg.rope_kernel, mcfg.cudnn_grouped_kv) == (False, True, False)


def check_kernel(device: str, dtype: torch.dtype, block: int) -> None:
    """The Triton kernel against the reference arithmetic: a vocabulary that is not a multiple of
    the block, ignored rows, a target outside the vocabulary, and nothing counted."""
    from koen_sllm.kernels import cross_entropy as ce_kernel

    saved, ce_kernel.BLOCK_V = ce_kernel.BLOCK_V, block
    try:
        _check_kernel(ce_kernel, device, dtype)
    finally:
        ce_kernel.BLOCK_V = saved


def _check_kernel(ce_kernel, device: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    logits = (4 * torch.randn(37, 301, generator=g)).to(device, dtype)
    targets = torch.randint(0, 301, (37,), generator=g).to(device)
    targets[::5] = IGNORE_INDEX
    count = (targets != IGNORE_INDEX).sum().float()
    want_loss, want_grad = losses._loss_grad_reference(logits, targets, count)
    got_grad = logits.clone()
    row_loss = ce_kernel.loss_and_grad_in_place(got_grad, targets, (1.0 / count).reshape(1), IGNORE_INDEX)
    torch.testing.assert_close(row_loss.sum() / count, want_loss, rtol=1e-5, atol=1e-5)
    exact = dtype == torch.float32
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-4 if exact else 0.01,
                               atol=1e-7 if exact else 1e-5)
    assert torch.count_nonzero(got_grad[::5]) == 0  # ignored rows: zero gradient, zero loss
    assert torch.count_nonzero(row_loss[::5]) == 0

    targets[1] = 301  # outside the vocabulary: that row's loss is nan, nothing else read
    row_loss = ce_kernel.loss_and_grad_in_place(logits.clone(), targets, (1.0 / count).reshape(1), IGNORE_INDEX)
    assert torch.isnan(row_loss[1]) and torch.isfinite(row_loss[2:]).all()

    targets[:] = IGNORE_INDEX  # nothing counted: scale 1/0, gradient zero
    grad = logits.clone()
    ce_kernel.loss_and_grad_in_place(grad, targets, torch.full((1,), float("inf"), device=device), IGNORE_INDEX)
    assert torch.count_nonzero(grad) == 0


@needs_triton
def test_loss_kernel_matches_the_reference_in_the_interpreter():
    run_in_interpreter("test_losses", "t.check_kernel('cpu', torch.float32, 64); t.check_kernel('cpu', torch.bfloat16, 512)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loss_kernel_matches_the_reference_on_the_gpu():
    check_kernel("cuda", torch.float32, 64)
    check_kernel("cuda", torch.bfloat16, 4096)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_compiled_model_trains_the_same_with_the_kernel(monkeypatch):
    x = torch.randint(0, 1000, (4, 257), generator=torch.Generator().manual_seed(3)).cuda()
    results = []
    for kernel in (False, True):
        torch.manual_seed(0)
        model = KoEnLM(model_config_from_preset("tiny", 1000, 256, loss_kernel=kernel)).cuda()
        step = torch.compile(lambda a, b: model(a, b))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0.02, atol=1e-4, msg=name)
