"""Atomic checkpoints: how a model directory is written, checked and read back.

The trainer decides when to save and gathers the state (rank 0 only); this
module decides how it is stored. A checkpoint is a model directory that
transformers loads offline (config.json, model.safetensors, tokenizer files)
plus training_info.json, trainer_state.pt and manifest.json. docs/checkpoints.md
describes the layout and what survives a crash.

Why the steps are ordered as they are:
- everything is written into ``root/.tmp-<name>-<pid>`` and fsynced; the
  manifest (size and sha256 of every file) is written last, so a directory
  whose files do not match its manifest is known to be partial or damaged;
- ``os.rename`` publishes the directory in one step, and only then is the
  ``latest`` pointer (a plain file, which works on every filesystem, unlike
  symlinks) replaced with ``os.replace``; a crash at any instant therefore
  leaves ``latest`` naming a complete checkpoint;
- the trainer state is read back with ``torch.load(weights_only=True)``, so it
  may hold only tensors and plain Python values; that is checked before writing
  anything, because finding out at resume time would be too late.

One writer per output directory: a save removes every stale ``.tmp-*`` entry.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from koen_sllm.checkpoint.atomic_io import (
    TRASH_PREFIX, fsync_path, hash_file, io_message, parallel_map, publish_dir, reason, remove_path,
    restore_trash, sync_tree, write_text,
)
from ..errors import KoenError

_LOG = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_INFO_FILE = "training_info.json"
TRAINER_STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
INITIAL_MODEL = "initial_model"

_TMP = ".tmp-"  # a save in progress (or one that crashed)
_DELETE = ".del-"  # a checkpoint being removed by retention
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")
# The files a checkpoint writes itself; anything else in a model directory (tokenizer files) is copied.
CHECKPOINT_OWN_FILES = frozenset({MODEL_FILE, CONFIG_FILE, TRAINING_INFO_FILE, TRAINER_STATE_FILE, MANIFEST_FILE, LATEST_FILE})
_INTACT = "earlier checkpoints are intact"
# The Korean halves of the one-line "<Korean> / <English>" errors a user meets at start-up, worded
# like the launcher's; the English half names the path and the fix.
KO_NO_CHECKPOINT = "체크포인트가 없습니다"
KO_BAD_CHECKPOINT = "사용할 수 없는 체크포인트입니다"
KO_CANNOT_RESUME = "이어서 학습할 수 없습니다"
KO_NO_OUTPUT_DIR = "출력 폴더를 만들 수 없습니다"
KO_READ_ONLY = "출력 폴더에 쓸 수 없습니다"
KO_NO_SPACE = "디스크 공간이 부족합니다"
_LISTED = 8  # checkpoints named in a --resume error; more would not fit on one line


class CheckpointError(KoenError, RuntimeError):
    """A checkpoint could not be written or read; the message says what, where and the fix."""


# ---------------------------------------------------------------- saving


def save_checkpoint(
    root: Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor],
    hf_config: dict,
    tokenizer_dir: Optional[Path],
    training_info: dict,
    trainer_state: Optional[dict] = None,
    extra_writer: Optional[Callable[[Path], None]] = None,
    update_latest: bool = True,
    keep_last: Optional[int] = None,
) -> Path:
    """Write ``root/name`` atomically and return its path.

    ``model_state`` holds HF-named tensors (tied copies already dropped);
    ``extra_writer(tmp_dir)`` lets another backend (DeepSpeed) add its files
    before the rename. On any failure the temporary directory is removed,
    earlier checkpoints and ``latest`` are untouched, and CheckpointError says
    what failed. ``keep_last`` keeps the newest K ``checkpoint-<step>``
    directories, never the one ``latest`` names, ``initial_model`` or ``name``.
    """
    root = Path(root)
    _check_name(name)
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last must be at least 1, got {keep_last} (--save-total-limit)")
    if trainer_state is not None:
        check_weights_only(trainer_state)
    tensors = _cpu_tensors(model_state)
    tok_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []
    try:
        root.mkdir(parents=True, exist_ok=True)
        _recover(root)
    except OSError as exc:
        raise CheckpointError(io_message(exc, root, root, "--output-dir", _INTACT)) from exc
    final, tmp = root / name, root / f"{_TMP}{name}-{os.getpid()}"
    where = tmp
    try:
        tmp.mkdir()
        where = tmp / MODEL_FILE
        save_file(tensors, str(where), metadata={"format": "pt"})
        where = tmp / CONFIG_FILE
        write_text(where, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        where = tmp / TRAINING_INFO_FILE
        write_text(where, json.dumps(training_info, indent=2, ensure_ascii=False, default=str) + "\n")
        if trainer_state is not None:
            where = tmp / TRAINER_STATE_FILE
            with open(where, "wb") as f:
                torch.save(trainer_state, f)
        for src in tok_files:
            where = tmp / src.name
            shutil.copyfile(src, where)
        if extra_writer is not None:
            where = tmp
            extra_writer(tmp)
        where = tmp
        files = sync_tree(tmp)
        where = tmp / MANIFEST_FILE
        manifest = {
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
            "files": files,
        }
        write_text(where, json.dumps(manifest, indent=2) + "\n")
        fsync_path(tmp)
        where = final
        publish_dir(tmp, final)
    except BaseException as exc:
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            remove_path(tmp)
            raise
        message = io_message(exc, where, root, "--output-dir", _INTACT)  # before the partial files go
        remove_path(tmp)
        raise CheckpointError(message) from exc
    if update_latest:
        _write_latest(root, name)
    if keep_last is not None:
        _apply_retention(root, keep_last, protect={name})
    return final


def check_weights_only(obj: Any, where: str = "trainer_state") -> None:
    """Raise CheckpointError unless ``torch.load(weights_only=True)`` can read ``obj`` back.

    Walking the structure (rather than test-loading a serialized copy) costs
    no memory for multi-GB optimizer states and names the offending entry.
    """
    kind = type(obj)
    if kind in _PLAIN or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in (dict, OrderedDict, Counter):
        for key, value in obj.items():
            check_weights_only(key, f"{where} key {key!r}")
            check_weights_only(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            check_weights_only(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "refuses; store tensors or plain Python values instead (numpy: x.tolist() or torch.from_numpy(x))"
    )


_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)


def _check_name(name: str) -> None:
    if not name or "/" in name or os.sep in name or name.startswith(".") or name == LATEST_FILE:
        raise CheckpointError(f"checkpoint name {name!r} is invalid; use a plain name such as 'checkpoint-500'")


def _cpu_tensors(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their memory, as safetensors needs."""
    out, seen = {}, {}
    for key, t in model_state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model_state[{key!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer (e.g. a flat parameter)
        if t.numel() and t.data_ptr() in seen:
            raise CheckpointError(
                f"model_state[{key!r}] shares memory with {seen[t.data_ptr()]!r} (tied weights); "
                "drop the tied copy before saving, as transformers does"
            )
        seen[t.data_ptr()] = key
        out[key] = t
    return out


def _tokenizer_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise CheckpointError(f"tokenizer directory {directory} does not exist; pass the folder holding tokenizer.model")
    # Our own files win over same-named ones; hidden files are caches and locks.
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in CHECKPOINT_OWN_FILES and not p.name.startswith("."))
    if not files:
        raise CheckpointError(f"tokenizer directory {directory} holds no files; pass the folder holding tokenizer.model")
    return files


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{_TMP}{LATEST_FILE}-{os.getpid()}"
    try:
        write_text(tmp, name + "\n")
        os.replace(tmp, root / LATEST_FILE)
        fsync_path(root)
    except Exception as exc:
        remove_path(tmp)
        raise CheckpointError(
            f"{root / name} is saved but replacing {root / LATEST_FILE} failed ({reason(exc)}); "
            f"'latest' still names the previous checkpoint; fix the disk or resume with --resume {root / name}"
        ) from exc


def _apply_retention(root: Path, keep_last: int, protect: set[str]) -> None:
    keep = set(protect) | {INITIAL_MODEL}
    latest = read_latest(root)
    if latest:
        keep.add(latest)
    for i, path in enumerate(_step_dirs(root)):
        if i < keep_last or path.name in keep:
            continue
        doomed = root / f"{_DELETE}{path.name}-{os.getpid()}"
        try:  # renamed first, so a crash mid-delete never leaves a half checkpoint under a real name
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        except OSError as exc:
            _LOG.warning("could not remove old checkpoint %s (%s); remove it by hand", path, reason(exc))


def _recover(root: Path) -> None:
    """Clean up after a save that crashed: drop temp dirs, put a moved-aside copy back."""
    for entry in root.iterdir():
        if entry.name.startswith((_TMP, _DELETE)):
            remove_path(entry)
        elif entry.name.startswith(TRASH_PREFIX):
            restore_trash(entry)  # the crash fell between moving the old copy aside and the rename


# ---------------------------------------------------------------- reading


def read_latest(root: Path) -> Optional[str]:
    """The checkpoint name ``root/latest`` holds, or None when there is no usable pointer."""
    try:
        name = (Path(root) / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and "/" not in name and not name.startswith(".") else None


def verify_checkpoint(path: Path, *, check_hashes: bool = True) -> tuple[bool, str]:
    """(ok, reason): every file in manifest.json is present with its size and sha256."""
    path = Path(path)
    if not path.is_dir():
        return False, f"{path} does not exist" if not path.exists() else f"{path} is not a directory"
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        entries = [(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"]]
    except FileNotFoundError:
        return False, "no manifest.json (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"manifest.json is unreadable ({reason(exc)})"
    listed = {rel for rel, _, _ in entries}
    for need in (MODEL_FILE, CONFIG_FILE):
        if need not in listed:
            return False, f"manifest.json does not list {need}"
    for rel, size, _ in entries:
        file = path / rel
        if rel.startswith("/") or ".." in Path(rel).parts or not file.is_file():
            return False, f"{rel} is missing"
        if file.stat().st_size != size:
            return False, f"{rel} has {file.stat().st_size} bytes, the manifest says {size} (truncated)"
    if check_hashes:
        actual = parallel_map(lambda e: hash_file(path / e[0])[1], entries)
        for (rel, _, sha), got in zip(entries, actual):
            if got != sha:
                return False, f"{rel} fails its sha256 check (corrupt)"
    total = sum(size for _, size, _ in entries)
    return True, f"ok ({len(entries)} files, {total / 2**20:.1f} MiB)"


def _step_dirs(root: Path) -> list[Path]:
    """``checkpoint-<step>`` directories, newest step first."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]


def resolve_resume(spec: str, root: Path, log: Callable[[str], None] = _LOG.warning) -> Optional[Path]:
    """What to resume from: ``"none"`` -> None; ``"auto"`` -> ``latest`` if valid, else the
    newest valid ``checkpoint-<step>`` (with a warning), else None; a path -> that checkpoint
    (or, for a run directory holding ``latest``, resolved like auto). An explicit path that is
    missing or invalid raises CheckpointError.
    """
    spec = str(spec).strip()
    if spec == "none":
        return None
    if spec == "auto":
        return _resolve_auto(Path(root), log)
    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and (Path(root) / path).exists():
        path = Path(root) / path  # --resume checkpoint-500 means the one under --output-dir
    if not path.exists():
        root = Path(root)
        if not path.is_absolute():  # name the place a bare name was looked for last, or the full path
            path = root / path if len(path.parts) == 1 else path.resolve()
        names = checkpoint_names(root)
        listed = ", ".join(names[:_LISTED]) + (f" (and {len(names) - _LISTED} older)" if len(names) > _LISTED else "")
        if names:
            fix = f"checkpoints in {root}: {listed}; pass one of them, 'auto' or 'none'"
        else:
            gone = "" if root.is_dir() else " (the folder does not exist)"
            fix = f"checkpoints in {root}: none{gone}; pass a checkpoint directory, 'auto' or 'none'"
        raise CheckpointError(f"{KO_NO_CHECKPOINT} / --resume {spec}: {path} does not exist; {fix}")
    if path.is_dir() and not (path / MANIFEST_FILE).exists() and (path / LATEST_FILE).is_file():
        found = _resolve_auto(path, log)
        if found is None:
            raise CheckpointError(f"{KO_NO_CHECKPOINT} / --resume {spec}: no valid checkpoint in {path}; "
                                  "pass another one or 'none'")
        return found
    ok, why = verify_checkpoint(path)
    if not ok:
        raise CheckpointError(f"{KO_BAD_CHECKPOINT} / --resume {spec}: {path} is not a usable checkpoint ({why}); "
                              "pass another checkpoint, 'auto' or 'none'")
    return path


def checkpoint_names(root: Path) -> list[str]:
    """The checkpoint directories in ``root`` by name: ``checkpoint-<step>`` newest first, then
    ``initial_model`` (step 0). Names only, unverified: this is for telling the user what exists."""
    root = Path(root)
    names = [p.name for p in _step_dirs(root)]
    if (root / INITIAL_MODEL).is_dir():
        names.append(INITIAL_MODEL)
    return names


def _resolve_auto(root: Path, log: Callable[[str], None]) -> Optional[Path]:
    if not root.is_dir():
        return None
    latest, tried = read_latest(root), set()
    if latest:
        tried.add(latest)
        for candidate in [root / latest, *sorted(root.glob(f"{TRASH_PREFIX}{latest}-*"))]:
            ok, why = verify_checkpoint(candidate)
            if ok:
                if candidate.name != latest:
                    log(f"{root / latest} was being replaced when the last save stopped; using {candidate}")
                return candidate
            if candidate.name == latest:
                log(f"{root / LATEST_FILE} names {latest}, which is not usable ({why}); "
                    "looking for the newest valid checkpoint")
    elif (root / LATEST_FILE).exists():
        log(f"{root / LATEST_FILE} is unreadable or empty; looking for the newest valid checkpoint")
    for path in _step_dirs(root):
        if path.name in tried:
            continue
        ok, why = verify_checkpoint(path)
        if ok:
            if not latest:
                log(f"no usable 'latest' pointer in {root}; resuming from the newest valid checkpoint {path.name}")
            return path
        log(f"skipping {path}: {why}")
    return None


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; pass a checkpoint or model directory")
    try:
        return load_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"cannot read {file} ({reason(exc)}); the file is damaged, use another checkpoint") from exc


def load_trainer_state(path: Path) -> dict:
    file = Path(path) / TRAINER_STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{KO_CANNOT_RESUME} / {file} is missing: {path} holds a model only (initial_model "
                              "or an export); resume from a checkpoint-<step> directory or use --resume none")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {file} with weights_only=True ({reason(exc)}); "
                              "it is damaged or holds more than tensors and plain values") from exc


def load_training_info(path: Path) -> dict:
    file = Path(path) / TRAINING_INFO_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file} ({reason(exc)}); pass a checkpoint directory") from exc


# ---------------------------------------------------------------- disk checks


def estimate_checkpoint_bytes(num_params: int, with_optimizer: bool = True, moment_bytes: int = 4) -> int:
    """Bytes one checkpoint takes: fp32 weights, two AdamW moments as the optimizer holds them
    (``moment_bytes`` each: 4 for fp32, 2 for bf16), plus slack for tokenizer, JSON, RNG states and
    filesystem rounding."""
    per_param = 4 + (2 * moment_bytes if with_optimizer else 0)
    body = num_params * per_param
    return int(body * 1.02) + (64 << 20)


def check_output_dir(root: Path, need_bytes: int, *, per_checkpoint_bytes: Optional[int] = None) -> None:
    """Create ``root`` if needed; raise CheckpointError if it is unwritable or short of space.

    A save writes the new checkpoint before retention removes an old one, so
    ``need_bytes`` should cover (--save-total-limit + 1) checkpoints.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{KO_NO_OUTPUT_DIR} / cannot create output directory {root} ({reason(exc)}); "
                              "pass --output-dir PATH on a writable disk") from exc
    probe = root / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        remove_path(probe)
        raise CheckpointError(f"{KO_READ_ONLY} / output directory {root} is not writable ({reason(exc)}); "
                              "fix its permissions or pass --output-dir PATH on a writable disk") from exc
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        each = f" (one checkpoint is about {_gib(per_checkpoint_bytes)})" if per_checkpoint_bytes else ""
        raise CheckpointError(
            f"{KO_NO_SPACE} / only {_gib(free)} free on the disk holding {root}, but checkpoints need about "
            f"{_gib(need_bytes)}{each}; free space, lower --save-total-limit or pass --output-dir on a larger disk"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class CheckpointTarget:
    """Where and how a run saves: plain values, so the checkpoint layer never reads the trainer."""
    output_dir: Path
    tokenizer_dir: Path
    hf_config: dict[str, Any]
    keep_last: Optional[int]
