"""--fp8-impl native: the tensorwise FP8 linear over torch._scaled_mm (kernels/fp8_linear.py).

On CPU ``torch._scaled_mm`` runs for real, so these check the very operations the GPU runs:
the numbers against torchao's tensorwise Float8Linear bit for bit (when torchao is installed),
against the dequantized product and the bf16 linear otherwise, what the backward keeps, and that
compiled, its backward no longer looks for the inputs' amax.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from fp8_support import needs_torchao
from koen_sllm.kernels import fp8_linear as N


class MLP(nn.Module):
    """The model's MLP shape: a norm feeding two projections, their product feeding a third."""

    def __init__(self, d: int = 64, f: int = 128):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def native(mlp: MLP) -> MLP:
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, N.Fp8Linear.from_linear(getattr(mlp, name)))
    return mlp


def run(module, x, grad, autocast=True):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    y.backward(grad)
    return y, x.grad


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_torchao
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_the_numbers_are_torchaos_tensorwise_bit_for_bit(compiled, weight_dtype):
    import torchao.float8 as float8

    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False).to(weight_dtype)
    theirs = nn.Sequential(copy.deepcopy(lin))
    float8.convert_to_float8_training(theirs, config=float8.Float8LinearConfig.from_recipe_name("tensorwise"))
    ours = N.Fp8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(2, 48, 64).to(torch.bfloat16)  # bf16 as the model's activations are under autocast
    grad = torch.randn(2, 48, 96).to(torch.bfloat16)
    y_theirs, dx_theirs = run(torch.compile(theirs) if compiled else theirs, x, grad)
    y_ours, dx_ours = run(torch.compile(ours) if compiled else ours, x, grad)
    assert type(theirs[0]).__name__ == "Float8Linear"
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    assert torch.equal(y_ours, y_theirs)
    assert torch.equal(dx_ours, dx_theirs)
    assert ours.weight.grad.dtype == weight_dtype
    assert torch.equal(ours.weight.grad, theirs[0].weight.grad)


