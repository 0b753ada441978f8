"""Parallel tokenization of cleaned documents into flat memory-mapped token files.

Input is a JSONL file of clean documents (``{"text", "lang", "source"}``, one
per line, as written by koen_sllm.data.prepare). Every document is encoded, EOS is
appended, and the ids are routed to their split file (``train.bin``,
``val_ko.bin`` ...). Files are raw arrays of ``token_dtype`` in native byte order:
``np.memmap(path, dtype)`` reads them without loading.

Two parallel paths (measured against a plain loop in docs/data.md):
- "processes": a pool of ``num_proc`` workers, each with its own
  SentencePiece model, parses and encodes ~0.5 MB chunks and returns numpy
  arrays; at most 2 x num_proc chunks are in flight, so memory stays bounded
  on any corpus size.
- "threads": SentencePiece's C++ thread pool encodes one chunk (it releases
  the GIL) while this process parses the next chunk's JSON and converts the
  previous chunk's ids, so the Python work hides behind the encoding. No
  start-up or copying cost, but the Python work is still one thread.
Both give the same ids in the same order as a plain loop over ``encode``.
"auto" (the default) takes threads up to AUTO_THREADS_MAX workers, where they
cost less (no pool start-up, no pickling of ids), and processes beyond,
where one Python thread would become the limit.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from koen_sllm.data.progress import Progress
from koen_sllm.tokenizer import EOS_ID, KoEnTokenizer, normalize_text

CHUNK_BYTES = 1 << 19  # ~0.5 MB: enough chunks to balance the workers, few enough to keep IPC cheap
BACKENDS = ("auto", "processes", "threads")
DEFAULT_BACKEND = "auto"
AUTO_THREADS_MAX = 4  # beyond it the one Python thread that parses and converts limits threads (docs/data.md)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def resolve_num_proc(num_proc: int) -> int:
    """0 means every core this process may use."""
    if num_proc and num_proc > 0:
        return num_proc
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@dataclass
class Encoded:
    """One chunk: ids of all its documents back to back, each followed by EOS."""

    ids: np.ndarray
    tokens: np.ndarray  # per document, EOS included
    nbytes: np.ndarray  # UTF-8 bytes of each text (for bits per byte)
    chars: np.ndarray
    end: int = 0  # byte offset in the documents file just after this chunk


def _texts(lines: list[bytes]) -> list[str]:
    """The normalized texts of a chunk of document lines (JSONL written by koen_sllm.data.prepare)."""
    return [normalize_text(json.loads(line)["text"]) for line in lines]


def _encode_lines_with(sp, lines: list[bytes], dtype: np.dtype) -> Encoded:
    texts = _texts(lines)
    return _to_arrays(texts, [sp.encode(t) for t in texts], dtype)


def _to_arrays(texts: list[str], ids: list[list[int]], dtype: np.dtype) -> Encoded:
    for row in ids:
        row.append(EOS_ID)
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return Encoded(flat, lens, nbytes, chars)


# Worker state: one SentencePiece model per process, loaded once.
_WORKER: dict = {}


def _init_worker(model_file: str, dtype: str) -> None:
    import sentencepiece as spm

    # Ctrl-C is the parent's to handle (it stops the pool); a worker would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["sp"] = spm.SentencePieceProcessor(model_file=model_file)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_lines(lines: list[bytes]) -> Encoded:
    return _encode_lines_with(_WORKER["sp"], lines, _WORKER["dtype"])


def _chunks(path: Path, chunk_bytes: int, start: int = 0) -> Iterator[tuple[list[bytes], int]]:
    """(document lines, byte offset after them) from ``start``, a document boundary."""
    with open(path, "rb") as f:
        f.seek(start)
        lines, size, offset = [], 0, start
        for line in f:
            lines.append(line)
            size += len(line)
            offset += len(line)
            if size >= chunk_bytes:
                yield lines, offset
                lines, size = [], 0
        if lines:
            yield lines, offset


def _with_end(enc: Encoded, end: int) -> Encoded:
    enc.end = end
    return enc


def _encode_threaded(path: Path, sp, dtype: np.dtype, threads: int, chunk_bytes: int,
                     start: int) -> Iterator[Encoded]:
    """Chunk k is encoded by SentencePiece's threads while chunk k+1 is parsed here."""
    with ThreadPoolExecutor(1, thread_name_prefix="sp-encode") as encoder:
        pending = None
        for lines, end in _chunks(path, chunk_bytes, start):
            texts = _texts(lines)
            future = encoder.submit(sp.encode, texts, num_threads=threads)
            if pending is not None:
                yield _with_end(_to_arrays(pending[0], pending[1].result(), dtype), pending[2])
            pending = (texts, future, end)
        if pending is not None:
            yield _with_end(_to_arrays(pending[0], pending[1].result(), dtype), pending[2])


