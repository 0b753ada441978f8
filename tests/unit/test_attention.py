"""Attention kernels on CPU: correctness against a written-out reference, GQA, backend errors, compile."""
from __future__ import annotations

import math

import pytest
import torch

from koen_sllm import attention as A
from koen_sllm.attention import AttentionBackendError, causal_attention, check_backend, probe_backend, repeat_kv
from koen_sllm.model import KoEnLM, model_config_from_preset


def reference_attention(q, k, v):
    """Plain softmax(QK^T / sqrt(D) + causal mask) V in float64, heads already matched."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def qkv(heads=4, kv_heads=2, t=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, t, heads, d, generator=g), torch.randn(2, t, kv_heads, d, generator=g),
            torch.randn(2, t, kv_heads, d, generator=g))


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_matches_reference_with_full_heads(backend):
    q, k, v = qkv(heads=4, kv_heads=4)
    out = causal_attention(q, k, v, backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_gqa_equals_explicit_kv_repetition(backend):
    q, k, v = qkv(heads=6, kv_heads=2)
    grouped = causal_attention(q, k, v, backend)
    # Head h of the query uses K/V head h // 3: repeat each K/V head 3 times, in place.
    k_full, v_full = k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2)
    full = causal_attention(q, k_full, v_full, backend)
    torch.testing.assert_close(grouped, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped.double(), reference_attention(q, k_full, v_full), rtol=1e-5, atol=1e-5)
    # and not some other pairing of query and K/V heads
    wrong = causal_attention(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1), backend)
    assert (grouped - wrong).abs().max() > 1e-2


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)  # [B, Hkv, T, D]
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))


def test_gqa_without_enable_gqa_flag(monkeypatch):
    """Older torch (no enable_gqa) takes the repeat path; it must give the same result."""
    q, k, v = qkv(heads=4, kv_heads=1)
    native = causal_attention(q, k, v, "math")
    monkeypatch.setattr(A, "_HAS_ENABLE_GQA", False)
    torch.testing.assert_close(causal_attention(q, k, v, "math"), native, rtol=1e-6, atol=1e-6)


def test_attention_gradients_flow():
    q, k, v = (t.requires_grad_() for t in qkv())
    causal_attention(q, k, v, "math").square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


# ---------------------------------------------------------------- availability


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error messages")
@pytest.mark.parametrize("backend,needle", [
    ("cudnn", "--attn cudnn needs a CUDA GPU with cuDNN attention (torch "),
    ("flash", "--attn flash needs a CUDA GPU"),
    ("efficient", "--attn efficient needs a CUDA GPU"),
])
def test_cuda_backends_on_cpu_raise_a_clear_error(backend, needle):
    with pytest.raises(AttentionBackendError) as info:
        KoEnLM(model_config_from_preset("tiny", 300, 32, attn_backend=backend))
    msg = str(info.value)
    assert needle in msg and "device cpu" in msg and "--attn auto" in msg
    assert "\n" not in msg


def test_flash_attn_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(A, "flash_attn_installed", lambda: False)
    with pytest.raises(AttentionBackendError, match=r'--attn flash-attn needs the flash-attn package: '
                                                    r'pip install -e "\.\[flash\]"'):
        check_backend("flash-attn")


def test_flash_attn_that_does_not_import_says_so(monkeypatch):
    monkeypatch.setattr(A, "flash_attn_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")

    def broken():
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(A, "_load_flash_attn", broken)
    with pytest.raises(AttentionBackendError, match="installed but does not import .undefined symbol.*FakeGPU"):
        check_backend("flash-attn")


def test_unknown_backend_is_refused():
    with pytest.raises(AttentionBackendError, match="--attn 'sdpa' is unknown"):
        check_backend("sdpa")


def test_math_and_auto_work_on_cpu_and_agree():
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    outs = {}
    for backend in ("auto", "math"):
        torch.manual_seed(0)
        model = KoEnLM(model_config_from_preset("tiny", 300, 32, attn_backend=backend)).eval()
        model.check_attention("cpu", torch.float32)
        with torch.no_grad():
            outs[backend] = model(x)
    torch.testing.assert_close(outs["auto"], outs["math"], rtol=1e-5, atol=1e-5)


def test_probe_turns_a_kernel_failure_into_one_clear_line(monkeypatch):
    # The memory-efficient kernel does not exist on CPU, so SDPA really fails here;
    # skip the static check to reach the probe.
    monkeypatch.setattr(A, "check_backend", lambda name: None)
    with pytest.raises(AttentionBackendError) as info:
        probe_backend("efficient", "cpu", torch.float32, num_heads=4, num_kv_heads=2, head_dim=16)
    msg = str(info.value)
    assert msg.startswith("--attn efficient cannot run 4/2 heads of dim 16 in float32 on cpu")
    assert msg.endswith("use --attn auto")


def test_probe_refuses_fp32_for_flash_attn(monkeypatch):
    monkeypatch.setattr(A, "check_backend", lambda name: None)
    with pytest.raises(AttentionBackendError, match="flash-attn needs bf16 or fp16"):
        probe_backend("flash-attn", "cpu", torch.float32, 4, 2, 16)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_model_traces_without_graph_breaks(backend):
    """fullgraph=True fails on any graph break; the eager backend keeps it compiler-free on CPU."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset("tiny", 300, 32, attn_backend=backend, qk_norm=True))
    model.set_activation_checkpointing(backend == "math")
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss = compiled(x, x)
    loss.backward()
    torch.testing.assert_close(loss, model(x, x))
    assert model.embed_tokens.weight.grad is not None


