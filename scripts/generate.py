#!/usr/bin/env python3
"""Sample Korean/English text from a saved model directory, through transformers.

    python scripts/generate.py --model-path outputs/checkpoint-1000
    python scripts/generate.py --model-path outputs/checkpoint-1000 \\
        --prompt "대한민국의 수도는" --prompt "The weather today" \\
        --temperature 0.8 --top-p 0.95 --max-new-tokens 200 --seed 0
    python scripts/generate.py --model-path outputs          # follows outputs/latest
    python scripts/generate.py --model-path exported/ --tokenizer-path tokenizer/
    python scripts/generate.py --model-path outputs/checkpoint-1000 --temperature 0   # greedy

Any directory with config.json and model.safetensors works (training checkpoints,
exports): it is loaded with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` from local files only, on the GPU when there is one.
The tokenizer comes from the model directory unless --tokenizer-path is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_PROMPTS = ("대한민국의 수도는", "The capital of South Korea is")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class GenerateError(Exception):
    """Bad --model-path / --tokenizer-path or options; the message is the one line shown to the user."""


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory behind ``path``: the directory itself, the parent of a file
    inside it (e.g. .../model.safetensors), or the checkpoint a ``latest`` pointer names."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GenerateError(f"--model-path {p} does not exist")
    if p.is_file():
        if p.name in WEIGHT_FILES + ("config.json",):
            p = p.parent
        elif p.name in PICKLE_FILES:
            raise GenerateError(f"--model-path {p} is a pickle file; only safetensors weights are loaded "
                                "(give the checkpoint directory written by this project)")
        else:
            raise GenerateError(f"--model-path {p} is a file; give the model directory (with config.json)")
    if not (p / "config.json").exists() and (p / "latest").exists():
        latest = p / "latest"
        p = latest.resolve() if latest.is_dir() else p / latest.read_text(encoding="utf-8").strip()
    if not (p / "config.json").is_file():
        raise GenerateError(f"--model-path {p} is not a model directory: config.json is missing")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        if any((p / name).is_file() for name in PICKLE_FILES):
            raise GenerateError(f"--model-path {p} holds only pytorch_model.bin (pickle); model.safetensors is "
                                "needed (re-export with scripts/export_hf.py)")
        raise GenerateError(f"--model-path {p} is not a model directory: model.safetensors is missing")
    return p


def resolve_tokenizer_dir(model_dir: Path, tokenizer_path: Optional[str]) -> Path:
    t = Path(tokenizer_path).expanduser() if tokenizer_path else model_dir
    option = "--tokenizer-path" if tokenizer_path else "--model-path"
    if not t.is_dir():
        raise GenerateError(f"{option} {t} is not a directory")
    if not any((t / name).is_file() for name in TOKENIZER_FILES):
        hint = "" if tokenizer_path else "; pass --tokenizer-path DIR"
        raise GenerateError(f"{option} {t} has no tokenizer files (tokenizer.json or tokenizer.model){hint}")
    return t


def load(model_dir: Path, tokenizer_dir: Path, device: str = "auto"):
    """(model, tokenizer, device) loaded offline; bf16 on a GPU, fp32 on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub, even by accident
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA GPU is visible; use --device cpu")
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise GenerateError(f"cannot load {model_dir}: {str(exc).strip().splitlines()[0]}") from exc
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer, device


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, device: str = "cpu") -> tuple[str, list[int]]:
    """Continue ``prompt``; returns (new text, new token ids). temperature 0 = greedy."""
    import torch

    # Training text is NFC-normalized; a decomposed Hangul prompt would otherwise
    # encode into pieces the model never saw.
    enc = tokenizer(unicodedata.normalize("NFC", prompt), return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        max_new_tokens = max(0, limit - input_ids.shape[1])
        print(f"note: generating {max_new_tokens} tokens (the model's context is {limit})", file=sys.stderr)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=enc["attention_mask"].to(device), **kwargs)
    new_ids = out[0, input_ids.shape[1]:].tolist()
    # Decoding the continuation alone can drop a leading space (SentencePiece's "▁"),
    # so decode everything and cut the prompt's own decoding off the front.
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    head = tokenizer.decode(input_ids[0], skip_special_tokens=True)
    text = full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids, skip_special_tokens=True)
    return text, new_ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample text from a saved model directory (offline).")
    p.add_argument("--model-path", required=True, help="model/checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer-path", help="tokenizer directory when the model directory has none")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several (default: one Korean, one English)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.temperature < 0:
            raise GenerateError(f"--temperature must be zero (greedy) or positive, got {args.temperature}")
        if not 0.0 < args.top_p <= 1.0:
            raise GenerateError(f"--top-p must lie in (0, 1], got {args.top_p}")
        model_dir = resolve_model_dir(args.model_path)
        tokenizer_dir = resolve_tokenizer_dir(model_dir, args.tokenizer_path)
        model, tokenizer, device = load(model_dir, tokenizer_dir, args.device)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {model_dir} | {type(model).__name__} | {n_params:,} parameters | {device} {model.dtype}",
          file=sys.stderr)
    for i, prompt in enumerate(args.prompt or DEFAULT_PROMPTS):
        text, _ = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed + i, device=device)
        print(f"--- sample {i + 1}\n{prompt}{text}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