def _pool_context():
    # Not "fork": this process may already run threads (SentencePiece's own pool after a
    # "threads" encode, torch's, a logging handler's), and a child forked while one of them
    # holds a lock waits on it forever (seen: a worker stuck in a futex). The fork server is a
    # fresh single-threaded process that forks the workers; each imports this module once
    # (numpy and SentencePiece, about 0.3 s, no torch).
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def encode_jsonl(
    path: Path,
    tokenizer: KoEnTokenizer,
    num_proc: int = 0,
    backend: str = DEFAULT_BACKEND,
    chunk_bytes: int = CHUNK_BYTES,
    start: int = 0,
) -> Iterator[Encoded]:
    """Encoded chunks of a documents JSONL file, in file order, from byte offset ``start``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    workers = resolve_num_proc(num_proc)
    dtype = token_dtype(tokenizer.vocab_size)
    if backend == "auto":
        backend = "threads" if workers <= AUTO_THREADS_MAX else "processes"
    if workers == 1:
        for lines, end in _chunks(path, chunk_bytes, start):
            yield _with_end(_encode_lines_with(tokenizer.sp, lines, dtype), end)
        return
    if backend == "threads" or path.stat().st_size - start <= chunk_bytes:
        yield from _encode_threaded(path, tokenizer.sp, dtype, workers, chunk_bytes, start)
        return
    with _pool_context().Pool(workers, _init_worker, (str(tokenizer.model_file), dtype.str)) as pool:
        pending: deque = deque()
        for lines, end in _chunks(path, chunk_bytes, start):
            pending.append((pool.apply_async(_encode_lines, (lines,)), end))
            if len(pending) >= 2 * workers:
                job, job_end = pending.popleft()
                yield _with_end(job.get(), job_end)
        while pending:
            job, job_end = pending.popleft()
            yield _with_end(job.get(), job_end)


@dataclass
class DocTable:
    """Per-document routing decided before packing (codes index the name lists)."""

    split: np.ndarray
    lang: np.ndarray
    source: np.ndarray
    split_names: list
    lang_names: list
    source_names: list


COMMIT_BYTES = 64 << 20  # documents packed between two commits: what an interruption can cost


@dataclass
class PackProgress:
    """What is packed and committed: the documents file up to ``offset`` (``docs`` documents),
    each split file's length in bytes, and the per-split / per-source sums so far."""

    offset: int = 0
    docs: int = 0
    sizes: dict = field(default_factory=dict)
    by_split: list = field(default_factory=list)
    by_source: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"offset": self.offset, "docs": self.docs, "sizes": self.sizes, "by_split": self.by_split,
                "by_source": self.by_source}


def _open_split_files(out_dir: Path, names: list, resume: Optional[PackProgress]) -> dict:
    """The split files, cut back to what was committed when resuming (bytes written after
    the last commit are redone, so an interruption anywhere leaves identical files)."""
    files = {}
    for name in names:
        path = out_dir / f"{name}.bin"
        if resume is None:
            files[name] = open(path, "wb")
            continue
        with open(path, "r+b") as f:
            f.truncate(resume.sizes[name])
        files[name] = open(path, "ab")
    return files


def _commit(files: dict, progress: PackProgress, by_split: np.ndarray, by_source: np.ndarray,
            commit: Optional[Callable[[PackProgress], None]]) -> None:
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
    progress.sizes = {name: f.tell() for name, f in files.items()}
    progress.by_split, progress.by_source = by_split.tolist(), by_source.tolist()
    if commit is not None:
        commit(progress)