def test_the_output_is_the_product_of_the_scaled_fp8_tensors():
    torch.manual_seed(0)
    lin = N.Fp8Linear.from_linear(nn.Linear(64, 96, bias=False).to(torch.bfloat16))
    x = torch.randn(3, 32, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
        x2d, w = x.reshape(-1, 64), lin.weight
        x_scale, w_scale = N.tensor_scale(x2d, N.E4M3), N.tensor_scale(w, N.E4M3)
        assert x_scale.dtype == torch.float32 and x_scale.item() == pytest.approx(448 / x2d.abs().max().item())
        dequantized = (N.to_fp8(x2d, x_scale, N.E4M3).float() / x_scale) @ (N.to_fp8(w, w_scale, N.E4M3).float()
                                                                             / w_scale).t()
        torch.testing.assert_close(y.reshape(-1, 96).float(), dequantized, rtol=1e-2, atol=1e-2)
        assert 0 < rel_err(y, F.linear(x, w)) < 0.05  # really FP8, and close to the bf16 product


def test_gradients_are_close_to_the_bf16_linear():
    torch.manual_seed(0)
    plain = nn.Linear(64, 96, bias=False).to(torch.bfloat16)
    ours = N.Fp8Linear.from_linear(copy.deepcopy(plain))
    x, grad = torch.randn(4, 16, 64).to(torch.bfloat16), torch.randn(4, 16, 96).to(torch.bfloat16)
    y_ref, dx_ref = run(plain, x, grad)
    y, dx = run(ours, x, grad)
    assert y.shape == y_ref.shape and dx.shape == dx_ref.shape and ours.weight.grad.shape == plain.weight.shape
    assert 0 < rel_err(dx, dx_ref) < 0.15  # e5m2 gradients: two mantissa bits
    assert 0 < rel_err(ours.weight.grad, plain.weight.grad) < 0.15


def test_the_backward_keeps_the_fp8_tensors_and_scales_not_the_bf16_input():
    saved = []

    def pack(t):
        saved.append((str(t.dtype), tuple(t.shape)))
        return t

    lin = N.Fp8Linear.from_linear(nn.Linear(64, 96, bias=False).to(torch.bfloat16))
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    fp8, scale = str(N.E4M3), str(torch.float32)
    assert sorted(saved) == sorted([(fp8, (32, 64)), (scale, ()), (fp8, (96, 64)), (scale, ())])
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16


def amax_counts(module: nn.Module, step) -> dict:
    """How many whole-tensor max reductions the compiled forward and backward run, partitioned as
    Inductor partitions them; ``step(compiled_module)`` runs one forward and backward."""
    counts = {}

    def compiler(which):
        def count(gm, _):
            counts[which] = sum(node.target is torch.ops.aten.max.default for node in gm.graph.nodes)
            return gm
        return count

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    step(torch.compile(module, backend=backend, fullgraph=True))
    assert set(counts) == {"forward", "backward"}  # one graph each: nothing fell out of the compile
    return counts


def backward_amax_count(mlp: MLP) -> int:
    return amax_counts(mlp, lambda compiled: run(compiled, torch.randn(2, 32, 64).to(torch.bfloat16),
                                                 torch.randn(2, 32, 64).to(torch.bfloat16)))["backward"]


def test_the_compiled_backward_looks_for_the_gradients_amax_only():
    torch.manual_seed(0)
    # three output gradients; the inputs' scales (norm output, gate*up) come from the forward
    assert backward_amax_count(native(MLP().to(torch.bfloat16))) == 3


@needs_torchao
def test_torchao_looks_for_the_inputs_amax_again():
    """The reason for the native linear: the same MLP through torchao finds the two inputs' amax anew."""
    import torchao.float8 as float8

    mlp = MLP().to(torch.bfloat16)
    float8.convert_to_float8_training(mlp, config=float8.Float8LinearConfig.from_recipe_name("tensorwise"))
    assert backward_amax_count(mlp) == 5


def model_amax_counts(impl: str) -> dict:
    from koen_sllm import fp8
    from koen_sllm.model import KoEnLM, model_config_from_preset

    torch.manual_seed(0)
    model = KoEnLM(model_config_from_preset("tiny", 320, 32)).to(torch.bfloat16)
    assert len(fp8.convert_to_fp8(model, "tensorwise", emulate=True, impl=impl)) == 5 * len(model.layers)
    tokens = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(0))

    def step(compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    return amax_counts(model, step) | {"layers": len(model.layers)}


def test_the_model_backward_reduces_only_the_five_output_gradients_per_layer():
    counts = model_amax_counts("native")
    assert counts["backward"] == 5 * counts["layers"]  # qkv, o, gate, up, down: their output gradients
    # forward: the five weights and four inputs (gate and up share theirs)
    assert counts["forward"] == 9 * counts["layers"]


@needs_torchao
def test_the_model_backward_through_torchao_reduces_more():
    """torchao on the same model (emulated: the same graph, the products in higher precision)."""
    ours, theirs = model_amax_counts("native"), model_amax_counts("torchao")
    assert theirs["backward"] + theirs["forward"] > ours["backward"] + ours["forward"]
    assert theirs["backward"] > ours["backward"]


def test_compiled_matches_eager():
    torch.manual_seed(0)
    eager = native(MLP().to(torch.bfloat16))
    compiled_module = copy.deepcopy(eager)
    x, grad = torch.randn(2, 32, 64).to(torch.bfloat16), torch.randn(2, 32, 64).to(torch.bfloat16)
    y, dx = run(eager, x, grad)
    torch._dynamo.reset()
    y_c, dx_c = run(torch.compile(compiled_module, fullgraph=True), x, grad)
    torch.testing.assert_close(y_c, y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx_c, dx, rtol=5e-2, atol=5e-2)
    for name in ("gate_proj", "up_proj", "down_proj"):
        # The compiled silu's backward rounds once where eager rounds twice; e5m2 (two mantissa bits)
        # then rounds some gradients to the neighbouring value: a few percent, not a wrong product.
        ours, ref = getattr(compiled_module, name).weight.grad, getattr(eager, name).weight.grad
        assert rel_err(ours, ref) < 0.1, name


def test_an_all_zero_input_gives_zeros_not_nan():
    lin = N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False).to(torch.bfloat16))
    y, dx = run(lin, torch.zeros(16, 32, dtype=torch.bfloat16), torch.zeros(16, 48, dtype=torch.bfloat16))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))
    assert torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))


def test_values_beyond_the_format_saturate():
    t = torch.tensor([1.0, -3.0, 1000.0])
    assert N.to_fp8(t, torch.tensor(1.0), N.E4M3).float().tolist() == [1.0, -3.0, 448.0]  # not NaN


def test_from_linear_keeps_the_weight_parameter_and_refuses_a_bias():
    lin = nn.Linear(32, 48, bias=False)
    ours = N.Fp8Linear.from_linear(lin)
    assert ours.weight is lin.weight and ours.bias is None
    assert (ours.in_features, ours.out_features) == (32, 48)
    assert list(ours.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="without a bias"):
        N.Fp8Linear.from_linear(nn.Linear(32, 48))


def test_without_autocast_the_output_keeps_the_input_dtype():
    lin = N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False))
    y, dx = run(lin, torch.randn(16, 32), torch.randn(16, 48), autocast=False)
    assert y.dtype == dx.dtype == lin.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("shape", [(7,), (5, 33), (2, 9, 17)])
