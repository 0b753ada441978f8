"""SentencePiece tokenizer for Korean/English: training, loading, HF export.

Design (measurements in docs/data.md):
- BPE with byte fallback: no Korean syllable, emoji or control byte ever
  becomes <unk>; rare characters cost one token per UTF-8 byte.
- SentencePiece's own normalization is switched off (rule "identity"): its
  default NFKC would turn compatibility jamo such as ㅋ (U+314B) into
  conjoining jamo (U+110F). We apply NFC ourselves, once in preprocessing and
  again in :meth:`KoEnTokenizer.encode`, via :func:`normalize_text`.
- No dummy prefix and no whitespace collapsing: encoding is a pure function
  of the text, so spaces, newlines and document starts round-trip exactly and
  the transformers export can reproduce the ids bit for bit.
- Fixed special ids: PAD=0, UNK=1, BOS=2, EOS=3. Nothing is added
  automatically on either side (``add_bos=False`` here, no post-processor in
  the HF export), which is the rule that makes the ids identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from koen_sllm.checkpoint.atomic_io import hash_file, publish_dir
from .errors import KoenError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MODEL_FILE = "tokenizer.model"
INFO_FILE = "koen_tokenizer.json"
MODEL_TYPES = ("bpe", "unigram")
DEFAULT_MODEL_TYPE = "bpe"
# SentencePiece silently drops training lines longer than max_sentence_length
# bytes; long lines are cut into pieces of this many characters instead.
_TRAIN_LINE_CHARS = 8192
# Texts whose ids transformers must reproduce; checked on every export.
PROBE_TEXTS = (
    "안녕하세요, 세계! 한국어 문장입니다.",
    "Hello   world  ",
    "  leading and trailing  \n\nnew\nlines\t tab",
    "😀👍🏽 emoji, 똠 뙇 꽯 rare syllables",
    "ㅋㅋㅋ ㅠㅠ ㄱㄴㄷ compatibility jamo",
    "literal </s> <s> <pad> <unk> markers",
    "12345 3.14 ▁",
)

PathLike = Union[str, Path]


class TokenizerError(KoenError, RuntimeError):
    """A tokenizer cannot be trained, loaded or exported; the message says why and what to do."""


def normalize_text(text: str) -> str:
    """NFC: the single normalization used in preprocessing and at encode time.

    NFD text (common from macOS) becomes composed syllables; compatibility
    jamo, full-width forms and emoji are left alone (NFKC would change them).
    """
    if text.isascii():
        return text
    return unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------- training


def _read_texts(input_file: Path) -> Iterator[str]:
    """Documents of a JSONL ("text" field) or plain-text file."""
    with open(input_file, encoding="utf-8") as f:
        if input_file.suffix == ".jsonl":
            for raw in f:
                if raw.strip():
                    yield json.loads(raw)["text"]
        else:
            yield from f


# Training lines stand for a newline with this Unicode noncharacter (reserved for internal use), so that
# they can travel one per line through a file; train_sentencepiece turns it back into "\n". The second one is
# SentencePiece's pretokenization delimiter at training: no piece is learnt across it. The text's own
# U+FDD0/U+FDD1 are left out of training; encoding never treats them specially (bytes, as any character
# outside the vocabulary).
_NEWLINE_MARK, _TRAIN_DELIMITER = "\ufdd0", "\ufdd1"


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: every line of every text with the newlines that follow it.

    A run of newlines is a piece of its own (``\n``, ``\n\n``, ``\n\n\n``): a
    delimiter keeps it apart from the line before it, and no piece continues
    past a newline into the next line, so no piece mixes newlines and text.
    Encoding needs no such rule: no learnt piece crosses it. Lines longer than
    SentencePiece accepts are cut; a document's last line has no newline.
    """
    import re

    for text in texts:
        text = normalize_text(text)
        if _NEWLINE_MARK in text or _TRAIN_DELIMITER in text:
            text = text.replace(_NEWLINE_MARK, "").replace(_TRAIN_DELIMITER, "")
        for m in re.finditer(r"([^\n]*)(\n*)", text):
            line, newlines = m.groups()
            if newlines:
                line += (_TRAIN_DELIMITER if line else "") + _NEWLINE_MARK * len(newlines)
            for cut in range(0, len(line), _TRAIN_LINE_CHARS):
                yield line[cut:cut + _TRAIN_LINE_CHARS]


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str, max_lines: int, num_threads: int) -> bytes:
    """One SentencePiece training run on ``lines`` (from :func:`training_lines`); the model's bytes.

    Against plain SentencePiece BPE under the same exactness rules, the two
    changes kept (measured in docs/data.md, "Tokenizer against a fair baseline")
    are ``split_by_unicode_script=False``, so punctuation may join the word
    before it (``했다.``, ``요?``, ``'s``, ``e,``), and newline runs as pieces (see
    :func:`training_lines`). Pieces still hold at most one digit and a space
    only at their start. SentencePiece drops a sentence's final newlines, so a
    delimiter follows them.
    """
    import io

    import sentencepiece as spm

    def sentences() -> Iterator[str]:
        for line in lines:
            if _NEWLINE_MARK in line:
                line = line.replace(_NEWLINE_MARK, "\n")
                if line.endswith("\n"):
                    line += _TRAIN_DELIMITER
            yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model, model_type=model_type, vocab_size=vocab_size,
        pretokenization_delimiter=_TRAIN_DELIMITER,
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        split_by_unicode_script=False, allow_whitespace_only_pieces=True,
        max_sentence_length=4 * _TRAIN_LINE_CHARS + 16,
        input_sentence_size=max_lines, shuffle_input_sentence=True, num_threads=num_threads,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(
    input_file: PathLike,
    out_dir: PathLike,
    vocab_size: int,
    model_type: str = DEFAULT_MODEL_TYPE,
    **options: Any,
) -> "KoEnTokenizer":
    """Train on ``input_file`` (JSONL with "text", or .txt) and save to ``out_dir``;
    ``options`` (max_lines, num_threads, log) as for :func:`train_tokenizer_on_texts`."""
    input_file = Path(input_file)
    if not input_file.is_file():
        raise TokenizerError(f"tokenizer training input {input_file} does not exist")
    return train_tokenizer_on_texts(lambda: _read_texts(input_file), out_dir, vocab_size, model_type,
                                    name=str(input_file), **options)


