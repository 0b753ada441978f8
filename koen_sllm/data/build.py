"""Build, check and reuse a prepared-data folder (tokenizer + token files + meta.json).

Layout of a prepared folder::

    tokenizer/          SentencePiece model + transformers files
    train.bin           every training document, each followed by EOS
    val_<lang>.bin      held-out documents per language
    meta.json           dtype, per-split tokens/bytes/docs, tokenizer and input fingerprints

A folder is reused when its meta.json matches the input (size and mtime of
every file, else their sha256), the settings and the tokenizer; otherwise it
is rebuilt, stage by stage, in the work folder ``.<name>.build`` beside it
(documents -> tokenizer -> token files, each committed when whole, so an
interrupted build resumes where it stopped) and swapped in by rename, so a
crash never leaves a half-written folder that looks valid.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from koen_sllm.checkpoint.atomic_io import publish_dir, write_text
from koen_sllm.data import DataError
from koen_sllm.data.ingest import (IngestStats, content_hash, file_stamp, format_bytes, format_summary, iter_documents,
                                   text_bytes)
from koen_sllm.data.pack import DocTable, PackProgress, pack_jsonl, resolve_num_proc, token_dtype
from koen_sllm.data.progress import Progress
from koen_sllm.data.tokenizer_training import DEFAULT_MAX_LINES, sample_lines, train_in_child, training_line_count
from koen_sllm.tokenizer import DEFAULT_MODEL_TYPE, KoEnTokenizer, save_trained, settle_vocabulary

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


def read_meta(prepared: Path) -> tuple[Optional[dict], str]:
    """(meta.json of ``prepared``, "") or (None, why it cannot be read)."""
    meta_file = prepared / "meta.json"
    if not meta_file.is_file():
        return None, "not prepared yet"
    try:
        return json.loads(meta_file.read_text(encoding="utf-8")), ""
    except (OSError, ValueError):
        return None, "meta.json is unreadable"


def check_cache(prepared: Path, files: list[Path], settings: dict, tokenizer: Optional[KoEnTokenizer],
                strict: bool) -> tuple[Optional[dict], str]:
    """(meta, "") when ``prepared`` is valid for this input, else (None, why not)."""
    meta_file = prepared / "meta.json"
    meta, why = read_meta(prepared)
    if meta is None:
        return None, why
    if meta.get("settings") != settings:
        return None, f"settings changed ({meta.get('settings')} -> {settings})"
    if strict and (meta.get("ingest", {}).get("skipped") or meta.get("ingest", {}).get("damaged_files")):
        return None, "--strict asks to re-check lines skipped (or damaged files) last time"
    stamp = file_stamp(files)
    if meta["input"]["files"] != stamp:
        if [s[0] for s in meta["input"]["files"]] != [s[0] for s in stamp]:
            return None, "the input files changed"
        if content_hash(files) != meta["input"]["content_sha256"]:
            return None, "the input content changed"
        meta["input"]["files"] = stamp  # touched but identical: remember the new times
        _write_json(meta_file, meta)
    why = check_outputs(prepared, meta, tokenizer)
    return (None, why) if why else (meta, "")


def check_outputs(prepared: Path, meta: dict, tokenizer: Optional[KoEnTokenizer] = None) -> str:
    """Why the tokenizer and token files of ``prepared`` do not match its meta.json ("" when they do).

    The half of the cache check that needs no source corpus: a prepared folder copied alone
    (to a cluster volume, say) is checked with this only.
    """
    tok_dir = prepared / "tokenizer"
    try:
        fingerprint = KoEnTokenizer.load(tok_dir).fingerprint()
    except Exception:  # noqa: BLE001 - any unreadable tokenizer means "rebuild"
        return "the tokenizer is missing or unreadable"
    if fingerprint != meta["tokenizer"]["fingerprint"]:
        return "the tokenizer files changed"
    if tokenizer is not None and tokenizer.fingerprint() != fingerprint:
        return "a different --tokenizer-path was given"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name, split in meta["splits"].items():
        path = prepared / split["file"]
        if not path.is_file() or path.stat().st_size != split["tokens"] * itemsize:
            return f"{split['file']} is missing or truncated"
    return ""


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
    tokenizer_max_lines: int = DEFAULT_MAX_LINES,
    log: Callable[[str], None] = print,
) -> dict:
    """Read, split, train a tokenizer (unless given) and pack; return meta.

    The stages commit into the work folder ``.<name>.build`` beside ``prepared``; an interrupted
    build (Ctrl-C, full disk, a crash) resumes at the first unfinished stage, and packing at its
    last commit. The finished folder is renamed into place, so ``prepared`` is never half-written.
    """
    started = time.time()
    prepared.parent.mkdir(parents=True, exist_ok=True)
    key = _build_key(files, settings, vocab_size, model_type, tokenizer, strict, tokenizer_max_lines)
    work = BuildDir.open(prepared.parent / f".{prepared.name}.build", key, log)
    try:
        _check_disk(files, work, log)
        docs = _stage_documents(work, files, settings, strict, log)
        tokenizer, tok_meta = _stage_tokenizer(work, docs, vocab_size, model_type, tokenizer, num_proc,
                                               tokenizer_max_lines, log)
        splits, per_source = _stage_pack(work, docs, tokenizer, num_proc, log)
        meta = _meta(files, settings, tokenizer, tok_meta, docs, splits, per_source, used_dummy)
        work.finish(meta, prepared)
    except KeyboardInterrupt:
        raise work.interrupted() from None
    except OSError as exc:
        raise work.io_error(exc) from None
    except Exception:
        work.release()
        raise
    log(f"prepared {prepared} in {time.time() - started:.1f}s")
    return meta


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build; the message says what was kept and how to go on."""


