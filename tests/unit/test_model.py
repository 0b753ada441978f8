"""The model on CPU: loss at init, learning, presets, FLOPs, causality, init, checkpointing."""
from __future__ import annotations

import math

import pytest
import torch

from koen_sllm.config import ConfigError
from koen_sllm.model import PRESETS, KoEnLM, model_config_from_preset
from koen_sllm.hf import mapping as HF

VOCAB = 300


def tiny(seed: int = 0, **overrides) -> KoEnLM:
    torch.manual_seed(seed)
    return KoEnLM(model_config_from_preset("tiny", VOCAB, 64, **overrides))


def formula_params(vocab, hidden, layers, heads, kv_heads, head_dim, ffn, tied, qk_norm) -> int:
    """Parameter count written out by hand, independent of the module code."""
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + (2 * head_dim if qk_norm else 0)
    mlp = 3 * hidden * ffn
    per_layer = attn + mlp + 2 * hidden  # two RMSNorms
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden  # + final norm


def meta_model(name: str, vocab: int = 32000, seq: int = 2048) -> KoEnLM:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return KoEnLM(model_config_from_preset(name, vocab, seq))


# ---------------------------------------------------------------- loss and learning


def test_loss_at_init_is_close_to_uniform():
    model = tiny()
    x = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    loss = model(x[:, :-1], x[:, 1:])
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - math.log(VOCAB)) < 0.3


def test_forward_with_targets_returns_loss_without_targets_logits():
    model = tiny()
    x = torch.randint(0, VOCAB, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, VOCAB)
    loss = model(x, x)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), x.view(-1))
    torch.testing.assert_close(loss, expected)


def test_ignored_targets_do_not_count():
    model = tiny()
    x = torch.randint(0, VOCAB, (1, 16))
    y = x.clone()
    y[0, 8:] = -100
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[0, :8], x[0, :8])
    torch.testing.assert_close(model(x, y), expected)


def test_tiny_model_overfits_one_batch():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(2))
    first = loss = None
    for _ in range(300):
        loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        if loss.item() < 0.5:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 5.0
    assert loss.item() < 0.5


def test_sequence_longer_than_max_seq_len_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------- presets, counts, FLOPs


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_the_formula(name):
    model = meta_model(name)
    c = model.cfg
    expected = formula_params(32000, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
                              c.intermediate_size, c.tie_embeddings, c.qk_norm)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - 32000 * c.hidden_size


def test_preset_shapes_and_known_totals():
    counts = {name: meta_model(name).num_params() for name in PRESETS}
    assert counts == {
        "tiny": 4_194_624,
        "125m": 124_668_672,
        "350m": 336_118_784,
        "0.6b": 473_235_456,
        "1.3b": 1_263_634_432,
        "8b": 7_241_732_096,
    }
    assert abs(counts["350m"] - 336e6) / 336e6 < 0.01
    c = model_config_from_preset("350m", 32000, 2048)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size) == (1024, 24, 16, 4, 2816)
    q = model_config_from_preset("0.6b", 32000, 2048)
    assert (q.hidden_size, q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim, q.intermediate_size) == \
        (1024, 28, 16, 8, 128, 3072)
    assert q.qk_norm and q.tie_embeddings and q.rope_theta == 1e6
    e = model_config_from_preset("8b", 32000, 8192)  # Llama-3-8B's body
    assert (e.hidden_size, e.num_layers, e.num_heads, e.num_kv_heads, e.intermediate_size, e.rope_theta) == \
        (4096, 32, 32, 8, 14336, 500000.0)