def train_tokenizer_on_texts(
    texts: Callable[[], Iterable[str]],
    out_dir: PathLike,
    vocab_size: int,
    model_type: str = DEFAULT_MODEL_TYPE,
    *,
    max_lines: int = 5_000_000,
    num_threads: Optional[int] = None,
    log: Callable[[str], None] = print,
    name: str = "the corpus",
) -> "KoEnTokenizer":
    """Train on the documents ``texts()`` yields (called again if training restarts).

    When the corpus cannot support ``vocab_size`` pieces, the largest size it
    supports is used and a note is logged. The folder is written to a
    temporary sibling and renamed, so a crash never leaves half a tokenizer.
    """
    threads = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    proto, size = settle_vocabulary(
        lambda size: train_sentencepiece(training_lines(texts()), size, model_type, max_lines, threads),
        vocab_size, model_type, name=name, log=log)
    return save_trained(proto, out_dir, model_type, size, vocab_size, name)


def settle_vocabulary(train: Callable[[int], bytes], vocab_size: int, model_type: str, *, name: str,
                      log: Callable[[str], None] = print) -> tuple[bytes, int]:
    """(model, vocabulary size) from ``train(size)``, which raises SentencePiece's RuntimeError.

    When the corpus cannot support ``vocab_size`` pieces, the largest size it supports is used
    and a note is logged; SentencePiece's other complaints become one TokenizerError line."""
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type {model_type!r} is unknown; choose one of {', '.join(MODEL_TYPES)}")
    size = int(vocab_size)
    for _ in range(4):
        try:
            return train(size), size
        except RuntimeError as exc:
            msg = str(exc)
            cap = re.search(r"value <= (\d+)", msg)
            if cap and int(cap.group(1)) < size:
                log(f"note: {name} supports at most {cap.group(1)} {model_type} pieces; "
                    f"vocabulary capped from {size} (requested {vocab_size})")
                size = int(cap.group(1))
                continue
            need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
            if need:
                raise TokenizerError(
                    f"--vocab-size {size} is too small for {name}: its characters alone need "
                    f"{need.group(2)} pieces; use --vocab-size {int(need.group(2)) + 64} or more") from None
            if "empty" in msg.lower() or "no sentence" in msg.lower():
                raise TokenizerError(f"{name} holds no text to train a tokenizer on") from None
            raise TokenizerError(f"SentencePiece training on {name} failed: {msg.splitlines()[-1]}") from None
    raise TokenizerError(f"SentencePiece could not settle on a vocabulary size for {name}")