class BuildDir:
    """The work folder of one build: the files of finished stages, and state.json naming them.

    The state is replaced atomically after a stage's files are complete and synced, so what it
    names is always whole; anything else in the folder is redone. A folder left by a build of
    other input or options is discarded."""

    STATE = "state.json"
    STAGES = ("documents", "tokenizer", "pack")

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state
        self.writing: Optional[Path] = None  # the file being written, for a full disk's message
        self.need = 0  # what the build still expects to write (the disk check's estimate)

    @classmethod
    def open(cls, path: Path, key: str, log: Callable[[str], None]) -> "BuildDir":
        state = None
        if (path / cls.STATE).is_file():
            try:
                state = json.loads((path / cls.STATE).read_text(encoding="utf-8"))
            except ValueError:
                state = None
            if state is not None and state.get("key") == key:
                work = cls(path, state)
                log(f"resuming the unfinished build in {path} (finished: {', '.join(work.finished()) or 'nothing yet'})")
                return work
            log(f"discarding {path}: an unfinished build of other input or options")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        os.chmod(path, 0o755)
        return cls(path, {"key": key})

    def finished(self) -> list:
        return [name for name in self.STAGES if name in self.state]

    def commit(self, stage: str, value: dict) -> None:
        self.state[stage] = value
        tmp = self.path / (self.STATE + ".tmp")
        write_text(tmp, json.dumps(self.state, ensure_ascii=False))
        os.replace(tmp, self.path / self.STATE)

    def finish(self, meta: dict, prepared: Path) -> None:
        for name in ("docs.jsonl", "routing.npz", self.STATE):
            (self.path / name).unlink(missing_ok=True)
        _write_json(self.path / "meta.json", meta)
        publish_dir(self.path, prepared)

    def release(self) -> str:
        """After a failure: the folder is removed when no stage had finished (nothing to resume);
        returns what was kept, for the message."""
        done = self.finished()
        if not done:
            shutil.rmtree(self.path, ignore_errors=True)
            return "nothing was finished, nothing is kept"
        return (f"finished stages ({', '.join(done)}) are kept in {self.path}; "
                "the same command resumes from there")

    def interrupted(self) -> BuildInterrupted:
        return BuildInterrupted(f"interrupted; {self.release()}")

    def io_error(self, exc: OSError) -> DataError:
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(self.path).free if self.path.exists() else 0
            where = self.writing or self.path
            return DataError(f"disk full while writing {where}: about {format_bytes(self.need)} more is needed there, "
                             f"{format_bytes(free)} is free; free some space and run again ({self.release()})")
        name = exc.filename or self.writing or self.path
        return DataError(f"{name}: {exc.strerror or exc} ({self.release()})")