def test_the_amax_row_by_row_first_is_the_whole_maximum(monkeypatch, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 40
    t.view(-1)[len(t.view(-1)) // 2] = -8192  # the largest magnitude is a negative value in a middle row
    monkeypatch.setattr(N, "AMAX_ORDER", "rows")
    rows = N.tensor_amax(t), N.tensor_scale(t, N.E4M3)
    monkeypatch.setattr(N, "AMAX_ORDER", "whole")
    whole = N.tensor_amax(t), N.tensor_scale(t, N.E4M3)
    assert rows[0].item() == whole[0].item() == 8192
    assert torch.equal(rows[1], whole[1])


@pytest.mark.parametrize("compiled", [False, True])
def test_either_amax_order_trains_the_mlp_to_the_same_bits(monkeypatch, compiled):
    torch.manual_seed(0)
    base = MLP().to(torch.bfloat16)
    x, grad = torch.randn(2, 16, 64).to(torch.bfloat16), torch.randn(2, 16, 64).to(torch.bfloat16)
    results = {}
    for order in ("whole", "rows"):
        monkeypatch.setattr(N, "AMAX_ORDER", order)
        torch._dynamo.reset()
        mlp = native(copy.deepcopy(base))
        y, gx = run(torch.compile(mlp) if compiled else mlp, x, grad)
        results[order] = [y, gx] + [p.grad for p in mlp.parameters()]
    for a, b in zip(results["whole"], results["rows"]):
        assert torch.equal(a, b)


def delayed_linear(monkeypatch, d_in=32, d_out=48) -> N.Fp8Linear:
    monkeypatch.setattr(N, "SCALING", "delayed")
    torch.manual_seed(0)
    return N.Fp8Linear.from_linear(nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16))


def test_delayed_scaling_keeps_its_histories_out_of_the_state_dict(monkeypatch):
    lin = delayed_linear(monkeypatch)
    assert list(lin.state_dict()) == ["weight"]
    assert lin.x_history.shape == lin.g_history.shape == (N.HISTORY,) and not lin.delayed
    monkeypatch.setattr(N, "SCALING", "dynamic")
    plain = N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False))
    assert plain.x_history is None and plain.g_history is None and list(plain.buffers()) == []
    monkeypatch.setattr(N, "SCALING", "later")
    with pytest.raises(ValueError, match="dynamic or delayed"):
        N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False))


def test_delayed_scaling_starts_dynamic_then_scales_from_the_previous_amax(monkeypatch):
    lin = delayed_linear(monkeypatch)
    monkeypatch.setattr(N, "SCALING", "dynamic")
    ref = N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False).to(torch.bfloat16))
    ref.weight = lin.weight
    gen = torch.Generator().manual_seed(1)
    x1, g1 = torch.randn(16, 32, generator=gen).to(torch.bfloat16), torch.randn(16, 48, generator=gen).to(torch.bfloat16)
    y, dx = run(lin, x1, g1)
    y_ref, dx_ref = run(ref, x1, g1)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)  # the first step is the dynamic recipe
    assert lin.delayed
    assert lin.x_history[0].item() == x1.abs().max().item() and lin.g_history[0].item() == g1.abs().max().item()
    assert torch.count_nonzero(lin.x_history).item() == torch.count_nonzero(lin.g_history).item() == 1
    # The second step: a smaller input and gradient take the first step's (larger) scales' divisors.
    x2, g2 = x1 / 4, g1 / 4
    y2, _ = run(lin, x2, g2)
    x_scale = N.amax_scale(x1.abs().max().float(), N.E4M3)
    expected = N.scaled_mm(N.to_fp8(x2, x_scale, N.E4M3), x_scale,
                           N.to_fp8(lin.weight, N.tensor_scale(lin.weight, N.E4M3), N.E4M3).t(),
                           N.tensor_scale(lin.weight, N.E4M3), torch.bfloat16, fast_accum=True)
    assert torch.equal(y2, expected)
    assert lin.x_history[:2].tolist() == [x2.abs().max().item(), x1.abs().max().item()]
    assert lin.g_history[:2].tolist() == [g2.abs().max().item(), g1.abs().max().item()]


def test_delayed_scaling_saturates_a_tensor_that_outgrows_its_history(monkeypatch):
    lin = delayed_linear(monkeypatch)
    x, g = torch.randn(16, 32).to(torch.bfloat16), torch.randn(16, 48).to(torch.bfloat16)
    run(lin, x, g)
    y, dx = run(lin, x * 1000, g * 1000)  # far beyond the history's amax: clamped, never inf or NaN
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(lin.weight.grad).all()
    assert lin.x_history[0].item() == (x * 1000).abs().max().item()