def save_trained(proto: bytes, out_dir: PathLike, model_type: str, size: int, requested: int,
                 name: str) -> "KoEnTokenizer":
    """Write a trained model and its transformers files to ``out_dir``: a temporary sibling is
    filled and renamed, so a crash never leaves half a tokenizer."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the tokenizer from other users
    try:
        (tmp / MODEL_FILE).write_bytes(proto)
        info = {"model_type": model_type, "vocab_size": size, "requested_vocab_size": int(requested),
                "normalization": "NFC (applied by koen_sllm.tokenizer.normalize_text)",
                "trained_on": name}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tok = KoEnTokenizer.load(tmp)
        tok.save_pretrained(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return KoEnTokenizer.load(out_dir)


# ---------------------------------------------------------------- loading and encoding


def _unloadable_reason(model_file: Path) -> str:
    """Why SentencePiece refused ``model_file``, in the user's terms (its own words are C++ internals)."""
    if model_file.is_dir():
        return "it is a folder"
    try:
        with open(model_file, "rb") as f:
            empty = not f.read(1)
    except OSError as err:
        return f"cannot read it: {err.strerror or err}"
    if empty:
        return "the file is empty"
    return "it does not parse: truncated, or another format?"


def _open_model(model_file: Path):
    """The SentencePieceProcessor of ``model_file``, or one TokenizerError line naming the file and the fix."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError):
        raise TokenizerError(
            f"{model_file} cannot be read as a SentencePiece model ({_unloadable_reason(model_file)}); "
            "pass the folder of a tokenizer prepared by python -m koen_sllm.data.prepare, "
            "or drop --tokenizer-path to train one") from None


def _info_model_type(info_file: Path) -> Optional[str]:
    """The model type recorded beside the model; None without an info file (foreign models).

    A damaged one is an error rather than ignored: reading the type from the
    model instead needs protobuf, and its message would say the file is missing.
    """
    if not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{info_file} cannot be read ({exc}); copy the tokenizer folder again, or delete the "
                             "file to read the model type from the model (needs protobuf)") from None
    model_type = info.get("model_type")
    return model_type if isinstance(model_type, str) else None


class KoEnTokenizer:
    """A SentencePiece model plus the project's normalization and fixed special ids."""

    def __init__(self, model_file: PathLike, model_type: Optional[str] = None):
        self.model_file = Path(model_file)
        self.sp = _open_model(self.model_file)
        self._model_type = model_type
        self._fingerprint: Optional[str] = None
        expected = {PAD: PAD_ID, UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID}
        got = {piece: self.sp.piece_to_id(piece) for piece in expected}
        if got != expected or not self.sp.is_byte(self.sp.piece_to_id("<0x00>")):
            raise TokenizerError(
                f"{self.model_file} does not use this project's layout (special ids {got}, byte fallback "
                f"{'on' if self.sp.is_byte(self.sp.piece_to_id('<0x00>')) else 'off'}); expected {expected} "
                "with byte fallback: train one with python -m koen_sllm.data.prepare")

    @classmethod
    def load(cls, path: PathLike) -> "KoEnTokenizer":
        """Load from a tokenizer folder (holding tokenizer.model) or the .model file itself."""
        path = Path(path)
        model_file = path / MODEL_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise TokenizerError(f"no SentencePiece model at {model_file}; pass a folder with {MODEL_FILE} "
                                 "or omit --tokenizer-path to train one from the data")
        return cls(model_file, _info_model_type(model_file.parent / INFO_FILE))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def model_type(self) -> str:
        if self._model_type is None:
            try:  # only foreign models without our info file need protobuf
                from sentencepiece import sentencepiece_model_pb2 as pb
            except ImportError as exc:
                raise TokenizerError(f"{self.model_file} has no {INFO_FILE}; install protobuf "
                                     "(pip install protobuf) so its model type can be read") from exc
            proto = pb.ModelProto()
            proto.ParseFromString(self.model_file.read_bytes())
            self._model_type = {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, "other")
        return self._model_type

    def fingerprint(self) -> str:
        """sha256 of the model file: identifies the tokenizer in meta.json and checkpoints."""
        if self._fingerprint is None:
            self._fingerprint = hash_file(self.model_file)[1]
        return self._fingerprint

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        text = normalize_text(text)
        ids = self.sp.encode(text) if "\u2581" not in text else self.encode_batch([text])[0]
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts in one call; ``num_threads`` > 1 runs SentencePiece's C++ thread pool.

        A literal U+2581 (SentencePiece's own space symbol, which it would decode
        as a space) is encoded as its three UTF-8 byte pieces, and the text on
        either side of it on its own; the transformers export does the same
        (see :meth:`_hf_backend`), so ids stay identical and decoding exact.
        """
        texts = [normalize_text(t) for t in texts]
        out = self.sp.encode(texts, num_threads=num_threads)
        for k, text in enumerate(texts):
            if "\u2581" in text:
                literal = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode("utf-8")]
                ids: list[int] = []
                for n, part in enumerate(self.sp.encode(text.split("\u2581"))):
                    if n:
                        ids += literal
                    ids += part
                out[k] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    # ------------------------------------------------------------ transformers export

    def _hf_backend(self):
        """A ``tokenizers.Tokenizer`` that reproduces ``encode`` exactly.

        Its vocabulary writes SentencePiece's space symbol U+2581 as the space it
        stands for (``" the"``, not ``"▁the"``), so no normalizer maps spaces: a
        literal U+2581 in the text is then a character outside the vocabulary,
        encoded as its UTF-8 byte pieces and decoded back to itself, as
        :meth:`encode_batch` does. (Merges are stored as pairs, which
        tokenizers reads since 0.20, the version transformers 4.45 requires.)
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models

        sp, n = self.sp, self.vocab_size
        pieces = [(sp.id_to_piece(i) if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)
                   else sp.id_to_piece(i).replace("\u2581", " "), sp.get_score(i)) for i in range(n)]
        if self.model_type == "unigram":
            # SentencePiece never emits control pieces from text; a huge cost keeps
            # the HF lattice from choosing "</s>" for the literal characters.
            pieces = [(p, -1e9 if sp.is_control(i) or sp.is_unknown(i) else s) for i, (p, s) in enumerate(pieces)]
            backend = Tokenizer(models.Unigram(pieces, unk_id=UNK_ID, byte_fallback=True))
        elif self.model_type == "bpe":
            vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
            # SentencePiece BPE merges the pair whose result has the best score
            # (lowest id); ranking every split of a piece by that id reproduces it.
            merges = []
            for i, (piece, _) in enumerate(pieces):
                if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
                    continue
                splits = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                          for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
                merges.extend((left, right) for _, _, left, right in sorted(splits))
            backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True,
                                           byte_fallback=True))
        else:
            raise TokenizerError(f"{self.model_file}: model type {self.model_type!r} cannot be exported")
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, UNK, BOS, EOS)])
        return backend

    def save_pretrained(self, out_dir: PathLike) -> Path:
        """Write tokenizer.model plus files ``AutoTokenizer.from_pretrained`` loads offline.

        The HF side encodes identically with default arguments because neither
        side adds BOS/EOS automatically and special-token strings inside text
        are not parsed as specials (``split_special_tokens``). Checked on
        PROBE_TEXTS before returning.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (out_dir / MODEL_FILE).resolve():
            shutil.copyfile(self.model_file, out_dir / MODEL_FILE)
            info = {"model_type": self.model_type, "vocab_size": self.vocab_size,
                    "normalization": "NFC (applied by koen_sllm.tokenizer.normalize_text)"}
            (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        backend = self._hf_backend()
        backend.save(str(out_dir / "tokenizer.json"))
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials,
            "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000,
            "normalization_note": "apply Unicode NFC before encoding (koen_sllm.tokenizer.normalize_text)",
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
        backend.encode_special_tokens = True
        if self.model_type == "unigram":
            # Not fatal: unigram is offered for comparison, BPE is the default.
            warnings.warn(f"{out_dir}: transformers breaks unigram ties differently (e.g. '.....' as '...'+'..' vs "
                          "'..'+'...'), so some ids can differ from SentencePiece; BPE tokenizers match exactly")
            return out_dir
        for text in PROBE_TEXTS:
            ours, theirs = self.encode(text), backend.encode(normalize_text(text), add_special_tokens=False).ids
            if ours != theirs:
                raise TokenizerError(f"transformers export of {self.model_file} differs on {text!r}: "
                                     f"{ours[:12]} vs {theirs[:12]}")
        return out_dir