def _build_key(files: list[Path], settings: dict, vocab_size: int, model_type: str,
               tokenizer: Optional[KoEnTokenizer], strict: bool, max_lines: int) -> str:
    """What a build's results depend on; a work folder of another key is not resumed."""
    parts = {"format": FORMAT_VERSION, "files": file_stamp(files), "settings": settings, "vocab_size": vocab_size,
             "model_type": model_type, "tokenizer": tokenizer.fingerprint() if tokenizer else None,
             "strict": strict, "max_lines": max_lines}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# Token files take about this share of the documents' bytes: 2-byte ids at 3.5-7 bytes of
# UTF-8 per token (English about 3.6, Korean about 7); the share is rounded up.
TOKEN_BYTES_PER_TEXT_BYTE = 0.6


def _check_disk(files: list[Path], work: BuildDir, log: Callable[[str], None]) -> None:
    """Refuse to start a build that cannot fit: the documents file plus the token files."""
    done = work.state.get("documents")
    text = Path(done["path"]).stat().st_size if done else text_bytes(files)
    need = int(text * TOKEN_BYTES_PER_TEXT_BYTE) + (0 if "documents" in work.state else text)
    need -= sum(p.stat().st_size for p in work.path.glob("*.bin"))
    free = shutil.disk_usage(work.path).free
    work.need = max(need, 0)
    if need > free:
        raise DataError(f"not enough free disk in {work.path.parent}: preparing {files[0].name}"
                        f"{' and others' if len(files) > 1 else ''} needs about {format_bytes(need)} (documents "
                        f"{format_bytes(text)} and token files about {format_bytes(text * TOKEN_BYTES_PER_TEXT_BYTE)}), "
                        f"{format_bytes(free)} is free; free some space or put the data on a larger disk")
    log(f"disk: about {format_bytes(need)} needed, {format_bytes(free)} free in {work.path.parent}")


@dataclass
class Documents:
    """The documents stage: the documents file and each document's routing."""

    path: Path  # docs.jsonl in the work folder, or the input itself when it already is that file
    table: DocTable
    lines: np.ndarray  # training lines per document (the tokenizer's sample is drawn from them)
    ingest: dict
    summary: str


def _stage_documents(work: BuildDir, files: list[Path], settings: dict, strict: bool,
                     log: Callable[[str], None]) -> Documents:
    if "documents" in work.state:
        done = work.state["documents"]
        log(done["summary"] + "\n  (read before the interruption)")
        with np.load(work.path / "routing.npz") as z:
            table = DocTable(z["split"], z["lang"], z["source"], done["split_names"], done["lang_names"],
                             done["source_names"])
            return Documents(Path(done["path"]), table, z["lines"], done["ingest"], done["summary"])
    stats = IngestStats()
    langs: list[int] = []
    sources: list[int] = []
    draws: list[float] = []
    lines: list[int] = []
    lang_names: dict[str, int] = {}
    source_names: dict[str, int] = {}
    work.writing = work.path / "docs.jsonl"
    with _DocsWriter(work.path / "docs.jsonl", files) as out:
        for doc in iter_documents(files, stats, strict=strict, log=log):
            out.add((json.dumps({"text": doc.text, "lang": doc.lang, "source": doc.source}, ensure_ascii=False)
                     + "\n").encode("utf-8"))
            langs.append(lang_names.setdefault(doc.lang, len(lang_names)))
            sources.append(source_names.setdefault(doc.source, len(source_names)))
            draws.append(_val_draw(doc.text))
            lines.append(training_line_count(doc.text))
        docs_path = out.finish()
    summary = format_summary(stats, f"read {', '.join(p.name for p in files[:3])}{' ...' if len(files) > 3 else ''}")
    log(summary)
    split, split_names = _assign_splits(np.array(langs, dtype=np.int64), np.array(draws), lang_names,
                                        settings["val_fraction"], files[0])
    table = DocTable(split, np.array(langs, dtype=np.int64), np.array(sources, dtype=np.int64), split_names,
                     list(lang_names), list(source_names))
    line_counts = np.array(lines, dtype=np.int64)
    with open(work.path / "routing.npz.part", "wb") as f:
        np.savez(f, split=table.split, lang=table.lang, source=table.source, lines=line_counts)
        f.flush()
        os.fsync(f.fileno())
    os.replace(work.path / "routing.npz.part", work.path / "routing.npz")
    ingest = stats.to_dict()
    work.commit("documents", {"path": str(docs_path), "split_names": split_names, "lang_names": list(lang_names),
                              "source_names": list(source_names), "ingest": ingest, "summary": summary})
    return Documents(docs_path, table, line_counts, ingest, summary)


