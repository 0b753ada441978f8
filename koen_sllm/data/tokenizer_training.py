"""Training the tokenizer of a build: a reproducible sample of lines, trained in a child process.

Why a sample chosen here: above its ``input_sentence_size`` SentencePiece samples lines itself,
and that sample differs from process to process even with its seed set, so two prepares of
the same corpus gave different tokenizers (and token files). Here a line is kept when a keyed
hash of its text falls under ``cap / lines``: the choice depends on the text alone, never on
the process, the order of reading or the number of threads, and SentencePiece is then given
every sampled line with its own sampling off.

Why a child process: SentencePiece's trainer runs in C++ and holds the interpreter for its
whole run, so Ctrl-C in the same process either waited for the end or surfaced as a false
"no text" error; its memory (about three bytes per input byte) also stayed with the process
through packing. In a child, Ctrl-C stops it at once (the child is killed), the memory is
returned when it exits, and the parent prints a progress line while it works.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from koen_sllm.parent_watch import die_with_parent
from koen_sllm.tokenizer import TokenizerError, train_sentencepiece, training_lines

DEFAULT_MAX_LINES = 2_000_000
SAMPLE_SALT = b"koen-tok-sample-v1"  # changing it changes every sample (and so every tokenizer)
HEARTBEAT_S = 15.0
# The package root goes first on the child's sys.path: `-c` would put the current directory there,
# and a koen_sllm in it would run instead (the launcher avoids the same trap).
_CHILD = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from koen_sllm.data.tokenizer_training import _child_main; sys.exit(_child_main(sys.argv[1]))")


def training_line_count(text: str) -> int:
    """How many training lines ``text`` gives (as the tokenizer's trainer cuts them)."""
    return sum(1 for _ in training_lines((text,)))


def _keep_threshold(total_lines: int, max_lines: int) -> Optional[int]:
    """None keeps every line; else a line is kept when its 64-bit hash is below this."""
    if max_lines <= 0 or total_lines <= max_lines:
        return None
    return int(max_lines / total_lines * 2.0 ** 64)


def sample_lines(texts: Iterable[str], total_lines: int, max_lines: int) -> Iterator[str]:
    """About ``max_lines`` of the training lines of ``texts`` (all of them when fewer), chosen by
    a keyed hash of each line's text: the same lines on every run, machine and thread count."""
    threshold = _keep_threshold(total_lines, max_lines)
    for line in training_lines(texts):
        if threshold is None:
            yield line
            continue
        digest = hashlib.blake2b(line.encode("utf-8"), digest_size=8, key=SAMPLE_SALT).digest()
        if int.from_bytes(digest, "little") < threshold:
            yield line


def train_in_child(lines: Callable[[], Iterable[str]], vocab_size: int, model_type: str, num_threads: int,
                   work: Path, log: Callable[[str], None] = print) -> tuple[bytes, int]:
    """(model, lines trained on): SentencePiece trained in a child process on ``lines()``,
    streamed through a pipe (no copy of the sample on disk). See the module's note.

    SentencePiece's own errors come back as RuntimeError with its message, as in-process
    training raises them, so the caller's handling (vocabulary capped to what the data
    supports, too small a vocabulary) is the same. KeyboardInterrupt kills the child."""
    model = work / f"tokenizer.{os.getpid()}.model"
    error = work / f"tokenizer.{os.getpid()}.error"
    args = json.dumps({"model": str(model), "error": str(error), "vocab_size": vocab_size,
                       "model_type": model_type, "num_threads": num_threads})
    root = str(Path(__file__).resolve().parents[2])
    started = time.monotonic()
    child = None
    try:
        child = _start_child([sys.executable, "-c", _CHILD, root, args])
        sent = _feed(child, lines())
        code = _wait_showing_progress(child, started, f"{sent:,} lines, vocabulary {vocab_size:,}", log)
        if code == 0:
            return model.read_bytes(), sent
        if error.is_file():
            raise RuntimeError(error.read_text(encoding="utf-8"))
        if code < 0 and -code == signal.SIGINT:
            raise KeyboardInterrupt
        raise TokenizerError(f"SentencePiece training on {sent:,} lines ended with exit code {code} "
                             f"({'out of memory? ' if -code == signal.SIGKILL else ''}"
                             "lower --tokenizer-max-lines to train on fewer lines)")
    except BaseException:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        raise
    finally:
        for path in (model, error):
            path.unlink(missing_ok=True)


def _feed(child: subprocess.Popen, lines: Iterable[str]) -> int:
    """Write ``lines`` to the child's input; a child that stopped reading has failed (its exit
    code and error file say how), so a broken pipe only ends the feeding."""
    sent = 0
    try:
        for line in lines:
            child.stdin.write(line.encode("utf-8") + b"\n")
            sent += 1
        child.stdin.close()
    except BrokenPipeError:
        pass
    return sent


def _start_child(command: list) -> subprocess.Popen:
    """Start ``command``; Ctrl-C while it starts is held back until the child is known, so that
    the caller can stop it (raised inside Popen, it would leave the child running unseen)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(command, stdin=subprocess.PIPE)
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        child = subprocess.Popen(command, stdin=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        child.kill()
        child.wait()
        raise KeyboardInterrupt
    return child


def _wait_showing_progress(child: subprocess.Popen, started: float, what: str, log: Callable[[str], None]) -> int:
    """Wait for ``child``: an elapsed-time bar on a terminal, a line every HEARTBEAT_S otherwise
    (SentencePiece reports no progress of its own that could be shown as a share)."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc=f"training the tokenizer ({what})", bar_format="{desc}: {elapsed}", leave=False)
    last = started
    try:
        while True:
            try:
                return child.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if bar is not None:
                    bar.refresh()
                elif now - last >= HEARTBEAT_S:
                    last = now
                    log(f"training the tokenizer: {now - started:,.0f}s ({what})")
    finally:
        if bar is not None:
            bar.close()


def _child_main(args_json: str) -> int:
    # Ctrl-C reaches the whole foreground group: the child then dies at once, whatever
    # SentencePiece is doing, and the parent (which catches it) cleans up and says so.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL)  # a parent that dies without cleaning up takes the child along
    args = json.loads(args_json)
    # Only "\n" ends a line: a carriage return inside one is text.
    lines = (line.rstrip("\n") for line in io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n"))
    try:
        proto = train_sentencepiece(lines, args["vocab_size"], args["model_type"], 0, args["num_threads"])
    except RuntimeError as exc:
        Path(args["error"]).write_text(str(exc), encoding="utf-8")
        return 3
    Path(args["model"]).write_bytes(proto)
    return 0
