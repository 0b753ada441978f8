"""Durable filesystem primitives: fsynced writes, directory publishing, hashing.

Kept apart from store.py, which holds the checkpoint layout and policy
(what goes where, retention, resume rules); this module only knows how to put
bytes on disk so that a crash leaves either the old or the new state, and how
to turn an I/O failure into one line that says what to do.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

TRASH_PREFIX = ".trash-"  # an older copy moved aside while a same-named directory replaces it


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 file and fsync it before returning."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries are what a rename changes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; the files themselves are synced
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR) or not path.is_dir():
            raise
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file or directory tree if present; never raises (used on cleanup paths)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass


def hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file, optionally fsyncing it first through the same descriptor."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def parallel_map(fn: Callable, items: list) -> list:
    # hashlib and fsync release the GIL, so threads spread large files over several cores.
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def sync_tree(directory: Path, hashes: bool = True) -> list[dict]:
    """fsync every file and directory under ``directory``.

    With ``hashes`` returns one ``{"path", "size", "sha256"}`` entry per file
    (paths relative, POSIX-style, sorted), read back from disk after the fsync.
    """
    paths = sorted(p for p in directory.rglob("*") if p.is_file())

    def one(path: Path) -> dict:
        if not hashes:
            fsync_path(path)
            return {}
        size, sha = hash_file(path, fsync=True)
        return {"path": path.relative_to(directory).as_posix(), "size": size, "sha256": sha}

    entries = parallel_map(one, paths)
    for d in sorted({p.parent for p in paths} | {directory}, key=lambda p: len(p.parts), reverse=True):
        fsync_path(d)
    return entries if hashes else []


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished ``tmp`` directory to ``final`` and fsync the parent.

    POSIX cannot rename a directory over a non-empty one, so an existing
    ``final`` is first moved aside to ``.trash-<name>-<pid>`` and removed once
    the new one is in place. A crash between the two renames leaves the old copy
    under the trash name; ``restore_trash`` puts it back.
    """
    trash = final.parent / f"{TRASH_PREFIX}{final.name}-{os.getpid()}"
    if final.exists():
        remove_path(trash)
        os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except BaseException:
        if trash.exists() and not final.exists():
            os.rename(trash, final)
        raise
    fsync_path(final.parent)
    remove_path(trash)


def restore_trash(entry: Path) -> None:
    """Put a moved-aside ``.trash-<name>-<pid>`` back when ``<name>`` is missing, else delete it."""
    original = entry.parent / entry.name[len(TRASH_PREFIX):].rsplit("-", 1)[0]
    if original.exists():
        remove_path(entry)
    else:
        os.rename(entry, original)


def reason(exc: BaseException) -> str:
    """A one-line description of an exception."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def error_code(exc: BaseException):
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports I/O failures as SafetensorError("... (os error 28) ...")
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code


def _nearly_full(path: Path, margin: int = 16 << 20) -> bool:
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


def io_message(exc: BaseException, where: Path, root: Path, option: str, intact: str) -> str:
    """What failed, where, and the fix, for a failure while writing ``where`` under ``root``.

    ``option`` is the command-line option that moves the output; ``intact``
    says what the failure left untouched. Call it before removing the partial
    files: a disk that is (nearly) full at that moment is taken as the cause when
    the exception carries no errno.
    """
    code = error_code(exc)
    if code is None and not isinstance(exc, (TypeError, ValueError, KeyError)) and _nearly_full(root):
        code = errno.ENOSPC  # torch.save reports a full disk as "unexpected pos ..." without an errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{what} while writing {where}: free space or point {option} elsewhere; {intact}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{os.strerror(code).lower()} while writing {where}: make {root} writable "
                f"or point {option} elsewhere; {intact}")
    if code == errno.EIO:
        return f"I/O error while writing {where}: check the disk (dmesg) or point {option} elsewhere; {intact}"
    if code is None:  # not an I/O error (e.g. a value JSON cannot encode): nothing to move
        return f"{reason(exc)} while writing {where}; {intact}"
    return f"{reason(exc)} while writing {where}: fix the cause or point {option} elsewhere; {intact}"