class _DocsWriter:
    """Writes the documents file, unless the input already is it.

    The mixed corpus (one JSONL file, written by the mix step in the same form) reads back as
    itself: then no copy is written and the stages after read the input directly, which saves
    writing the corpus once more and a corpus-sized file of free disk. The first line that
    differs switches to writing: the lines before it are copied from the input and writing
    goes on from there."""

    def __init__(self, target: Path, files: list[Path]):
        self.target, self.part = target, target.with_name(target.name + ".part")
        single = len(files) == 1 and files[0].name.endswith(".jsonl")
        self.source = open(files[0], "rb") if single else None
        self.out = None if single else open(self.part, "wb")
        self.matched = 0

    def __enter__(self) -> "_DocsWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in (self.source, self.out):
            if f is not None:
                f.close()

    def add(self, line: bytes) -> None:
        if self.out is None:
            if self.source.readline() == line:
                self.matched += 1
                return
            self._diverge()
        self.out.write(line)

    def _diverge(self) -> None:
        self.out = open(self.part, "wb")
        self.source.seek(0)
        for _ in range(self.matched):
            self.out.write(self.source.readline())

    def finish(self) -> Path:
        if self.out is None:
            if self.source.read(1) == b"":  # every line was a document, unchanged
                return Path(self.source.name).resolve()
            self._diverge()
        self.out.flush()
        os.fsync(self.out.fileno())
        os.replace(self.part, self.target)
        return self.target


def _assign_splits(lang_arr: np.ndarray, draw_arr: np.ndarray, lang_names: dict, val_fraction: float,
                   first_file: Path) -> tuple[np.ndarray, list]:
    """Held out per language: documents whose draw falls under val_fraction, and at least one
    wherever a language has two or more documents."""
    is_val = draw_arr < val_fraction
    split_names, split = ["train"], np.zeros(len(lang_arr), dtype=np.int64)
    for lang, code in sorted(lang_names.items()):
        rows = np.flatnonzero(lang_arr == code)
        if val_fraction > 0 and len(rows) >= 2 and not is_val[rows].any():
            is_val[rows[np.argmin(draw_arr[rows])]] = True
        if is_val[rows].any():
            split[rows[is_val[rows]]] = len(split_names)
            split_names.append(f"val_{lang}")
    if not (split == 0).any():
        raise DataError(f"{first_file}: every document went to validation; add data or lower --val-fraction")
    return split, split_names


def _train_texts(docs_file: Path, split: np.ndarray, log: Callable[[str], None]) -> Iterator[str]:
    bar = Progress("sampling tokenizer lines", docs_file.stat().st_size, log=log)
    try:
        with open(docs_file, encoding="utf-8") as f:
            for line, code in zip(f, split):
                bar.update(len(line.encode("utf-8")))
                if code == 0:
                    yield json.loads(line)["text"]
    finally:
        bar.close()