def test_init_parameter_one_at_a_time_equals_reset_parameters():
    """What a caller that initialises partitioned parameters one by one relies on."""
    cfg = model_config_from_preset("tiny", 256, 32)
    torch.manual_seed(3)
    whole = KoEnLM(cfg)
    torch.manual_seed(3)
    bare = KoEnLM(cfg, init_weights=False)  # the layers' constructors draw the same numbers
    assert not torch.equal(bare.layers[0].mlp.up_proj.weight, whole.layers[0].mlp.up_proj.weight)
    for name, p in bare.named_parameters():
        bare.init_parameter(name, p)
    for (name, a), b in zip(whole.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(a, b), name


def test_flops_per_token_of_the_336m_shape():
    model = meta_model("350m")
    params = model.num_params()
    embedding = 32000 * 1024
    assert model.flops_per_token(2048) == 6 * (params - embedding) + 12 * 24 * 1024 * 2048
    assert model.flops_per_token(2048) == 2_424_084_480


def test_flops_count_a_tied_head():
    model = meta_model("0.6b")  # tied: the head's matmul still runs
    body = model.num_params() - 32000 * 1024
    assert model.flops_per_token(2048) == 6 * (body + 32000 * 1024) + 12 * 28 * (16 * 128) * 2048


def test_bad_preset_and_options_are_named():
    with pytest.raises(ConfigError, match="--model-size 'huge'"):
        model_config_from_preset("huge", 32000, 2048)
    with pytest.raises(ConfigError, match="hidden_sise"):
        model_config_from_preset("tiny", 32000, 2048, hidden_sise=8)
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        model_config_from_preset("tiny", 32000, 2048, num_kv_heads=3)
    with pytest.raises(ConfigError, match="--attn 'fast'"):
        model_config_from_preset("tiny", 32000, 2048, attn_backend="fast")


def test_vocab_size_is_kept_as_given():
    model = KoEnLM(model_config_from_preset("tiny", 321, 32))
    assert model.embed_tokens.weight.shape == (321, 64)
    assert HF.hf_config(model, 2, 3, 0)["vocab_size"] == 321


# ---------------------------------------------------------------- causality and init


def test_future_tokens_do_not_change_earlier_logits():
    model = tiny().eval()
    x = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[0, 12] = (x[0, 12] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the change is visible from its position on


def test_init_is_deterministic_and_scaled():
    a, b, c = tiny(seed=5), tiny(seed=5), tiny(seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)
    layers = a.cfg.num_layers
    big = KoEnLM(model_config_from_preset("tiny", VOCAB, 64, hidden_size=256, intermediate_size=512))
    o = big.layers[0].self_attn.o_proj.weight
    q = big.layers[0].self_attn.qkv_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002
    assert abs(o.std().item() - 0.02 / math.sqrt(2 * layers)) < 0.001
    assert torch.equal(a.layers[1].input_layernorm.weight, torch.ones(64))


def test_tied_embeddings_share_one_tensor():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_params() == formula_params(VOCAB, 64, 2, 4, 2, 16, 192, True, False)


def test_activation_checkpointing_gives_identical_gradients():
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))

    def grads(checkpointing: bool):
        model = tiny(seed=7, qk_norm=True)
        model.set_activation_checkpointing(checkpointing)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    assert torch.equal(loss_plain, loss_ckpt)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(plain[name], ckpt[name], rtol=0, atol=0, msg=name)


def test_bf16_residual_stream_under_autocast():
    """residual_dtype='bfloat16': every layer receives and returns a bf16 stream (fp32 by default,
    as transformers), the parameters stay fp32, and the loss stays close to the fp32 stream's."""
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(6))

    def run(**overrides):
        model = tiny(seed=2, **overrides)
        seen = []
        for layer in model.layers:
            layer.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())
        return loss.detach(), seen

    loss32, seen32 = run()
    loss16, seen16 = run(residual_dtype="bfloat16")
    assert set(seen32) == {(torch.float32, torch.float32)}
    assert set(seen16) == {(torch.bfloat16, torch.bfloat16)}
    assert loss16.dtype == torch.float32 and abs(loss16 - loss32) < 0.05
    with pytest.raises(ConfigError, match="residual_dtype"):
        tiny(residual_dtype="int8")


def test_config_round_trips_through_hf_config():
    for overrides in ({}, {"qk_norm": True, "tie_embeddings": True, "rope_theta": 1e6, "head_dim": 32}):
        model = tiny(**overrides)
        assert HF.config_from_hf(HF.hf_config(model, 2, 3, 0)) == model.cfg


def test_unsupported_hf_configs_are_refused():
    d = HF.hf_config(tiny(), 2, 3, 0)
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        HF.config_from_hf({**d, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="rope type 'linear'"):
        HF.config_from_hf({**d, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="attention_bias"):
        HF.config_from_hf({**d, "attention_bias": True})
