"""RoPE on the fused q/k/v output: the same values and gradients as autograd through the split
and rotation, on CPU; the Triton backward kernel in Triton's CPU interpreter and on a GPU."""
from __future__ import annotations

import pytest
import torch
from triton_interpreter import needs_triton, run_in_interpreter

from koen_sllm.rotary import apply_rope, qkv_rope, qkv_rope_grad, rope_tables, rotate_qkv, unrotate

B, T, HEADS, KV, DIM = 2, 12, 4, 2, 16


def split_and_rotate(qkv, cos, sin):
    """The plain formulation, differentiated by autograd."""
    q, k, v = qkv.split([HEADS * DIM, KV * DIM, KV * DIM], dim=-1)
    q, k, v = q.unflatten(-1, (HEADS, DIM)), k.unflatten(-1, (KV, DIM)), v.unflatten(-1, (KV, DIM))
    return apply_rope(q, cos, sin).to(qkv.dtype), apply_rope(k, cos, sin).to(qkv.dtype), v


def outputs_and_grad(fn, qkv, cos, sin, weights):
    x = qkv.detach().clone().requires_grad_(True)
    outs = fn(x, cos, sin)
    # Each output's gradient reaches the function through a transpose, as the attention's
    # [B, heads, T, D] gradients do: the backward must read them in any layout.
    loss = sum((o.transpose(1, 2).float() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach() for o in outs], x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotation_matches_autograd_of_the_split_rotation(dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(DIM, 32, 10000.0)
    cos, sin = cos[:T], sin[:T]
    qkv = torch.randn(B, T, (HEADS + 2 * KV) * DIM, generator=g).to(dtype)
    weights = [torch.randn(B, h, T, DIM, generator=g) for h in (HEADS, KV, KV)]
    fused = lambda x, c, s: rotate_qkv(x, c, s, HEADS, KV, DIM)  # noqa: E731
    outs_a, grad_a = outputs_and_grad(fused, qkv, cos, sin, weights)
    outs_b, grad_b = outputs_and_grad(split_and_rotate, qkv, cos, sin, weights)
    for a, b in zip(outs_a, outs_b):
        assert a.dtype == dtype and torch.equal(a, b)
    assert grad_a.dtype == dtype and grad_a.shape == qkv.shape
    assert torch.equal(grad_a, grad_b)
    # and the rotation's gradient is not trivially the identity or a plain copy
    assert not torch.allclose(grad_a[..., :HEADS * DIM].float(),
                              torch.cat([w.transpose(1, 2) for w in weights[:1]], -1).flatten(2).to(dtype).float())


def test_the_forward_operator_off_the_gpu_is_the_split_rotation():
    g = torch.Generator().manual_seed(3)
    cos, sin = (x[:T] for x in rope_tables(DIM, 32, 10000.0))
    qkv = torch.randn(B, T, (HEADS + 2 * KV) * DIM, generator=g).bfloat16()
    for got, want in zip(qkv_rope(qkv, cos, sin, HEADS, KV, DIM), split_and_rotate(qkv, cos, sin)):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_the_fused_rotation_compiles_without_graph_breaks():
    model_cfg = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96)
    from koen_sllm.model import KoEnLM, model_config_from_preset

    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset("tiny", 64, 16, **model_cfg))
    x = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x, x)
    loss.backward()
    grad = model.layers[0].self_attn.qkv_proj.weight.grad.clone()
    model.zero_grad()
    model(x, x).backward()
    torch.testing.assert_close(grad, model.layers[0].self_attn.qkv_proj.weight.grad)


def assert_kernel_close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # the interpreter rounds to bf16 toward zero: one bf16 step apart at most
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


def check_kernel(device: str, dtype: torch.dtype) -> None:
    """unrotate_into against the torch reference, from gradients in attention's transposed layout;
    rotate_from (the forward) against apply_rope, from the fused columns."""
    from koen_sllm.kernels.rope import rotate_from, unrotate_into

    g = torch.Generator().manual_seed(1)
    b, t, heads, kv, dim = 3, 40, 4, 2, 64  # 120 rows: not a multiple of the token block
    cos, sin = (x[:t].to(device) for x in rope_tables(dim, 64, 10000.0))
    dq, dk, dv = (torch.randn(b, h, t, dim, generator=g).to(device, dtype).transpose(1, 2) for h in (heads, kv, kv))
    out = torch.full((b, t, (heads + 2 * kv) * dim), float("nan"), device=device, dtype=dtype)
    unrotate_into(out, dq, dk, dv, cos, sin)
    want = torch.cat([unrotate(dq, cos, sin).to(dtype).flatten(2), unrotate(dk, cos, sin).to(dtype).flatten(2),
                      dv.flatten(2)], dim=-1)
    assert_kernel_close(out, want)
    assert torch.equal(out[..., -2 * kv * dim + kv * dim:], want[..., -kv * dim:])  # v copied exactly

    qkv = torch.randn(b, t, (heads + 2 * kv) * dim, generator=g).to(device, dtype)
    q, k, v = (torch.full((b, t, h, dim), float("nan"), device=device, dtype=dtype) for h in (heads, kv, kv))
    rotate_from(qkv, q, k, v, cos, sin)
    parts = qkv.split([heads * dim, kv * dim, kv * dim], dim=-1)
    want_q, want_k = (apply_rope(p.unflatten(-1, (h, dim)), cos, sin).to(dtype) for p, h in zip(parts, (heads, kv)))
    for got, ref in ((q, want_q), (k, want_k)):
        assert_kernel_close(got, ref)
    assert torch.equal(v, parts[2].unflatten(-1, (kv, dim)))


@needs_triton
def test_triton_kernel_matches_the_reference_in_the_interpreter():
    run_in_interpreter("test_rotary", "t.check_kernel('cpu', torch.float32); t.check_kernel('cpu', torch.bfloat16)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_matches_the_reference_on_the_gpu():
    check_kernel("cuda", torch.float32)
    check_kernel("cuda", torch.bfloat16)
    dq = torch.randn(2, 8, 4, 64, device="cuda", dtype=torch.bfloat16)
    dk = dv = torch.randn(2, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = (x[:8].cuda() for x in rope_tables(64, 8, 10000.0))
    assert qkv_rope_grad(dq, dk, dv, cos, sin).shape == (2, 8, 512)  # the operator takes the kernel path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_forward_kernel_gives_the_compiled_formulations_values_and_gradients(monkeypatch):
    g = torch.Generator().manual_seed(2)
    cos, sin = (x[:T].cuda() for x in rope_tables(DIM, 32, 10000.0))
    qkv = torch.randn(B, T, (HEADS + 2 * KV) * DIM, generator=g).cuda().bfloat16()
    weights = [torch.randn(B, h, T, DIM, generator=g).cuda() for h in (HEADS, KV, KV)]
    runs = {}
    for mode in ("compiled", "kernel"):
        fused = lambda x, c, s, k=mode == "kernel": rotate_qkv(x, c, s, HEADS, KV, DIM, k)  # noqa: E731
        runs[mode] = outputs_and_grad(fused, qkv, cos, sin, weights)
    (outs_a, grad_a), (outs_b, grad_b) = runs["compiled"], runs["kernel"]
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(grad_b.float(), grad_a.float(), rtol=2 ** -6, atol=1e-5)