def _stage_tokenizer(work: BuildDir, docs: Documents, vocab_size: int, model_type: str,
                     given: Optional[KoEnTokenizer], num_proc: int, max_lines: int,
                     log: Callable[[str], None]) -> tuple[KoEnTokenizer, dict]:
    tok_dir = work.path / "tokenizer"
    done = work.state.get("tokenizer")
    if done is not None:
        tokenizer = KoEnTokenizer.load(tok_dir)
        if tokenizer.fingerprint() == done["fingerprint"]:
            log(f"tokenizer: trained before the interruption ({done['vocab_size']:,} pieces)")
            return tokenizer, done
    work.writing = tok_dir
    if given is not None:
        given.save_pretrained(tok_dir)
        tokenizer = KoEnTokenizer.load(tok_dir)
        info = {"source": str(given.model_file)}
    else:
        total = int(docs.lines[docs.table.split == 0].sum())
        expected = min(total, max_lines) if max_lines > 0 else total
        log(f"training a {model_type} tokenizer (vocabulary {vocab_size:,}) on about {expected:,} of the training "
            f"split's {total:,} lines (--tokenizer-max-lines {max_lines:,}) ...")
        threads = resolve_num_proc(num_proc)
        sent = [0]

        def train(size: int) -> bytes:
            texts = _train_texts(docs.path, docs.table.split, log)
            proto, sent[0] = train_in_child(lambda: sample_lines(texts, total, max_lines), size, model_type,
                                            threads, work.path, log)
            return proto

        proto, size = settle_vocabulary(train, vocab_size, model_type, name="the training split", log=log)
        work.writing = tok_dir
        tokenizer = save_trained(proto, tok_dir, model_type, size, vocab_size, "the training split")
        n = sent[0]
        info = {"source": "trained", "sample_lines": n, "training_lines": total, "max_lines": max_lines}
    tok_meta = {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                "model_type": tokenizer.model_type, "requested_vocab_size": vocab_size, **info}
    work.commit("tokenizer", tok_meta)
    return tokenizer, tok_meta


def _stage_pack(work: BuildDir, docs: Documents, tokenizer: KoEnTokenizer, num_proc: int,
                log: Callable[[str], None]) -> tuple[dict, dict]:
    saved = work.state.get("pack")
    resume = PackProgress(**saved) if saved else None
    work.writing = work.path / "train.bin"
    return pack_jsonl(docs.path, tokenizer, work.path, docs.table, num_proc=num_proc, log=log,
                      resume=resume, commit=lambda progress: work.commit("pack", progress.to_dict()))


def _meta(files: list[Path], settings: dict, tokenizer: KoEnTokenizer, tok_meta: dict, docs: Documents,
          splits: dict, per_source: dict, used_dummy: bool) -> dict:
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
                            for lang in docs.table.lang_names},
        "sources": per_source,
        "ingest": docs.ingest,
    }


def describe_meta(meta: dict) -> str:
    """A few lines for the log: tokens per split and chars per token per language."""
    tok = meta["tokenizer"]
    sample = (f", trained on {tok['sample_lines']:,} of {tok['training_lines']:,} lines "
              f"(--tokenizer-max-lines {tok['max_lines']:,})" if "sample_lines" in tok else "")
    lines = [f"tokenizer: {tok['model_type']} {meta['vocab_size']:,} pieces "
             f"({tok['fingerprint'][:12]}){sample}, token files {meta['dtype']}"]
    for name, split in meta["splits"].items():
        per_lang = ", ".join(f"{lang} {row['tokens']:,} tok ({row['chars'] / max(row['tokens'] - row['docs'], 1):.2f} "
                             "chars/tok)" for lang, row in sorted(split["per_lang"].items()))
        lines.append(f"  {name:<10} {split['tokens']:>14,} tokens {split['docs']:>10,} docs   {per_lang}")
    return "\n".join(lines)
