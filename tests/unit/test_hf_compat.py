"""transformers compatibility: identical logits as Llama/Qwen3, save -> from_pretrained, generation script."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may reach a hub

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from koen_sllm.config import repo_root  # noqa: E402
from koen_sllm.model import KoEnLM, model_config_from_preset  # noqa: E402
from koen_sllm.hf import mapping as HF

VOCAB = 300
ARCHS = {
    "llama": dict(),  # untied, no QK-norm
    "qwen3": dict(qk_norm=True, tie_embeddings=True, rope_theta=1e6, head_dim=32),
}


def build(arch: str, vocab: int = VOCAB, seed: int = 0) -> KoEnLM:
    torch.manual_seed(seed)
    model = KoEnLM(model_config_from_preset("tiny", vocab, 64, **ARCHS[arch])).eval()
    with torch.no_grad():  # norms at exactly one would hide a mapping mistake in them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_model_dir(model: KoEnLM, path: Path, bos=2, eos=3, pad=0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(HF.hf_config(model, bos, eos, pad), indent=2))
    save_file(HF.hf_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def ids(t=40, vocab=VOCAB, seed=1):
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_logits_as_transformers_in_memory(arch):
    model = build(arch)
    hf_cfg = transformers.AutoConfig.for_model(**HF.hf_config(model, 2, 3, 0))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    expected_class = "Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    missing, unexpected = hf.load_state_dict(HF.hf_state_dict(model), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if arch == "qwen3" else set())
    if arch == "qwen3":
        hf.tie_weights()
    x = ids()
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_directory_loads_with_from_pretrained(arch, tmp_path):
    model = build(arch)
    path = save_model_dir(model, tmp_path / arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    assert hf.config.vocab_size == VOCAB and hf.config.tie_word_embeddings == (arch == "qwen3")
    assert hf.dtype == torch.float32
    x = ids(seed=2)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # and the loss agrees too (transformers shifts the labels itself)
    with torch.no_grad():
        hf_loss = hf(x, labels=x).loss
        our_loss = model(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_round_trip(arch):
    src = build(arch, seed=0)
    dst = build(arch, seed=1)
    x = ids(seed=3)
    with torch.no_grad():
        assert (src(x) - dst(x)).abs().max() > 1e-3  # different weights before loading
    HF.load_hf_state_dict(dst, HF.hf_state_dict(src))
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    if arch == "qwen3":
        assert dst.lm_head.weight is dst.embed_tokens.weight  # still tied after loading


def test_loads_a_state_dict_written_by_transformers():
    """transformers' own state_dict carries lm_head.weight even when tied."""
    model = build("qwen3")
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**HF.hf_config(model, 2, 3, 0))).eval()
    hf.load_state_dict(HF.hf_state_dict(model), strict=False)
    hf.tie_weights()
    fresh = build("qwen3", seed=9)
    HF.load_hf_state_dict(fresh, hf.state_dict())
    x = ids(seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_mismatched_state_dicts_are_named():
    model = build("llama")
    sd = HF.hf_state_dict(model)
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        HF.load_hf_state_dict(model, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        HF.load_hf_state_dict(model, {**sd, "extra.weight": torch.zeros(1)})
    other = KoEnLM(model_config_from_preset("tiny", VOCAB + 8, 64))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight|embed_tokens.weight: shape \(308, 64\)"):
        HF.load_hf_state_dict(model, HF.hf_state_dict(other))


def test_hf_state_dict_is_ready_for_safetensors(tmp_path):
    sd = HF.hf_state_dict(build("qwen3"))
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    assert "model.layers.0.self_attn.q_norm.weight" in sd
    assert all(t.is_contiguous() and not t.requires_grad for t in sd.values())
    assert not any(k.startswith("model.rope") for k in sd)  # derived buffers are not weights
    save_file(sd, str(tmp_path / "w.safetensors"))  # raises on shared or non-contiguous tensors


# ---------------------------------------------------------------- scripts/generate.py


def load_generate_script():
    path = repo_root() / "scripts" / "generate.py"
    spec = importlib.util.spec_from_file_location("koen_generate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tokenizer(path: Path):
    """The project's own tokenizer (what every checkpoint carries), trained here on a few
    sentences, exported with save_pretrained and read back through transformers."""
    from koen_sllm.tokenizer import train_tokenizer_on_texts

    sentences = ["안녕하세요 반갑습니다.", "오늘 날씨가 좋네요.", "대한민국의 수도는 서울입니다.",
                 "The quick brown fox jumps over the lazy dog.", "Hello world, this is a test.",
                 "Language models predict the next token."] * 5
    ours = train_tokenizer_on_texts(lambda: iter(sentences), path.parent / (path.name + "_spm"), 400,
                                    log=lambda *_: None)
    ours.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = build_tokenizer(root / "model")
    vocab = (len(tok) // 64 + 1) * 64  # padded past the tokenizer's pieces, as the trainer does
    model = build("llama", vocab=vocab)
    save_model_dir(model, root / "model", bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    return root / "model", model, tok


def test_generate_greedy_matches_our_model(model_dir, capsys):
    path, model, tok = model_dir
    gen = load_generate_script()
    hf, tokenizer, device = gen.load(path, path, "cpu")
    text, new_ids = gen.generate(hf, tokenizer, "안녕하세요", max_new_tokens=6, temperature=0, device=device)
    # The same greedy continuation, computed with our own forward pass.
    x = tokenizer("안녕하세요", return_tensors="pt")["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(x)[0, -1].argmax())
            expected.append(nxt)
            if nxt == tok.eos_token_id:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    assert new_ids == expected
    assert isinstance(text, str)

    assert gen.main(["--model-path", str(path), "--prompt", "안녕하세요", "--prompt", "Hello",
                     "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "안녕하세요" in out and "Hello" in out


def test_generate_sampling_is_seeded(model_dir):
    path, _, _ = model_dir
    gen = load_generate_script()
    hf, tokenizer, device = gen.load(path, path, "cpu")
    runs = [gen.generate(hf, tokenizer, "Hello", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=s)[1]
            for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) > 1


def test_generate_errors_name_the_missing_piece(model_dir, tmp_path, capsys):
    path, _, _ = model_dir
    gen = load_generate_script()

    def error_of(*argv):
        assert gen.main(["--max-new-tokens", "2", "--device", "cpu", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "does not exist" in error_of("--model-path", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "config.json is missing" in error_of("--model-path", str(tmp_path / "empty"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((path / "config.json").read_text())
    assert "model.safetensors is missing" in error_of("--model-path", str(no_weights))
    (no_weights / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "pickle" in error_of("--model-path", str(no_weights))

    # weights without tokenizer files: refused, unless --tokenizer-path points at them
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((path / name).read_bytes())
    msg = error_of("--model-path", str(bare))
    assert "no tokenizer files" in msg and "--tokenizer-path" in msg
    assert gen.main(["--model-path", str(bare), "--tokenizer-path", str(path), "--prompt", "Hi",
                     "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "--- sample 1" in capsys.readouterr().out
    assert "--top-p" in error_of("--model-path", str(path), "--top-p", "0")


def test_generate_accepts_a_file_or_a_latest_pointer(model_dir, tmp_path):
    path, _, _ = model_dir
    gen = load_generate_script()
    assert gen.resolve_model_dir(path / "model.safetensors") == path
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "latest").write_text(str(path))  # an absolute name works as well as a sibling's name
    assert gen.resolve_model_dir(root) == path