# ---------------------------------------------------------------- grouped K/V: native or expanded


@pytest.mark.parametrize("cudnn_gqa,has_flag,backend,is_cuda,dtype,expected", [
    (True, True, "flash", True, torch.bfloat16, True),
    (True, True, "math", False, torch.float32, True),
    (True, True, "math", True, torch.float32, True),
    (True, True, "auto", False, torch.float32, True),
    (True, True, "auto", False, torch.bfloat16, True),
    (True, True, "auto", False, torch.float16, True),
    (True, True, "cudnn", True, torch.bfloat16, True),
    (True, True, "auto", True, torch.bfloat16, True),
    (True, True, "auto", True, torch.float16, True),
    (True, True, "auto", True, torch.float32, False),
    (True, True, "efficient", True, torch.bfloat16, False),
    (True, True, "efficient", True, torch.float32, False),
    (False, True, "cudnn", True, torch.bfloat16, False),
    (False, True, "auto", True, torch.bfloat16, False),
    (False, True, "auto", True, torch.float16, False),
    (False, True, "auto", False, torch.float32, True),
    (False, True, "flash", True, torch.bfloat16, True),
    (False, True, "math", True, torch.float32, True),
    (True, False, "flash", True, torch.bfloat16, False),
    (True, False, "math", False, torch.float32, False),
    (True, False, "auto", False, torch.float32, False),
    (True, False, "cudnn", True, torch.bfloat16, False),
    (True, False, "auto", True, torch.bfloat16, False),
])
def test_native_gqa_truth_table(monkeypatch, cudnn_gqa, has_flag, backend, is_cuda, dtype, expected):
    monkeypatch.setattr(A, "_HAS_ENABLE_GQA", has_flag)
    assert A.native_gqa(backend, is_cuda, dtype, cudnn_gqa) is expected


