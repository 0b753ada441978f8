"""Export a checkpoint into a clean model directory that transformers loads offline."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koen_sllm.checkpoint import store as ck
from koen_sllm.hf import export as koen_export
from koen_sllm.hf.export import export_hf
from koen_sllm.checkpoint.store import CheckpointError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "export_hf.py"

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 32, 2, 4, 2, 64, 96


def llama_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def llama_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * (HIDDEN // HEADS)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return {k: torch.randn(*s, generator=g) * 0.1 + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, s in shapes.items()}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"\x0a\x05hello" * 40)
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    root = tmp_path / "outputs"

    def ds_files(tmp: Path) -> None:  # files another backend adds; never part of an export
        (tmp / "global_step4").mkdir()
        (tmp / "global_step4" / "optim_states.pt").write_bytes(b"x" * 64)
        (tmp / "zero_to_fp32.py").write_text("print('engine helper')\n")

    ck.save_checkpoint(root, "checkpoint-4", model_state=llama_weights(), hf_config=llama_config(), tokenizer_dir=tok,
                       training_info={"step": 4}, trainer_state={"step": 4, "m": torch.ones(3)}, extra_writer=ds_files)
    return root


def test_export_bf16_loads_with_transformers_offline(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM

    dst = export_hf(run_dir / "checkpoint-4", tmp_path / "export" / "koen-bf16", "bf16")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model",
                                                     "tokenizer_config.json"]
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if "dtype" not in k} == {
        k: v for k, v in llama_config().items() if "dtype" not in k}
    auto = {"dtype": "auto"} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": "auto"}
    model = AutoModelForCausalLM.from_pretrained(dst, local_files_only=True, **auto)  # dtype from config.json
    assert type(model).__name__ == "LlamaForCausalLM"
    loaded = model.state_dict()
    for name, tensor in llama_weights().items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name
    with torch.no_grad():
        logits = model(torch.tensor([[2, 5, 9, 11]])).logits
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()
    assert (dst / "tokenizer.model").read_bytes() == (run_dir / "checkpoint-4" / "tokenizer.model").read_bytes()
    assert [p.name for p in dst.parent.iterdir()] == ["koen-bf16"]  # no temporary left beside it


def test_export_without_dtype_copies_weights_unchanged(run_dir, tmp_path):
    dst = export_hf(run_dir / "checkpoint-4", tmp_path / "plain")
    assert (dst / "model.safetensors").read_bytes() == (run_dir / "checkpoint-4" / "model.safetensors").read_bytes()
    assert json.loads((dst / "config.json").read_text()) == llama_config()
    fp16 = export_hf(dst, tmp_path / "half", "fp16")  # any model directory, even without a manifest
    assert {t.dtype for t in load_file(str(fp16 / "model.safetensors")).values()} == {torch.float16}


def test_export_refuses_bad_sources_and_existing_output(run_dir, tmp_path):
    src = run_dir / "checkpoint-4"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"taken already exists; remove it, pass --overwrite"):
        export_hf(src, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    export_hf(src, tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "config.json").exists()
    with pytest.raises(CheckpointError, match="overlaps the checkpoint"):
        export_hf(src, src / "inner")
    with pytest.raises(CheckpointError, match=r"is not a model directory \(config.json is missing\)"):
        export_hf(tmp_path, tmp_path / "x")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fails verification \(model.safetensors fails its sha256 check"):
        export_hf(src, tmp_path / "from-corrupt", "bf16")
    assert not (tmp_path / "from-corrupt").exists()


def test_disk_full_during_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(koen_export, "save_file", full)
    with pytest.raises(CheckpointError) as err:
        export_hf(run_dir / "checkpoint-4", tmp_path / "out" / "model", "bf16")
    tmp = tmp_path / "out" / f".export-model-{os.getpid()}"
    assert str(err.value) == (f"disk full while writing {tmp}/model.safetensors: free space or point --output "
                              f"elsewhere; {run_dir / 'checkpoint-4'} is untouched")
    assert list((tmp_path / "out").iterdir()) == []


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_script_auto_follows_latest(run_dir, tmp_path):
    ck.save_checkpoint(run_dir, "checkpoint-2", model_state=llama_weights(1), hf_config=llama_config(),
                       tokenizer_dir=None, training_info={"step": 2}, update_latest=False)
    proc = run_script("--checkpoint", "auto", "--output-root", str(run_dir), "--output", str(tmp_path / "e"),
                      "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"exported {run_dir / 'checkpoint-4'} -> {tmp_path / 'e'} (fp16)"
    weights = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], llama_weights()["lm_head.weight"].half())
    assert json.loads((tmp_path / "e" / "config.json").read_text())["dtype"] == "float16"


def test_script_errors_are_one_line(tmp_path):
    proc = run_script("--checkpoint", "auto", "--output-root", str(tmp_path / "empty"), "--output", str(tmp_path / "e"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: no valid checkpoint under {tmp_path / 'empty'}; "
                           "pass --checkpoint PATH or --output-root DIR\n")
    proc = run_script("--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "e"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such directory" in proc.stderr
    assert not (tmp_path / "e").exists()
