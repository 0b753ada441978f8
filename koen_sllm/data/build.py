"""Build, check and reuse a prepared-data folder (tokenizer + token files + meta.json).

Layout of a prepared folder::

    tokenizer/          SentencePiece model + transformers files
    train.bin           every training document, each followed by EOS
    val_<lang>.bin      held-out documents per language
    meta.json           dtype, per-split tokens/bytes/docs, tokenizer and input fingerprints

A folder is reused when its meta.json matches the input (size and mtime of
every file, else their sha256), the settings and the tokenizer; otherwise it
is rebuilt in a temporary sibling and swapped in by rename, so a crash never
leaves a half-written folder that looks valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from koen_sllm.checkpoint.atomic_io import publish_dir
from koen_sllm.data import DataError
from koen_sllm.data.ingest import IngestStats, content_hash, file_stamp, format_summary, iter_documents
from koen_sllm.data.pack import DocTable, pack_jsonl, token_dtype
from koen_sllm.tokenizer import DEFAULT_MODEL_TYPE, KoEnTokenizer, train_tokenizer_on_texts

FORMAT_VERSION = 1
VAL_SALT = b"koen-val-v1"  # changing it reshuffles every validation split


def _val_draw(text: str) -> float:
    """A uniform number fixed by the text: a document's split never depends on its neighbours."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=VAL_SALT).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_cache(prepared: Path, files: list[Path], settings: dict, tokenizer: Optional[KoEnTokenizer],
                strict: bool) -> tuple[Optional[dict], str]:
    """(meta, "") when ``prepared`` is valid for this input, else (None, why not)."""
    meta_file = prepared / "meta.json"
    if not meta_file.is_file():
        return None, "not prepared yet"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError:
        return None, "meta.json is unreadable"
    if meta.get("settings") != settings:
        return None, f"settings changed ({meta.get('settings')} -> {settings})"
    if strict and meta.get("ingest", {}).get("skipped"):
        return None, "--strict asks to re-check lines skipped last time"
    stamp = file_stamp(files)
    if meta["input"]["files"] != stamp:
        if [s[0] for s in meta["input"]["files"]] != [s[0] for s in stamp]:
            return None, "the input files changed"
        if content_hash(files) != meta["input"]["content_sha256"]:
            return None, "the input content changed"
        meta["input"]["files"] = stamp  # touched but identical: remember the new times
        _write_json(meta_file, meta)
    tok_dir = prepared / "tokenizer"
    try:
        fingerprint = KoEnTokenizer.load(tok_dir).fingerprint()
    except Exception:  # noqa: BLE001 - any unreadable tokenizer means "rebuild"
        return None, "the tokenizer is missing or unreadable"
    if fingerprint != meta["tokenizer"]["fingerprint"]:
        return None, "the tokenizer files changed"
    if tokenizer is not None and tokenizer.fingerprint() != fingerprint:
        return None, "a different --tokenizer-path was given"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name, split in meta["splits"].items():
        path = prepared / split["file"]
        if not path.is_file() or path.stat().st_size != split["tokens"] * itemsize:
            return None, f"{split['file']} is missing or truncated"
    return meta, ""


