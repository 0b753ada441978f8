"""Robust reading of JSONL and plain-text corpora into clean documents.

One bad line never aborts a file. Every line that is skipped or repaired is
counted per reason (rules below and in docs/data.md), and the first line
numbers per reason are named in a warning. ``strict=True`` stops at the first
line that would be skipped. A file from which nothing loads is an error.

Skipped (reason: rule)
  malformed_json / not_object / missing_text / non_string_text: the line is dropped
  empty_text: "text" empty or whitespace only after cleaning
  not_utf8: more than 10% of the line's bytes are invalid UTF-8 (another encoding)
  too_long: a line over MAX_LINE_BYTES (read in bounded pieces, never held whole)
  too_deep: JSON nested deeper than Python's recursion limit (about 1,000 levels)
  number_too_long: an integer with more digits than Python converts (4,300 by default)
  blank_line: an empty JSONL line (harmless, not reported by --strict)
Repaired
  bom: a UTF-8 byte-order mark at a line start is removed
  crlf: CRLF or lone CR becomes LF
  invalid_utf8: up to 10% invalid bytes in a line are dropped
  control_chars: NUL, other C0/C1 controls (except TAB and LF), DEL and U+FEFF are removed
  lone_surrogates: unpaired \\udXXX escapes are removed
  nfc: text is normalized to NFC (NFD files from macOS)
  no_final_newline: the last line had no newline (read as usual)
Damaged files (DAMAGE below)
  A .gz whose compressed stream breaks off keeps the documents read before the
  damage; the rest of that file is skipped with one warning naming the file and
  the last line read, and the summary lists the file. ``strict=True`` raises.
Documents are trimmed of surrounding whitespace; exact duplicates (after
cleaning) are dropped and counted. In .txt files, blank lines separate documents.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from koen_sllm.checkpoint.atomic_io import hash_file
from koen_sllm.data import DataError
from koen_sllm.data.locate import DATA_SUFFIXES
from koen_sllm.data.progress import Progress
from koen_sllm.tokenizer import normalize_text

MAX_LINE_BYTES = 64 << 20
MAX_EXAMPLES = 5
BAD_UTF8_SHARE = 0.10

SKIP_REASONS = {
    "malformed_json": "not valid JSON",
    "not_object": "the JSON value is not an object",
    "missing_text": 'no "text" field',
    "non_string_text": '"text" is not a string',
    "empty_text": '"text" is empty or only whitespace',
    "not_utf8": "mostly invalid UTF-8 (another encoding? convert with: iconv -f cp949 -t utf-8)",
    "too_long": f"line longer than {MAX_LINE_BYTES >> 20} MiB",
    "too_deep": "JSON nested deeper than Python's recursion limit (about 1,000 levels)",
    "number_too_long": "a JSON integer with more digits than Python converts (4,300 by default)",
    "blank_line": "blank line",
}
REPAIRS = {
    "bom": "byte-order mark removed",
    "crlf": "CR/CRLF turned into LF",
    "invalid_utf8": "invalid UTF-8 bytes dropped",
    "control_chars": "control characters removed",
    "lone_surrogates": "unpaired surrogates removed",
    "nfc": "normalized to NFC",
    "no_final_newline": "no newline after the last line",
}

# How a compressed stream can break off; {where} is "after line N" or "at the start".
DAMAGE = {
    "gzip_truncated": "compressed stream ends early {where} (truncated file?)",
    "gzip_corrupt": "compressed data is corrupt {where} ({detail})",
    "not_gzip": "not gzip data (a plain file named .gz? rename it without .gz)",
}
# What gzip raises on such a stream (BadGzipFile is an OSError, the others are not).
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LATIN = re.compile("[A-Za-z\u00c0-\u024f]")
_LANG_ALIASES = {"kor": "ko", "korean": "ko", "kr": "ko", "ko-kr": "ko",
                 "eng": "en", "english": "en", "en-us": "en", "en-gb": "en"}


@dataclass
class Document:
    text: str
    lang: str
    source: str


@dataclass
class FileStats:
    path: str
    lines: int = 0
    docs: int = 0
    chars: int = 0
    duplicates: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first line numbers
    damage: str = ""  # a DAMAGE key when the file broke off after ``lines`` lines
    damage_detail: str = ""

    def note(self, counter: Counter, reason: str, line_no: int) -> None:
        counter[reason] += 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < MAX_EXAMPLES:
            lines.append(line_no)

    def problems(self) -> str:
        parts = []
        for kind, counter in (("skipped", self.skipped), ("repaired", self.repaired)):
            items = [f"{r} {n:,} (line{'s' if n > 1 else ''} {', '.join(map(str, self.examples[r]))}"
                     f"{', ...' if n > len(self.examples[r]) else ''})" for r, n in sorted(counter.items())]
            if items:
                parts.append(f"{kind}: " + "; ".join(items))
        return " | ".join(parts)

    def damage_text(self) -> str:
        """What broke the file off and where, e.g. "compressed stream ends early after line 1,234 (...)"."""
        if not self.damage:
            return ""
        where = f"after line {self.lines:,}" if self.lines else "at the start"
        return DAMAGE[self.damage].format(where=where, detail=self.damage_detail)


@dataclass
class IngestStats:
    files: list = field(default_factory=list)
    docs: int = 0
    chars: int = 0
    duplicates: int = 0
    per_lang: dict = field(default_factory=dict)  # lang -> {"docs", "chars"}
    per_source: dict = field(default_factory=dict)

    def add(self, doc: Document) -> None:
        self.docs += 1
        self.chars += len(doc.text)
        for table, key in ((self.per_lang, doc.lang), (self.per_source, doc.source)):
            row = table.setdefault(key, {"docs": 0, "chars": 0})
            row["docs"] += 1
            row["chars"] += len(doc.text)

    def skipped(self) -> Counter:
        return sum((f.skipped for f in self.files), Counter())

    def repaired(self) -> Counter:
        return sum((f.repaired for f in self.files), Counter())

    def damaged(self) -> list:
        return [f for f in self.files if f.damage]

    def to_dict(self) -> dict:
        return {
            "docs": self.docs, "chars": self.chars, "duplicates_removed": self.duplicates,
            "per_lang": self.per_lang, "per_source": self.per_source,
            "skipped": dict(self.skipped()), "repaired": dict(self.repaired()),
            "damaged_files": [f.path for f in self.damaged()],
            "files": [{"path": f.path, "lines": f.lines, "docs": f.docs, "chars": f.chars,
                       "duplicates": f.duplicates, "skipped": dict(f.skipped), "repaired": dict(f.repaired),
                       "first_lines": f.examples,
                       "damage": {"reason": f.damage, "after_line": f.lines, "message": f.damage_text()}
                       if f.damage else None} for f in self.files],
        }


# ---------------------------------------------------------------- cleaning


def clean_text(text: str) -> tuple[str, list[str]]:
    """Apply the repair rules to one document; return the text and the repairs made."""
    repairs = []
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        repairs.append("crlf")
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
        repairs.append("control_chars")
    if not text.isascii():
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("", text)
            repairs.append("lone_surrogates")
        normalized = normalize_text(text)
        if normalized != text:
            text = normalized
            repairs.append("nfc")
    return text.strip(), repairs


def detect_language(text: str, sample_chars: int = 20000) -> str:
    """"ko" when Hangul is at least 30% of the letters, "en" for mostly Latin letters, else "other".

    Hangul syllables carry more than Latin letters, so Korean text with
    English terms stays "ko"; texts where letters are a minority of the
    non-space characters (Chinese, Japanese, number tables) are "other".
    """
    s = text[:sample_chars]
    hangul, latin = len(_HANGUL.findall(s)), len(_LATIN.findall(s))
    visible = len(s) - s.count(" ") - s.count("\n") - s.count("\t")
    if hangul + latin == 0 or hangul + latin < 0.5 * visible:
        return "other"
    return "ko" if hangul >= 0.3 * (hangul + latin) else "en"


def _lang_field(value) -> Optional[str]:
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    v = _LANG_ALIASES.get(v, v)
    return v if re.fullmatch(r"[a-z]{2,3}", v) else None


# ---------------------------------------------------------------- files


def find_input_files(specs: Sequence[Union[str, Path]], exclude: Iterable[Path] = ()) -> list[Path]:
    """Files, folders (their *.jsonl / *.txt, optionally .gz, not recursive) and globs, de-duplicated."""
    seen = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir()
                             if p.is_file() and p.name.endswith(DATA_SUFFIXES) and not p.name.startswith("."))
            if not matches:
                raise DataError(f"input folder {path} holds no *.jsonl or *.txt file; "
                                "pass files or a glob such as 'raw/**/*.jsonl'")
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"input {str(spec)!r} is not a file or folder and matches no file")
        for p in matches:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append(p)
    return found


def text_bytes(files: Sequence[Path]) -> int:
    """The input's size as text, for disk estimates: a .gz file counts its uncompressed size from
    its trailer (modulo 4 GiB, so a larger member reads small) and at least 4x its compressed size."""
    total = 0
    for path in map(Path, files):
        size = path.stat().st_size
        if path.name.endswith(".gz") and size >= 18:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                size = max(int.from_bytes(f.read(4), "little"), 4 * size)
        total += size
    return total


def format_bytes(n: float) -> str:
    """Bytes in decimal units, e.g. "950 bytes", "310.0 kB", "52.40 MB"."""
    if n < 1e3:
        return f"{n:,.0f} bytes"
    if n < 1e6:
        return f"{n / 1e3:,.1f} kB"
    return f"{n / 1e6:,.2f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def file_stamp(files: list[Path]) -> list[list]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def content_hash(files: list[Path]) -> str:
    """sha256 over the (size, sha256) of every input file, in order (names do not matter)."""
    h = hashlib.sha256()
    for p in files:
        size, digest = hash_file(p)
        h.update(f"{size}:{digest}\n".encode())
    return h.hexdigest()


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _damage(exc: BaseException, lines_read: int) -> tuple[str, str]:
    """The DAMAGE key and detail for an error raised while reading a .gz."""
    if isinstance(exc, EOFError):
        return "gzip_truncated", ""
    if lines_read == 0 and "Not a gzipped file" in str(exc):
        return "not_gzip", ""
    # Later, the same message means bytes after a complete gzip member that are not another one.
    return "gzip_corrupt", str(exc) or type(exc).__name__


def _raw_lines(f, fs: FileStats) -> Iterator[tuple[int, Optional[bytes]]]:
    """(line number, bytes without newline); None for a line over MAX_LINE_BYTES."""
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        fs.lines = line_no
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest without holding it
                raw = f.readline(1 << 20)
            yield line_no, None
            continue
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        else:
            fs.note(fs.repaired, "no_final_newline", line_no)
        yield line_no, raw


def _decode(raw: bytes, fs: FileStats, line_no: int) -> Optional[str]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        fs.note(fs.repaired, "bom", line_no)
    if raw.endswith(b"\r"):
        raw = raw[:-1]
        fs.note(fs.repaired, "crlf", line_no)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "ignore")
        if len(raw) - len(text.encode("utf-8")) > BAD_UTF8_SHARE * len(raw):
            return None
        fs.note(fs.repaired, "invalid_utf8", line_no)
        return text


class _Reader:
    """Reads one file, applying the rules; strict mode raises at the first skip."""

    def __init__(self, path: Path, strict: bool):
        self.path, self.strict = path, strict
        self.fs = FileStats(str(path))

    def skip(self, reason: str, line_no: int) -> None:
        if self.strict and reason != "blank_line":
            raise DataError(f"{self.path}:{line_no}: {SKIP_REASONS[reason]} ({reason}); fix or remove the line, "
                            "or run without --strict to skip bad lines")
        self.fs.note(self.fs.skipped, reason, line_no)

    def lines(self, f) -> Iterator[tuple[int, Optional[bytes]]]:
        """``_raw_lines``, ending early where a compressed stream breaks off.

        Only reading is guarded: the lines already yielded stay read, and one
        damaged file costs its rest, not the run (``iter_documents`` warns).
        """
        try:
            yield from _raw_lines(f, self.fs)
        except _STREAM_ERRORS as exc:
            self.fs.damage, self.fs.damage_detail = _damage(exc, self.fs.lines)
            if self.strict:
                raise DataError(f"{self.path}: {self.fs.damage_text()}; replace the file, or run without --strict "
                                "to keep the documents before the damage") from exc

    def clean(self, text: str, line_no: int) -> str:
        text, repairs = clean_text(text)
        for reason in repairs:
            self.fs.note(self.fs.repaired, reason, line_no)
        return text

    def documents(self, progress: Progress) -> Iterator[Document]:
        is_text = self.path.name.endswith((".txt", ".txt.gz"))
        default_source = self.path.name.split(".")[0]
        para: list[str] = []
        para_line = 0
        with _open(self.path) as f:
            for line_no, raw in self.lines(f):
                progress.update(len(raw) + 1 if raw is not None else MAX_LINE_BYTES)
                text = None
                if raw is None:
                    self.skip("too_long", line_no)
                elif (text := _decode(raw, self.fs, line_no)) is None:
                    self.skip("not_utf8", line_no)
                if is_text:
                    if text is None:
                        continue  # a skipped line does not end the paragraph
                    if text.strip():
                        para_line = para_line or line_no
                        para.append(text)
                    elif para:
                        yield from self._text_doc(para, para_line, default_source)
                        para, para_line = [], 0
                elif text is not None:
                    doc = self._json_doc(text, line_no, default_source)
                    if doc is not None:
                        yield doc
            if para:
                yield from self._text_doc(para, para_line, default_source)

    def _text_doc(self, lines: list[str], line_no: int, source: str) -> Iterator[Document]:
        text = self.clean("\n".join(lines), line_no)
        if text:
            yield Document(text, detect_language(text), source)

    def _json_doc(self, line: str, line_no: int, source: str) -> Optional[Document]:
        if not line.strip():
            self.skip("blank_line", line_no)
            return None
        try:
            obj = json.loads(line, strict=False)  # raw control characters are cleaned below, not fatal
        except json.JSONDecodeError:
            self.skip("malformed_json", line_no)
            return None
        except RecursionError:  # json recurses per nesting level; one such line must not end the run
            self.skip("too_deep", line_no)
            return None
        except ValueError:  # valid JSON Python refuses: an integer over sys.get_int_max_str_digits() digits
            self.skip("number_too_long", line_no)
            return None
        if not isinstance(obj, dict):
            self.skip("not_object", line_no)
            return None
        if "text" not in obj:
            self.skip("missing_text", line_no)
            return None
        if not isinstance(obj["text"], str):
            self.skip("non_string_text", line_no)
            return None
        text = self.clean(obj["text"], line_no)
        if not text:
            self.skip("empty_text", line_no)
            return None
        src = obj.get("source")
        return Document(text, _lang_field(obj.get("lang")) or detect_language(text),
                        src.strip() if isinstance(src, str) and src.strip() else source)


def iter_documents(
    files: Sequence[Path],
    stats: IngestStats,
    *,
    strict: bool = False,
    dedup: bool = True,
    log: Callable[[str], None] = print,
) -> Iterator[Document]:
    """Clean documents from every file in order, exact duplicates removed; fills ``stats``."""
    seen: set[bytes] = set()
    # Compressed sizes say nothing about the bytes read: no percentage then.
    total = None if any(str(p).endswith(".gz") for p in files) else sum(Path(p).stat().st_size for p in files)
    progress = Progress("reading", total, log=log)
    try:
        for path in files:
            reader = _Reader(Path(path), strict)
            stats.files.append(reader.fs)
            loaded = 0
            for doc in reader.documents(progress):
                loaded += 1
                if dedup:
                    key = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
                    if key in seen:
                        reader.fs.duplicates += 1
                        stats.duplicates += 1
                        continue
                    seen.add(key)
                reader.fs.docs += 1
                reader.fs.chars += len(doc.text)
                stats.add(doc)
                yield doc
            fs = reader.fs
            if loaded == 0:
                found = "; ".join(p for p in (fs.damage_text(), fs.problems()) if p)
                detail = f": {found}" if found else " (the file is empty)"
                raise DataError(f"{path}: no usable document in {fs.lines:,} lines{detail}. Expected one JSON "
                                'object per line with a non-empty "text" string (or UTF-8 text for .txt)')
            if fs.damage:
                log(f"WARNING: {path}: {fs.damage_text()}; the rest of this file is skipped")
            if (set(fs.skipped) | set(fs.repaired)) - {"blank_line", "no_final_newline"}:
                log(f"WARNING: {path}: {fs.problems()}")
    finally:
        progress.close()


def format_summary(stats: IngestStats, title: str = "input summary") -> str:
    """A fixed-width table: documents and characters per language, then skips and repairs."""
    rows = [f"{title}", f"  {'language':<12}{'docs':>12}{'chars':>16}{'share':>8}"]
    for lang, row in sorted(stats.per_lang.items(), key=lambda kv: -kv[1]["chars"]):
        share = 100.0 * row["chars"] / max(stats.chars, 1)
        rows.append(f"  {lang:<12}{row['docs']:>12,}{row['chars']:>16,}{share:>7.1f}%")
    rows.append(f"  {'total':<12}{stats.docs:>12,}{stats.chars:>16,}")
    skipped, repaired = stats.skipped(), stats.repaired()
    rows.append(f"  duplicates removed: {stats.duplicates:,}")
    rows.append("  skipped lines: " + (", ".join(f"{r} {n:,}" for r, n in sorted(skipped.items())) or "none"))
    rows.append("  repaired: " + (", ".join(f"{r} {n:,}" for r, n in sorted(repaired.items())) or "none"))
    for fs in stats.damaged():  # listed only when present: a file's rest was not read
        rows.append(f"  damaged, rest of file skipped: {fs.path}: {fs.damage_text()}")
    return "\n".join(rows)
