"""--attn fa4 on CPU: the custom ops' wiring (shapes, gradients, torch.compile without graph breaks)
against a reference bound where flash-attn-4's kernels would be, and the backend's errors."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from koen_sllm import attention as A
from koen_sllm.attention import AttentionBackendError, causal_attention, check_backend, probe_backend
from koen_sllm.kernels import flash_attn4


def _reference_forward(q, k, v):
    """softmax(QK^T/sqrt(D) + causal mask) V and its log-sum-exp, [B, T, H, D] layout, grouped K/V."""
    rep = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    t = q.shape[1]
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)  # [B, H, T]
    return (scores.softmax(-1) @ vh).transpose(1, 2).to(q.dtype), lse


def _reference_backward(q, k, v, dout):
    """The gradients of _reference_forward written out (a custom op's body runs below autograd):
    dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = s dS K, dK = s dS^T Q, summed over each K/V group."""
    rep, scale, t = q.shape[2] // k.shape[2], 1 / math.sqrt(q.shape[-1]), q.shape[1]
    qh, kh, vh, doh = (x.transpose(1, 2).double() for x in (q, k.repeat_interleave(rep, 2),
                                                             v.repeat_interleave(rep, 2), dout))
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1),
                                                              float("-inf"))
    p = scores.softmax(-1)
    dv = p.transpose(-1, -2) @ doh
    dp = doh @ vh.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq, dk = ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale

    def per_kv_head(g):  # [B, H, T, D] -> [B, T, Hkv, D], each K/V head the sum of its group
        b, h, _, d = g.shape
        return g.reshape(b, h // rep, rep, t, d).sum(2).transpose(1, 2)

    return dq.transpose(1, 2).to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


class ReferenceInterface:
    """Stands in for flash_attn.cute.interface: the same two entry points, computed in torch.
    Returns FA4's tuple shapes (extra outputs included) and records what it was called with."""

    def __init__(self):
        self.calls = []

    def _flash_attn_fwd(self, q, k, v, *, causal, return_lse):
        assert causal and return_lse and all(t.is_contiguous() for t in (q, k, v))
        self.calls.append("fwd")
        out, lse = _reference_forward(q, k, v)
        return out, lse, None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, *, causal, deterministic):
        assert causal and all(t.is_contiguous() for t in (q, k, v, out, dout, lse))
        self.calls.append(("bwd", deterministic))
        return _reference_backward(q, k, v, dout)


@pytest.fixture
def reference(monkeypatch):
    interface = ReferenceInterface()
    monkeypatch.setattr(flash_attn4, "_interface", interface)
    return interface


def _qkv(heads=4, kv_heads=2, t=12, d=8):
    g = torch.Generator().manual_seed(0)
    shapes = ((2, t, heads, d), (2, t, kv_heads, d), (2, t, kv_heads, d))
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def test_forward_and_gradients_match_sdpa_through_the_custom_ops(reference):
    q, k, v = _qkv()
    out = causal_attention(q, k, v, "fa4")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = causal_attention(q, k, v, "math")
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert reference.calls == ["fwd", ("bwd", False)]


def test_non_contiguous_inputs_reach_the_kernels_contiguous(reference):
    q, k, v = _qkv()
    fused = torch.cat([q, k, v], dim=2).detach().requires_grad_()  # views into one [B, T, H+2Hkv, D] tensor
    qv, kv, vv = fused.split([4, 2, 2], dim=2)
    assert not qv.is_contiguous()
    causal_attention(qv, kv, vv, "fa4").sum().backward()  # the reference asserts contiguity
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_the_backward_is_deterministic_when_torch_is_asked_to_be(reference, monkeypatch):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    q, k, v = _qkv()
    causal_attention(q, k, v, "fa4").sum().backward()
    assert reference.calls[-1] == ("bwd", True)


def test_opcheck_shape_functions_and_autograd_agree_with_the_kernels(reference):
    q, k, v = _qkv()
    torch.library.opcheck(flash_attn4.fa4_forward, (q, k, v))
    out, lse = flash_attn4.fa4_forward(q, k, v)
    dout = torch.randn_like(out)
    torch.library.opcheck(flash_attn4.fa4_backward, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                      lse.detach()))


