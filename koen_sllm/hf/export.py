"""Exporting a checkpoint as a clean model directory for transformers (scripts/export_hf.py).

Only what a model user needs is copied: config.json, model.safetensors (optionally
cast to bf16/fp16/fp32) and the tokenizer files; never training state, pickles or
code. The export is written beside the target and published by one rename, so an
interrupted export leaves no half-written directory.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from koen_sllm.checkpoint.atomic_io import io_message, publish_dir, remove_path, sync_tree, write_text
from koen_sllm.checkpoint.store import (CHECKPOINT_OWN_FILES, CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, CheckpointError,
                                  verify_checkpoint)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Never shipped in an export: training state, pickles, code, other backends' files.
_NOT_EXPORTED_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".py")


def export_hf(src: Path, dst: Path, dtype: Optional[str] = None, *, overwrite: bool = False) -> Path:
    """Copy a checkpoint into a clean model directory (config, weights, tokenizer), atomically.

    ``dtype`` ("bf16", "fp16", "fp32") casts floating-point weights and records the
    dtype in config.json; None copies the weights file unchanged.
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is unknown; use one of {', '.join(_DTYPES)}")
    for need in (CONFIG_FILE, MODEL_FILE):
        if not (src / need).is_file():
            raise CheckpointError(f"{src} is not a model directory ({need} is missing); pass a checkpoint directory")
    if (src / MANIFEST_FILE).exists():
        ok, why = verify_checkpoint(src)
        if not ok:
            raise CheckpointError(f"{src} fails verification ({why}); export another checkpoint")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise CheckpointError(f"--output {dst} overlaps the checkpoint {src}; choose a separate directory")
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists; remove it, pass --overwrite or choose another --output")
    tmp = dst.parent / f".export-{dst.name}-{os.getpid()}"
    where = tmp
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_path(tmp)
        tmp.mkdir()
        config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
        where = tmp / MODEL_FILE
        if dtype is None:
            shutil.copyfile(src / MODEL_FILE, where)
        else:
            target = _DTYPES[dtype]
            weights = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(str(src / MODEL_FILE)).items()}
            save_file(weights, str(where), metadata={"format": "pt"})
            # "torch.bfloat16" -> "bfloat16"; transformers v5 reads dtype, v4 torch_dtype
            config["dtype"] = config["torch_dtype"] = str(target).removeprefix("torch.")
        where = tmp / CONFIG_FILE
        write_text(where, json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file in _exportable_files(src):
            where = tmp / file.name
            shutil.copyfile(file, where)
        where = tmp
        sync_tree(tmp, hashes=False)
        where = dst
        publish_dir(tmp, dst)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            remove_path(tmp)
            raise
        message = io_message(exc, where, dst.parent, "--output", f"{src} is untouched")
        remove_path(tmp)
        raise CheckpointError(message) from exc
    return dst


def _exportable_files(src: Path) -> Iterable[Path]:
    for p in sorted(src.iterdir()):
        if (p.is_file() and p.name not in CHECKPOINT_OWN_FILES and not p.name.startswith(".")
                and not p.name.endswith(_NOT_EXPORTED_SUFFIXES)):
            yield p