def test_the_history_keeps_the_newest_steps(monkeypatch):
    lin = delayed_linear(monkeypatch)
    x, g = torch.ones(16, 32, dtype=torch.bfloat16), torch.ones(16, 48, dtype=torch.bfloat16)
    for step in range(1, N.HISTORY + 3):
        run(lin, x * step, g)
    assert lin.x_history.tolist() == [float(s) for s in range(N.HISTORY + 2, 2, -1)]


def test_delayed_scaling_compiled_matches_eager(monkeypatch):
    monkeypatch.setattr(N, "SCALING", "delayed")
    torch.manual_seed(0)
    eager = native(MLP().to(torch.bfloat16))
    comp = copy.deepcopy(eager)
    compiled = torch.compile(comp, fullgraph=True)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x, grad = torch.randn(2, 32, 64, generator=gen).to(torch.bfloat16), torch.randn(2, 32, 64, generator=gen).to(torch.bfloat16)
        for m in (eager, comp):
            m.zero_grad(set_to_none=True)
        y, dx = run(eager, x * (step + 1), grad)
        y_c, dx_c = run(compiled, x * (step + 1), grad)
        torch.testing.assert_close(y_c, y, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(dx_c, dx, rtol=5e-2, atol=5e-2)
        for name in ("gate_proj", "up_proj", "down_proj"):
            ours, ref = getattr(comp, name), getattr(eager, name)
            assert ours.delayed and ref.delayed
            # the histories the compiled step wrote (forward and backward) are eager's
            torch.testing.assert_close(ours.x_history, ref.x_history, rtol=1e-2, atol=0)
            torch.testing.assert_close(ours.g_history, ref.g_history, rtol=5e-2, atol=0)
            assert rel_err(ours.weight.grad, ref.weight.grad) < 0.1, name


def test_a_forward_without_gradients_does_not_start_delayed_scaling(monkeypatch):
    lin = delayed_linear(monkeypatch)
    x, g = torch.randn(16, 32).to(torch.bfloat16), torch.randn(16, 48).to(torch.bfloat16)
    with torch.no_grad():
        lin(x)  # an evaluation before the first step: no backward fills g_history
    assert not lin.delayed and lin.g_history.max().item() == 0
    monkeypatch.setattr(N, "SCALING", "dynamic")
    ref = N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False))
    ref.weight = lin.weight
    _, dx = run(lin, x, g)  # so the first training step still scales its gradient dynamically
    _, dx_ref = run(ref, x, g)
    assert torch.equal(dx, dx_ref)
    assert lin.delayed and lin.g_history[0].item() == g.abs().max().item()


@pytest.mark.parametrize("grad_fast", [False, True])
def test_fast_accumulation_reaches_the_gradients_matmuls_only_when_asked(monkeypatch, grad_fast):
    calls = []
    real = N.scaled_mm

    def recording(a, a_scale, b, b_scale, out_dtype, fast_accum):
        calls.append(fast_accum)
        return real(a, a_scale, b, b_scale, out_dtype, fast_accum)

    monkeypatch.setattr(N, "scaled_mm", recording)
    monkeypatch.setattr(N, "GRAD_FAST_ACCUM", grad_fast)
    lin = N.Fp8Linear.from_linear(nn.Linear(32, 48, bias=False))
    run(lin, torch.randn(4, 8, 32), torch.randn(4, 8, 48))
    assert calls == [True, grad_fast, grad_fast]  # the output's matmul, then dX and dW


@needs_torchao
def test_the_model_trains_to_torchaos_numbers_compiled():
    """Several compiled training steps of the model, through either implementation, on the CPU.
    (On an H100 the two part at the third step: docs/model.md, "Why it is not the default".)"""
    import torchao.float8 as float8

    from koen_sllm import fp8
    from koen_sllm.model import KoEnLM, model_config_from_preset

    torch.manual_seed(0)
    base = KoEnLM(model_config_from_preset("tiny", 320, 64)).to(torch.bfloat16)
    tokens = torch.randint(0, 320, (4, 65), generator=torch.Generator().manual_seed(0))
    runs = {}
    for impl in ("native", "torchao"):
        model = copy.deepcopy(base)
        if impl == "native":
            fp8.convert_to_fp8(model, "tensorwise", emulate=True, impl="native")
        else:  # torchao's own matmuls (not its emulation), as on the GPU
            float8.convert_to_float8_training(model, config=float8.Float8LinearConfig.from_recipe_name("tensorwise"),
                                              module_filter_fn=fp8.converts)
        torch._dynamo.reset()
        step = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = step(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[impl] = losses, model.state_dict()
    assert runs["native"][0] == runs["torchao"][0]
    assert losses[-1] < losses[0]  # it trains
    for name, value in runs["torchao"][1].items():
        assert torch.equal(runs["native"][1][name], value), name
