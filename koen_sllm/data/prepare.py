"""Prepare training data: mix raw corpora, train the tokenizer, write token files.

    python -m koen_sllm.data.prepare INPUT [INPUT ...]          # files, folders or globs of JSONL / .txt
    scripts/run_preprocessing.sh --recipe1 INPUT ...       # the same (recipe1 = ko 0.6 / en 0.4)
    python -m koen_sllm.data.prepare data/ko/*.jsonl data/en --mix ko=0.7,en=0.3 --vocab-size 32000

Writes ``datasets/mixed_pretraining.jsonl`` (+ ``.stats.json`` beside it) and
``datasets/prepared/mixed_pretraining/`` (tokenizer, train/val token files,
meta.json). Re-running on unchanged input reuses everything and says so.

The trainer calls :func:`ensure_training_data`, which finds the data, builds
or reuses the prepared folder, and in test mode falls back to a dummy corpus.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from koen_sllm.config import DEFAULT_DATA_FILE, repo_root
from koen_sllm.data import DataError
from koen_sllm.data.build import (FORMAT_VERSION, build_prepared, check_cache, check_outputs, describe_meta,
                                  read_meta)
from koen_sllm.data.dummy import write_dummy_corpus
from koen_sllm.data.ingest import find_input_files
from koen_sllm.data.locate import DATA_SUFFIXES, dataset_root, find_dataset_files, find_prepared_only
from koen_sllm.data.mix import DEFAULT_MIX, parse_mix, write_mixed_corpus
from koen_sllm.data.tokenizer_training import DEFAULT_MAX_LINES
from koen_sllm.tokenizer import DEFAULT_MODEL_TYPE, MODEL_TYPES, KoEnTokenizer, TokenizerError

__all__ = ["DataError", "PreparedData", "ensure_training_data", "find_dataset_files", "main"]

PREPROCESS_COMMAND = "scripts/run_preprocessing.sh --recipe1 YOUR_FILES (= python -m koen_sllm.data.prepare YOUR_FILES)"


@dataclass
class PreparedData:
    tokenizer_dir: Path
    train_file: Path
    val_files: dict  # lang -> Path; a language may be missing
    meta: dict
    used_dummy: bool
    prepared_dir: Optional[Path] = None


def _candidates(files: list[Path], work_dir: Path) -> list[Path]:
    """Where a prepared folder may live: beside the data first, then under the work folder.

    One file F -> F's folder/prepared/<F's stem>; the files of a folder D ->
    D/prepared/all_files. The work-folder name carries a hash of the paths so
    that two datasets never share a folder.
    """
    if len(files) == 1:
        stem, beside = files[0].name.split(".")[0], files[0].parent / "prepared"
    else:
        stem, beside = "all_files", files[0].parent / "prepared"
    key = hashlib.sha256("\n".join(str(p.resolve()) for p in files).encode()).hexdigest()[:10]
    return [beside / stem, work_dir / "prepared" / f"{stem}-{key}"]


def _writable(folder: Path) -> bool:
    """Whether ``folder`` can be created and written, judged by its nearest existing ancestor.

    The mode bits are checked as well as access(): root may write anywhere, but a
    folder marked read-only (shared data) must not collect our files.
    """
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK) and bool(probe.stat().st_mode & 0o222)


@contextmanager
def _locked(folder: Path):
    """One builder at a time: other ranks or runs wait here, then find the cache.

    A read-only location (prepared data shipped on a shared disk) cannot hold
    a lock file, and nothing can be built there either: it is only read.
    """
    if not _writable(folder.parent):
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    handle = open(folder.parent / f".{folder.name}.lock", "w")
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _raw_hint(path: Path) -> str:
    """Raw corpora in <folder>/raw/ are inputs of the preprocessing command, not training data."""
    raw = path / "raw"
    if raw.is_dir() and any(p.name.endswith(DATA_SUFFIXES) for p in raw.iterdir()):
        return f"{raw} holds raw corpora: prepare them with scripts/run_preprocessing.sh --recipe1"
    return ""


def _loud_dummy_warning(path: Path, dummy: Path, log: Callable[[str], None]) -> None:
    bar = "#" * 78
    hint = _raw_hint(path)
    for line in (bar, "#  WARNING: NO TRAINING DATA FOUND at", f"#    {path}", *([f"#  {hint}"] if hint else []),
                 "#  경고: 학습 데이터가 없어 더미(가짜) 코퍼스를 사용합니다.",
                 "#  Using a DUMMY Korean/English corpus generated from templates. This run",
                 "#  only checks that the pipeline works; the model learns nothing useful.",
                 f"#  dummy corpus: {dummy}",
                 f"#  real data: {PREPROCESS_COMMAND}", bar):
        log(line)


def _result(prepared: Path, meta: dict, used_dummy: bool) -> PreparedData:
    val = {name[len("val_"):]: prepared / split["file"] for name, split in meta["splits"].items()
           if name.startswith("val_") and split["tokens"] > 0}
    return PreparedData(prepared / "tokenizer", prepared / meta["splits"]["train"]["file"], val, meta,
                        used_dummy, prepared)


def _use_prepared_only(prepared: Path, *, val_fraction: float, tokenizer: Optional[KoEnTokenizer], force: bool,
                       log: Callable[[str], None]) -> PreparedData:
    """A prepared folder given without its corpus: checked against its own meta.json and used as it is."""
    fix = f"copy the whole folder again, or prepare it from the corpus with {PREPROCESS_COMMAND}"
    if force:
        raise DataError(f"{prepared} holds prepared data without its corpus, so it cannot be rebuilt: "
                        "pass --dataset-path the corpus to rebuild it")
    meta, why = read_meta(prepared)
    made_by = (meta.get("settings") or {}).get("format") if isinstance(meta, dict) else None
    if meta is None or made_by is None:
        raise DataError(f"{prepared} cannot be used: {why or 'meta.json names no format version'}; {fix}")
    if made_by != FORMAT_VERSION:
        raise DataError(f"{prepared} was prepared in format {made_by} and this version reads format "
                        f"{FORMAT_VERSION}: prepare it again from the corpus with {PREPROCESS_COMMAND}")
    why = check_outputs(prepared, meta, tokenizer)
    if why:
        raise DataError(f"{prepared} cannot be used: {why}; {fix}")
    log(f"using the prepared data in {prepared} as it is (no corpus beside it to check it against)")
    if meta["settings"].get("val_fraction") != float(val_fraction):
        log(f"note: --val-fraction {val_fraction} does not apply: this data was split with "
            f"{meta['settings'].get('val_fraction')} when it was prepared")
    log(describe_meta(meta))
    return _result(prepared, meta, bool(meta.get("used_dummy")))


def ensure_training_data(
    dataset_path,
    *,
    mode: str,
    vocab_size: int,
    val_fraction: float,
    num_proc: int,
    strict: bool,
    tokenizer_path=None,
    work_dir=None,
    log: Callable[[str], None] = print,
    model_type: str = DEFAULT_MODEL_TYPE,
    force: bool = False,
    tokenizer_max_lines: int = DEFAULT_MAX_LINES,
) -> PreparedData:
    """Token files and tokenizer for ``dataset_path``, built once and then reused.

    ``dataset_path`` is a file or a folder (its mixed_pretraining.jsonl, else all
    its *.jsonl/*.txt), or, without any of those, a prepared folder (or the folder whose
    prepared/ holds exactly one), used as it is. With no data, ``mode="test"`` uses the dummy corpus under
    ``work_dir`` (default outputs/) and ``mode="train"`` raises DataError.
    ``vocab_size``/``model_type`` only matter when a tokenizer must be trained.
    """
    if mode not in ("test", "train"):
        raise ValueError(f"mode must be 'test' or 'train', got {mode!r}")
    path = dataset_root(dataset_path)
    work_dir = Path(work_dir) if work_dir else repo_root() / "outputs"
    files, used_dummy = find_dataset_files(path), False
    shipped = None if files else find_prepared_only(path)
    if shipped is not None:
        tokenizer = KoEnTokenizer.load(tokenizer_path) if tokenizer_path else None
        return _use_prepared_only(shipped, val_fraction=val_fraction, tokenizer=tokenizer, force=force, log=log)
    if not files:
        if mode == "train":
            hint = _raw_hint(path)
            raise DataError(f"no training data at {path}: expected {path / DEFAULT_DATA_FILE} or *.jsonl/*.txt "
                            f"files there. " + (f"{hint}." if hint else
                                                f"Create it with {PREPROCESS_COMMAND}, or pass --dataset-path"))
        files, used_dummy = [write_dummy_corpus(work_dir / "dummy_data")], True
        _loud_dummy_warning(path, files[0], log)
    tokenizer = KoEnTokenizer.load(tokenizer_path) if tokenizer_path else None
    settings = {"format": FORMAT_VERSION, "val_fraction": float(val_fraction)}
    candidates = _candidates(files, work_dir)
    for prepared in candidates:
        if not (prepared / "meta.json").is_file() or force:
            continue
        with _locked(prepared):
            meta, why = check_cache(prepared, files, settings, tokenizer, strict)
        if meta is not None:
            log(f"reusing prepared data in {prepared} (input unchanged)")
            if tokenizer is None and meta["tokenizer"]["requested_vocab_size"] != vocab_size:
                log(f"note: the prepared tokenizer has {meta['vocab_size']:,} pieces (--vocab-size {vocab_size:,} "
                    f"applies only when one is trained; --force or deleting {prepared} retrains)")
            log(describe_meta(meta))
            return _result(prepared, meta, used_dummy)
        log(f"rebuilding {prepared}: {why}")
    target = next((p for p in candidates if _writable(p)), None)
    if target is None:
        raise DataError(f"cannot write prepared data: neither {candidates[0]} nor {candidates[1]} is writable; "
                        "pass a writable work folder")
    with _locked(target):
        meta, _ = (None, "") if force else check_cache(target, files, settings, tokenizer, strict)
        if meta is None:  # another process may have finished it while we waited for the lock
            meta = build_prepared(files, target, settings=settings, vocab_size=vocab_size, model_type=model_type,
                                  tokenizer=tokenizer, num_proc=num_proc, strict=strict, used_dummy=used_dummy,
                                  tokenizer_max_lines=tokenizer_max_lines, log=log)
    log(describe_meta(meta))
    return _result(target, meta, used_dummy)


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one DataError line instead of usage text."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise DataError(f"{message} (see python -m koen_sllm.data.prepare --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m koen_sllm.data.prepare",
        description="Mix JSONL/txt corpora, train the tokenizer and write token files (see docs/data.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="JSONL/.txt files, folders or globs (default: datasets/raw/)")
    p.add_argument("--recipe1", action="store_true", help=f"the default Korean/English mix ({DEFAULT_MIX})")
    p.add_argument("--output", default=None, help=f"mixed corpus (default: datasets/{DEFAULT_DATA_FILE})")
    p.add_argument("--mix", default=DEFAULT_MIX, help="target character shares KEY=W,...; 'natural' keeps all")
    p.add_argument("--mix-by", choices=("lang", "source"), default="lang", help="what the --mix keys name")
    p.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary (capped to what the data supports)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=DEFAULT_MODEL_TYPE, help="SentencePiece algorithm")
    p.add_argument("--tokenizer-path", help="use this tokenizer instead of training one")
    p.add_argument("--tokenizer-max-lines", type=int, default=DEFAULT_MAX_LINES,
                   help="lines of the training split the tokenizer trains on at most (a reproducible sample "
                        "when there are more; its memory grows with it); 0 = all")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out per language")
    p.add_argument("--num-proc", type=int, default=0, help="tokenization processes (0 = all cores)")
    p.add_argument("--seed", type=int, default=1234, help="document sampling and shuffling")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    p.add_argument("--no-shards", action="store_true", help="write the mixed corpus only")
    return p


def _log(message: str) -> None:
    """A line at once, also into a pipe or a file (nohup, tee, a CI log), where print alone
    would hold it in an 8 KB buffer until the next ones or the end."""
    print(message, flush=True)


def run(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = _log) -> int:
    args = build_parser().parse_args(argv)
    if args.vocab_size < 300:
        raise DataError(f"--vocab-size {args.vocab_size} is too small; use at least 300 (byte fallback needs 259)")
    if args.tokenizer_max_lines < 0:
        raise DataError(f"--tokenizer-max-lines {args.tokenizer_max_lines} must be 0 (all lines) or more")
    if not 0.0 <= args.val_fraction < 0.5:
        raise DataError(f"--val-fraction {args.val_fraction} must lie in [0, 0.5)")
    output = Path(args.output) if args.output else repo_root() / "datasets" / DEFAULT_DATA_FILE
    inputs = args.inputs or [str(repo_root() / "datasets" / "raw")]
    if not args.inputs and not Path(inputs[0]).is_dir():
        raise DataError(f"no inputs given and {inputs[0]} does not exist: pass JSONL/txt files, folders or globs, "
                        "e.g. scripts/run_preprocessing.sh --recipe1 data/*.jsonl, or put them in datasets/raw/")
    files = find_input_files(inputs, exclude=[output])
    if args.recipe1 and args.mix != DEFAULT_MIX:
        raise DataError(f"--recipe1 means --mix {DEFAULT_MIX}; give one of --recipe1 and --mix {args.mix}")
    weights = parse_mix(args.mix)
    write_mixed_corpus(files, output, weights, mix_by=args.mix_by, seed=args.seed, strict=args.strict,
                       force=args.force, log=log)
    if args.no_shards:
        return 0
    prepared = ensure_training_data(output, mode="train", vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                                    num_proc=args.num_proc, strict=args.strict, tokenizer_path=args.tokenizer_path,
                                    log=log, model_type=args.model_type, force=args.force,
                                    tokenizer_max_lines=args.tokenizer_max_lines)
    log(f"done: tokenizer {prepared.tokenizer_dir}, train tokens {prepared.train_file}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run(argv)
    except (DataError, TokenizerError, OSError) as exc:  # OSError: names the file (unreadable input, full disk)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a build says what it kept and how to resume
        print(str(exc) or "interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