def test_expanded_and_native_kv_give_the_same_attention(monkeypatch):
    """Both paths of causal_attention (enable_gqa and repeat_kv) run, and agree, for 8/2 heads."""
    q, k, v = qkv(heads=8, kv_heads=2, t=12, d=16, seed=3)
    expanded_calls = []

    def spy_repeat_kv(x, n_rep):
        expanded_calls.append((tuple(x.shape), n_rep))
        return repeat_kv(x, n_rep)

    monkeypatch.setattr(A, "repeat_kv", spy_repeat_kv)
    monkeypatch.setattr(A, "_HAS_ENABLE_GQA", True)
    monkeypatch.setattr(A, "native_gqa", lambda backend, is_cuda, dtype, grouped: True)
    native = causal_attention(q, k, v, "math")
    assert expanded_calls == []  # enable_gqa: K/V passed with 2 heads

    monkeypatch.setattr(A, "native_gqa", lambda backend, is_cuda, dtype, grouped: False)
    expanded = causal_attention(q, k, v, "math")
    assert expanded_calls == [((2, 2, 12, 16), 4), ((2, 2, 12, 16), 4)]  # K and V, each to 8 heads

    assert native.shape == expanded.shape == (2, 12, 8, 16)
    assert torch.allclose(native, expanded, rtol=1e-6, atol=1e-6)
    k_full, v_full = k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2)
    torch.testing.assert_close(expanded.double(), reference_attention(q, k_full, v_full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capability, torch_ok, expected", [
    ((9, 0), True, True),     # Hopper (H100, H200): measured, grouped K/V go straight in
    ((10, 0), True, False),   # B200: cuDNN has given wrong results with few K/V heads
    ((8, 0), True, False),    # A100: not measured, expanded
    ((12, 0), True, False),
    ((9, 0), False, False),   # torch before 2.8: cuDNN refuses grouped K/V
])
def test_cudnn_takes_grouped_kv_on_hopper_only(monkeypatch, capability, torch_ok, expected):
    monkeypatch.setattr(A, "_CUDNN_GQA_TORCH", torch_ok)
    assert A.cudnn_takes_grouped_kv(capability) is expected


def test_cudnn_grouped_kv_is_decided_for_the_device_the_model_runs_on():
    """Unset, the model's choice is settled by its attention check: never on CPU; an explicit
    choice (--cudnn-grouped-kv on/off) is left as it is."""
    from koen_sllm.model import KoEnLM, model_config_from_preset

    model = KoEnLM(model_config_from_preset("tiny", 300, 32))
    assert model.cfg.cudnn_grouped_kv is None
    model.check_attention("cpu", torch.float32)
    assert model.cfg.cudnn_grouped_kv is False
    assert model.layers[0].self_attn.cfg is model.cfg  # every layer reads the settled value
    forced = KoEnLM(model_config_from_preset("tiny", 300, 32, cudnn_grouped_kv=True))
    forced.check_attention("cpu", torch.float32)
    assert forced.cfg.cudnn_grouped_kv is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: cuDNN attention")
def test_cudnn_grouped_kv_matches_expanded_kv_on_this_gpu(monkeypatch):
    """On the GPU where cuDNN is handed grouped K/V (Hopper), its output and gradients equal the
    expanded path's at the 350m preset's heads (16 / 4, dim 64, 2048 tokens) in bf16."""
    if not A.cudnn_takes_grouped_kv(torch.cuda.get_device_capability()):
        pytest.skip("cuDNN gets expanded K/V on this GPU; nothing to compare")
    A.probe_backend("cudnn", "cuda", torch.bfloat16, 16, 4, 64, cudnn_grouped=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((2, 2048, 16, 64), (2, 2048, 4, 64), (2, 2048, 4, 64))
    base = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    grad_out = torch.randn((2, 2048, 16, 64), device="cuda", generator=gen).to(torch.bfloat16)
    results = []
    for grouped in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = causal_attention(q, k, v, "cudnn", grouped)
        out.backward(grad_out)
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"{name}: relative difference {rel:.2e}"


def test_a_backend_error_keeps_its_reason_apart_from_the_backend_to_use_instead():
    import pickle

    with pytest.raises(AttentionBackendError) as err:
        check_backend("cudnn-fast")
    assert (err.value.reason, err.value.instead) == ("--attn 'cudnn-fast' is unknown",
                                                     f"choose one of {', '.join(A.ATTN_BACKENDS)}")
    assert str(err.value) == f"{err.value.reason}; {err.value.instead}"
    copy = pickle.loads(pickle.dumps(err.value))  # a message alone rebuilds it
    assert str(copy) == str(err.value) and copy.exit_code == 2