def test_compiles_without_graph_breaks(reference):
    q, k, v = _qkv()

    def layer(q, k, v):
        return causal_attention(q * 2, k, v, "fa4").relu().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want_grads = torch.autograd.grad(layer(q, k, v), (q, k, v))
    torch.testing.assert_close(loss, layer(q, k, v))
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- availability


def _fake_gpu(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error message")
def test_on_cpu_the_error_names_the_gpu_it_needs():
    with pytest.raises(AttentionBackendError) as info:
        check_backend("fa4")
    msg = str(info.value)
    assert "--attn fa4 needs an NVIDIA GPU of compute capability 9.0 or newer" in msg and "device cpu" in msg
    assert "use --attn auto" in msg and "\n" not in msg


def test_an_older_gpu_is_refused_with_its_capability(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0))
    with pytest.raises(AttentionBackendError, match=r"this one has 8\.0 .*FakeGPU.*use --attn auto"):
        check_backend("fa4")


def test_without_the_package_the_error_names_the_install_command(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ModuleNotFoundError
    with pytest.raises(AttentionBackendError,
                       match=r'--attn fa4 needs the flash-attn-4 package: pip install -e "\.\[fa4\]"'):
        check_backend("fa4")


def test_a_package_that_fails_to_import_says_why(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "_interface", None)
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)

    def broken(name):
        raise RuntimeError("None of the installed toolkit flavors (cu13) are compatible with the CUDA driver")

    monkeypatch.setattr(flash_attn4.importlib, "import_module", broken)
    with pytest.raises(AttentionBackendError, match=r"installed but does not import \(RuntimeError: None of the "
                                                    r"installed toolkit flavors.*reinstall it"):
        check_backend("fa4")


def test_flash_attn_2_alone_is_not_taken_for_fa4(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "_interface", None)
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)  # a cute/interface.py that is not FA4's
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", types.ModuleType("flash_attn.cute.interface"))
    with pytest.raises(AttentionBackendError, match="is not flash-attn-4"):
        check_backend("fa4")


def test_fp32_is_refused_before_any_kernel_runs(reference, monkeypatch):
    _fake_gpu(monkeypatch)
    with pytest.raises(AttentionBackendError, match="--attn fa4 needs bf16 or fp16"):
        probe_backend("fa4", "cpu", torch.float32, 4, 2, 16)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_model_traces_whole_with_fa4_and_matches_math(reference, monkeypatch, checkpointing):
    """The model with --attn fa4 (the GPU check skipped: the reference runs on CPU) compiles with
    fullgraph=True, activation checkpointing or not, and gives the loss and gradients of --attn math."""
    from koen_sllm.model import KoEnLM, model_config_from_preset

    monkeypatch.setattr(A, "_check_fa4", lambda load=True: None)
    torch._dynamo.reset()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    models = {}
    for backend in ("fa4", "math"):
        torch.manual_seed(0)
        models[backend] = KoEnLM(model_config_from_preset("tiny", 300, 32, attn_backend=backend, qk_norm=True))
        models[backend].set_activation_checkpointing(checkpointing)
    loss = torch.compile(models["fa4"], backend="aot_eager", fullgraph=True)(x, x)
    loss.backward()
    want = models["math"](x, x)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(models["fa4"].named_parameters(), models["math"].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert "fwd" in reference.calls and ("bwd", False) in reference.calls


# ---------------------------------------------------------------- the start's pre-flight


def _package(root, *, fa4: bool, fa2: bool = False):
    """A site folder holding flash_attn as FA2 (an __init__.py), FA4 (cute/interface.py) or both."""
    pkg = root / "flash_attn"
    pkg.mkdir(parents=True)
    if fa2:
        (pkg / "__init__.py").write_text("raise AssertionError('the presence check must not import flash_attn')\n")
    if fa4:
        (pkg / "cute").mkdir()
        (pkg / "cute" / "interface.py").write_text("raise AssertionError('nor FA4')\n")
    return root


def _first_on_path(monkeypatch, root):
    """``root`` first on the import path, and no flash_attn imported yet."""
    monkeypatch.setattr(sys, "path", [str(root), *sys.path])
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("fa4,fa2", [(True, False), (True, True), (False, True), (False, False)])
def test_installed_looks_for_fa4_without_importing_it(tmp_path, monkeypatch, fa4, fa2):
    _first_on_path(monkeypatch, _package(tmp_path, fa4=fa4, fa2=fa2))
    assert flash_attn4.installed() is fa4
    assert "flash_attn" not in sys.modules


@pytest.mark.parametrize("fa4,fa2", [(True, False), (True, True), (False, True)])
def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(tmp_path, monkeypatch, fa4, fa2):
    _first_on_path(monkeypatch, _package(tmp_path, fa4=fa4, fa2=fa2))
    assert A.flash_attn_installed() is fa2
    assert "flash_attn" not in sys.modules


def test_the_preflight_check_does_not_import_the_package(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)
    monkeypatch.setattr(flash_attn4, "load", lambda: pytest.fail("imported in the pre-flight"))
    check_backend("fa4", load=False)
    monkeypatch.setattr(flash_attn4, "installed", lambda: False)
    with pytest.raises(AttentionBackendError, match=r'needs the flash-attn-4 package: pip install -e "\.\[fa4\]"'):
        check_backend("fa4", load=False)


def test_the_trainer_stops_before_it_starts_with_one_line(tmp_path, capsys, monkeypatch):
    from koen_sllm import cli
    from koen_sllm import distributed as D

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "installed", lambda: False)
    monkeypatch.setattr(D, "init_distributed", lambda *a, **k: pytest.fail("the run must stop before it starts"))
    code = cli.train_main(["--attn", "fa4", "--output-dir", str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"❌ {cli.KO_ATTN} / --attn fa4 needs the flash-attn-4 package: pip install")


@pytest.mark.parametrize("forced", [True, False])
def test_deterministic_backward_overrides_torchs_switch(reference, monkeypatch, forced):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: not forced)
    monkeypatch.setattr(flash_attn4, "deterministic_backward", forced)
    q, k, v = _qkv()
    causal_attention(q, k, v, "fa4").sum().backward()
    assert reference.calls[-1] == ("bwd", forced)