def build_prepared(
    files: list[Path],
    prepared: Path,
    *,
    settings: dict,
    vocab_size: int,
    model_type: str = DEFAULT_MODEL_TYPE,
    tokenizer: Optional[KoEnTokenizer] = None,
    num_proc: int = 0,
    strict: bool = False,
    used_dummy: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Read, split, train a tokenizer (unless given) and pack; return meta."""
    started = time.time()
    prepared.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prepared.name}.tmp-", dir=prepared.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the data from other users of a shared machine
    try:
        meta = _build_into(tmp, files, settings, vocab_size, model_type, tokenizer, num_proc, strict, used_dummy, log)
        (tmp / "docs.jsonl").unlink()
        _write_json(tmp / "meta.json", meta)
        publish_dir(tmp, prepared)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {prepared} in {time.time() - started:.1f}s")
    return meta


def _build_into(tmp: Path, files: list[Path], settings: dict, vocab_size: int, model_type: str,
                tokenizer: Optional[KoEnTokenizer], num_proc: int, strict: bool, used_dummy: bool,
                log: Callable[[str], None]) -> dict:
    val_fraction = settings["val_fraction"]
    stats = IngestStats()
    langs: list[int] = []
    sources: list[int] = []
    draws: list[float] = []
    lang_names: dict[str, int] = {}
    source_names: dict[str, int] = {}
    with open(tmp / "docs.jsonl", "w", encoding="utf-8") as out:
        for doc in iter_documents(files, stats, strict=strict, log=log):
            out.write(json.dumps({"text": doc.text, "lang": doc.lang, "source": doc.source}, ensure_ascii=False) + "\n")
            langs.append(lang_names.setdefault(doc.lang, len(lang_names)))
            sources.append(source_names.setdefault(doc.source, len(source_names)))
            draws.append(_val_draw(doc.text))
    log(format_summary(stats, f"read {', '.join(p.name for p in files[:3])}{' ...' if len(files) > 3 else ''}"))
    lang_arr, draw_arr = np.array(langs, dtype=np.int64), np.array(draws)
    # Held out per language: documents whose draw falls under val_fraction, and
    # at least one wherever a language has two or more documents.
    is_val = draw_arr < val_fraction
    split_names, split = ["train"], np.zeros(len(langs), dtype=np.int64)
    for lang, code in sorted(lang_names.items()):
        rows = np.flatnonzero(lang_arr == code)
        if val_fraction > 0 and len(rows) >= 2 and not is_val[rows].any():
            is_val[rows[np.argmin(draw_arr[rows])]] = True
        if is_val[rows].any():
            split[rows[is_val[rows]]] = len(split_names)
            split_names.append(f"val_{lang}")
    if not (split == 0).any():
        raise DataError(f"{files[0]}: every document went to validation; add data or lower --val-fraction")

    tok_dir = tmp / "tokenizer"
    if tokenizer is None:
        def train_texts():
            with open(tmp / "docs.jsonl", encoding="utf-8") as f:
                for line, code in zip(f, split):
                    if code == 0:
                        yield json.loads(line)["text"]

        log(f"training a {model_type} tokenizer (vocabulary {vocab_size:,}) on the training split ...")
        tokenizer = train_tokenizer_on_texts(train_texts, tok_dir, vocab_size, model_type, num_threads=num_proc or None,
                                             log=log, name="the training split")
        source = "trained"
    else:
        tokenizer.save_pretrained(tok_dir)
        source = str(tokenizer.model_file)
        tokenizer = KoEnTokenizer.load(tok_dir)
    table = DocTable(split, lang_arr, np.array(sources, dtype=np.int64), split_names,
                     list(lang_names), list(source_names))
    splits, per_source = pack_jsonl(tmp / "docs.jsonl", tokenizer, tmp, table, num_proc=num_proc, log=log)
    tok_meta = {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                "model_type": tokenizer.model_type, "source": source, "requested_vocab_size": vocab_size}
    digest = content_hash(files)
    return {
        "format": FORMAT_VERSION,
        "fingerprint": hashlib.sha256(f"{digest}:{tok_meta['fingerprint']}:{json.dumps(settings)}".encode()).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "used_dummy": used_dummy,
        "settings": settings,
        "tokenizer": tok_meta,
        "tokenizer_hash": tok_meta["fingerprint"],
        "input": {"files": file_stamp(files), "content_sha256": digest},
        "input_hash": digest,
        "splits": splits,
        "tokens_per_lang": {lang: sum(s["per_lang"].get(lang, {}).get("tokens", 0) for s in splits.values())
                            for lang in lang_names},
        "sources": per_source,
        "ingest": stats.to_dict(),
    }


def describe_meta(meta: dict) -> str:
    """A few lines for the log: tokens per split and chars per token per language."""
    lines = [f"tokenizer: {meta['tokenizer']['model_type']} {meta['vocab_size']:,} pieces "
             f"({meta['tokenizer']['fingerprint'][:12]}), token files {meta['dtype']}"]
    for name, split in meta["splits"].items():
        per_lang = ", ".join(f"{lang} {row['tokens']:,} tok ({row['chars'] / max(row['tokens'] - row['docs'], 1):.2f} "
                             "chars/tok)" for lang, row in sorted(split["per_lang"].items()))
        lines.append(f"  {name:<10} {split['tokens']:>14,} tokens {split['docs']:>10,} docs   {per_lang}")
    return "\n".join(lines)