def pack_jsonl(
    docs_file: Path,
    tokenizer: KoEnTokenizer,
    out_dir: Path,
    table: DocTable,
    *,
    num_proc: int = 0,
    backend: str = DEFAULT_BACKEND,
    log: Callable[[str], None] = print,
    resume: Optional[PackProgress] = None,
    commit: Optional[Callable[[PackProgress], None]] = None,
    commit_bytes: int = COMMIT_BYTES,
) -> tuple[dict, dict]:
    """Write ``<split>.bin`` files into ``out_dir``; return (per-split stats, per-source stats).

    Every ``commit_bytes`` of documents the split files are synced and ``commit`` is called
    with the progress; ``resume`` (a progress committed before) continues from there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_split, n_lang, n_src = len(table.split_names), len(table.lang_names), len(table.source_names)
    # Rows: tokens, docs, bytes, chars; summed per (split, lang) and per source with bincount.
    by_split = np.zeros((4, n_split * n_lang), dtype=np.int64)
    by_source = np.zeros((4, n_src), dtype=np.int64)
    progress = PackProgress()
    if resume is not None:
        by_split[:], by_source[:] = np.array(resume.by_split), np.array(resume.by_source)
        progress.offset, progress.docs = resume.offset, resume.docs
        log(f"resuming the packing at document {resume.docs:,} "
            f"({100.0 * resume.offset / max(docs_file.stat().st_size, 1):.0f}% already packed)")
    files = _open_split_files(out_dir, table.split_names, resume)
    bar = Progress("tokenizing", docs_file.stat().st_size, log=log)
    bar.update(progress.offset)
    first, committed_at = progress.docs, progress.offset
    try:
        for enc in encode_jsonl(docs_file, tokenizer, num_proc, backend, start=progress.offset):
            n = len(enc.tokens)
            ends = np.cumsum(enc.tokens)
            starts = ends - enc.tokens
            split_codes = table.split[first:first + n]
            for code in np.unique(split_codes):
                rows = np.flatnonzero(split_codes == code)
                out = files[table.split_names[code]]
                if len(rows) == n:
                    enc.ids.tofile(out)
                else:
                    np.concatenate([enc.ids[starts[r]:ends[r]] for r in rows]).tofile(out)
            key = split_codes.astype(np.int64) * n_lang + table.lang[first:first + n]
            src = table.source[first:first + n].astype(np.int64)
            for k, weights in enumerate((enc.tokens, np.ones(n), enc.nbytes, enc.chars)):
                by_split[k] += np.rint(np.bincount(key, weights, n_split * n_lang)).astype(np.int64)
                by_source[k] += np.rint(np.bincount(src, weights, n_src)).astype(np.int64)
            first += n
            bar.update(enc.end - progress.offset)
            progress.offset, progress.docs = enc.end, first
            if enc.end - committed_at >= commit_bytes:
                _commit(files, progress, by_split, by_source, commit)
                committed_at = enc.end
        _commit(files, progress, by_split, by_source, commit)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if first != len(table.split):
        raise RuntimeError(f"{docs_file}: packed {first} documents but the routing table has {len(table.split)}")
    fields = ("tokens", "docs", "bytes", "chars")
    splits = {}
    for s, name in enumerate(table.split_names):
        cells = by_split[:, s * n_lang:(s + 1) * n_lang]
        splits[name] = {"file": f"{name}.bin", **{f: int(cells[k].sum()) for k, f in enumerate(fields)},
                        "per_lang": {lang: {f: int(cells[k, j]) for k, f in enumerate(fields)}
                                     for j, lang in enumerate(table.lang_names) if cells[1, j]}}
    sources = {name: {f: int(by_source[k, r]) for k, f in enumerate(fields)}
               for r, name in enumerate(table.source_names) if by_source[1, r]}
    return splits, sources


def open_tokens(path: Path, dtype: Optional[str] = None) -> np.ndarray:
    """Memory-map a token file; the dtype comes from meta.json beside it unless given."""
    path = Path(path)
    if dtype is None:
        meta = path.parent / "meta.json"
        if not meta.is_file():
            from koen_sllm.data import DataError

            raise DataError(f"{meta} is missing: token files need their meta.json (re-run python -m koen_sllm.data.prepare)")
        dtype = json.loads(meta.read_text(encoding="utf-8"))["dtype"]
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
