"""The chunked output layer + cross-entropy against the plain path (CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from koen_sllm.config import ConfigError, parse_args
from koen_sllm.losses import IGNORE_INDEX, chunked_linear_cross_entropy
from koen_sllm.model import KoEnLM, model_config_from_preset

N, C, V = 300, 32, 500


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(V, C, generator=g)).requires_grad_()
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


def test_the_model_trains_the_same_with_a_chunked_loss():
    x = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (0, 40):
        torch.manual_seed(0)
        model = KoEnLM(model_config_from_preset("tiny", 300, 32, ce_chunk_tokens=chunk))
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


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