# ---------------------------------------------------------------- what --attn auto runs


CUDA = torch.device("cuda")


@pytest.mark.parametrize("capability,dtype,installed,expected", [
    ((9, 0), torch.bfloat16, True, True),      # Hopper, bf16, FA4 there: measured faster
    ((9, 0), torch.float16, True, True),
    ((9, 0), torch.float32, True, False),      # FA4 runs half precision only
    ((9, 0), torch.bfloat16, False, False),    # not installed
    ((8, 0), torch.bfloat16, True, False),     # A100: FA4's backward needs sm90
    ((10, 0), torch.bfloat16, True, False),    # Blackwell: not measured against cuDNN here
])
def test_auto_takes_fa4_only_on_hopper_in_half_precision_when_installed(monkeypatch, capability, dtype,
                                                                        installed, expected):
    _fake_gpu(monkeypatch, capability)
    monkeypatch.setattr(flash_attn4, "installed", lambda: installed)
    assert A.auto_takes_fa4(CUDA, dtype) is expected


def test_auto_takes_fa4_never_off_the_gpu(monkeypatch):
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)
    assert A.auto_takes_fa4(torch.device("cpu"), torch.bfloat16) is False
    assert A.resolve_auto("cpu", torch.bfloat16, 4, 2, 16) == ("auto", "PyTorch SDPA")


def test_auto_resolves_to_fa4_when_its_probe_passes(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)
    probed = []
    monkeypatch.setattr(A, "probe_backend", lambda name, *args: probed.append((name, *args)))
    kernel, why = A.resolve_auto(CUDA, torch.bfloat16, 16, 4, 64)
    assert (kernel, why) == ("fa4", "FlashAttention-4 (flash-attn-4 on a Hopper GPU)")
    assert probed == [("fa4", CUDA, torch.bfloat16, 16, 4, 64)]


