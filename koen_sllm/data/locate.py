"""Where a run's data is: the corpus files under --dataset-path, or a prepared folder shipped alone.

On a cluster the raw corpus often stays where it was prepared and only the prepared folder
(tokenizer, token files, meta.json) is copied to the nodes' volume: the token files are what
training reads, and they are a fraction of the corpus's size. Such a folder is used as it is.

Standard library only: the launcher asks these questions before any package is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from koen_sllm.config import DEFAULT_DATA_FILE, repo_root
from koen_sllm.data import DataError

DATA_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
PREPARED_META = "meta.json"


def dataset_root(dataset_path: Optional[Path]) -> Path:
    """--dataset-path as a Path; unset: the checkout's datasets/."""
    return Path(dataset_path) if dataset_path else repo_root() / "datasets"


def find_dataset_files(dataset_path: Optional[Path]) -> list[Path]:
    """A file -> [file]; a folder -> its mixed_pretraining.jsonl, else all its *.jsonl/*.txt; else []."""
    path = dataset_root(dataset_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / DEFAULT_DATA_FILE).is_file():
            return [path / DEFAULT_DATA_FILE]
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.name.endswith(DATA_SUFFIXES) and not p.name.startswith("."))
    return []


def find_prepared_only(dataset_path: Optional[Path]) -> Optional[Path]:
    """The prepared folder to train on in ``dataset_path``, which holds no corpus files
    (:func:`find_dataset_files` found none), else None.

    ``dataset_path`` may be the prepared folder itself (it has meta.json) or the folder the
    preprocessing wrote into (``<path>/prepared/<name>/``). Several prepared folders there and
    no corpus to say which one: a DataError that lists them.
    """
    path = dataset_root(dataset_path)
    if not path.is_dir():
        return None
    if (path / PREPARED_META).is_file():
        return path
    below = path / "prepared"
    found = sorted(p.parent for p in below.glob(f"*/{PREPARED_META}")
                   if not p.parent.name.startswith(".")) if below.is_dir() else []  # .<name>.build: unfinished
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise DataError(f"no corpus in {path} and {len(found)} prepared folders under {below} ({names}): "
                        "pass --dataset-path the one to train on")
    return found[0] if found else None