def test_auto_keeps_sdpa_and_says_why_when_fa4_fails_its_probe(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "installed", lambda: True)

    def refuse(name, *args):
        raise AttentionBackendError("--attn fa4: flash-attn-4 is installed but does not import (OSError: libcuda); "
                                    "reinstall it for this torch and driver: pip install -e \".[fa4]\" (torch 2.11)",
                                    "or use --attn auto")

    monkeypatch.setattr(A, "probe_backend", refuse)
    kernel, why = A.resolve_auto(CUDA, torch.bfloat16, 16, 4, 64)
    assert kernel == "auto"
    assert why == ("PyTorch SDPA, cuDNN first (FlashAttention-4 did not run: --attn fa4: flash-attn-4 is installed "
                   "but does not import (OSError: libcuda); reinstall it for this torch and driver: "
                   "pip install -e \".[fa4]\" (torch 2.11))")


def test_auto_on_hopper_without_fa4_names_the_install_command(monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(flash_attn4, "installed", lambda: False)
    kernel, why = A.resolve_auto(CUDA, torch.bfloat16, 16, 4, 64)
    assert kernel == "auto"
    assert why == f"PyTorch SDPA, cuDNN first (FlashAttention-4 is faster on this GPU: {flash_attn4.INSTALL_COMMAND})"


def test_auto_without_fa4_elsewhere_gives_no_hint(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(flash_attn4, "installed", lambda: False)
    assert A.resolve_auto(CUDA, torch.bfloat16, 16, 4, 64) == ("auto", "PyTorch SDPA, cuDNN first")


def test_a_model_on_auto_runs_what_check_attention_chose(reference, monkeypatch):
    """check_attention settles auto's kernel in the config the layers share; the forward then calls it
    (here the FA4 reference), and the probe auto's resolution ran is not repeated."""
    from koen_sllm import model as M

    monkeypatch.setattr(M, "resolve_auto", lambda *a: ("fa4", "FlashAttention-4 (flash-attn-4 on a Hopper GPU)"))
    probed = []
    monkeypatch.setattr(M, "probe_backend", lambda name, *a: probed.append(name))
    torch.manual_seed(0)
    model = M.KoEnLM(M.model_config_from_preset("tiny", 300, 32))
    assert model.cfg.attn_backend == "auto" and model.cfg.attn_kernel is None
    note = model.check_attention("cpu", torch.float32)
    assert note == "auto: FlashAttention-4 (flash-attn-4 on a Hopper GPU)"
    assert model.cfg.attn_kernel == "fa4" and probed == []
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x).backward()
    assert reference.calls.count("fwd") == 2 and reference.calls.count(("bwd", False)) == 2  # one per layer


def test_a_model_on_auto_off_the_gpu_keeps_sdpa(reference):
    from koen_sllm.model import KoEnLM, model_config_from_preset

    model = KoEnLM(model_config_from_preset("tiny", 300, 32))
    assert model.check_attention("cpu", torch.float32) == "auto: PyTorch SDPA"
    assert model.cfg.attn_kernel == "auto"
    x = torch.randint(0, 300, (2, 16))
    model(x, x).backward()
    assert reference.calls == []


def test_a_named_backend_is_what_check_attention_settles():
    from koen_sllm.model import KoEnLM, model_config_from_preset

    model = KoEnLM(model_config_from_preset("tiny", 300, 32, attn_backend="math"))
    assert model.check_attention("cpu", torch.float32) == "math"
    assert model.cfg.attn_kernel == "math"


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0")])
def test_loading_fa4_turns_its_kernel_cache_on_unless_told_otherwise(monkeypatch, preset, expected):
    """FA4 reads its cache switch when imported: load() sets it first, keeping a value already given."""
    monkeypatch.setattr(flash_attn4, "_interface", None)
    monkeypatch.setenv(flash_attn4.CACHE_SWITCH, preset or "")  # recorded, so the test's own setting is undone
    if preset is None:
        monkeypatch.delenv(flash_attn4.CACHE_SWITCH)
    seen = {}
    module = types.ModuleType("flash_attn.cute.interface")
    module._flash_attn_fwd = module._flash_attn_bwd = lambda *a, **k: None

    def import_module(name):
        seen[name] = flash_attn4.os.environ.get(flash_attn4.CACHE_SWITCH)
        return module

    monkeypatch.setattr(flash_attn4.importlib, "import_module", import_module)
    assert flash_attn4.load() is module
    assert seen == {flash_attn4.INTERFACE: expected}
