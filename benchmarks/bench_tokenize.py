#!/usr/bin/env python3
"""Tokenization throughput: the parallel paths against a plain single-process loop.

    python benchmarks/bench_tokenize.py                       # ../shared/data/ko_en_sample.jsonl, 32k BPE
    python benchmarks/bench_tokenize.py --data corpus.jsonl --tokenizer datasets/prepared/mixed_pretraining/tokenizer
    python benchmarks/bench_tokenize.py --vocab-sweep         # BPE vs unigram at 8k/16k/32k/48k (docs/data.md)
    python benchmarks/bench_tokenize.py --quality             # the project's tokenizer against a fair baseline

All paths run in the same process, on the same file and tokenizer, in
interleaved repeats (median reported), and must produce identical ids. The
work measured is what packing does: parse JSON, NFC, encode, append EOS,
convert to a numpy array. Throughput is UTF-8 megabytes of text per second.
Not a test: numbers depend on the machine and on whatever else runs on it,
so the load average is printed with them.

--quality trains the project's tokenizer, a fair baseline (plain SentencePiece
BPE under the same exactness rules) and every candidate configuration on the
same text, leaving whole sources out, and reports characters per token on
those unseen sources, round trips and transformers parity for each (see
docs/data.md, "Tokenizer against a fair baseline").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from koen_sllm.config import repo_root  # noqa: E402
from koen_sllm.data.pack import AUTO_THREADS_MAX, encode_jsonl, resolve_num_proc  # noqa: E402
from koen_sllm.tokenizer import KoEnTokenizer, normalize_text, train_tokenizer, train_tokenizer_on_texts  # noqa: E402

DEFAULT_DATA = repo_root().parent / "shared" / "data" / "ko_en_sample.jsonl"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {resolve_num_proc(0)} usable cores, Python {platform.python_version()}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_path(path: Path, tok: KoEnTokenizer, procs: int, backend: str) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    ids = np.concatenate([c.ids for c in encode_jsonl(path, tok, procs, backend)])
    return time.perf_counter() - start, ids


def throughput(path: Path, tok: KoEnTokenizer, procs: int, repeats: int) -> dict:
    text_mb = sum(len(json.loads(line)["text"].encode("utf-8")) for line in path.open(encoding="utf-8")) / 1e6
    paths = {"serial loop": (1, "processes"), f"processes x{procs}": (procs, "processes"),
             f"threads x{procs}": (procs, "threads")}
    times: dict[str, list[float]] = {name: [] for name in paths}
    reference = None
    for _ in range(repeats):
        for name, (n, backend) in paths.items():
            seconds, ids = run_path(path, tok, n, backend)
            if reference is None:
                reference = ids
            if not np.array_equal(ids, reference):
                raise SystemExit(f"{name} produced different ids than the serial loop")
            times[name].append(seconds)
    serial = statistics.median(times["serial loop"])
    return {name: {"median_s": statistics.median(t), "mb_per_s": text_mb / statistics.median(t),
                   "speedup": serial / statistics.median(t), "runs_s": [round(x, 3) for x in t]}
            for name, t in times.items()} | {"text_mb": text_mb}


def chars_per_token(tok: KoEnTokenizer, docs: list[dict]) -> dict:
    out = {}
    for lang in sorted({d["lang"] for d in docs}):
        texts = [d["text"] for d in docs if d["lang"] == lang]
        out[lang] = sum(map(len, texts)) / sum(map(len, tok.encode_batch(texts, num_threads=2)))
    return out


def vocab_sweep(docs: list[dict], sizes: list[int], work: Path) -> list[dict]:
    """Train on 95% of the documents, measure on the held-out 5% (same split for every run)."""
    from transformers import AutoTokenizer

    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    held = [docs[i] for i in order[: len(docs) // 20]]
    train = [docs[i] for i in order[len(docs) // 20:]]
    rows = []
    for model_type in ("bpe", "unigram"):
        for size in sizes:
            start = time.perf_counter()
            out = work / f"{model_type}_{size}"
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok = train_tokenizer_on_texts(lambda: (d["text"] for d in train), out, size, model_type,
                                               log=lambda _: None)
            seconds = time.perf_counter() - start
            hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
            mismatched = sum(hf(d["text"])["input_ids"] != tok.encode(d["text"]) for d in docs)
            rows.append({"model_type": model_type, "vocab": tok.vocab_size, "train_s": round(seconds, 1),
                         "chars_per_token": chars_per_token(tok, held), "hf_mismatched_docs": mismatched,
                         "docs": len(docs)})
            print(f"  {model_type:<8}{tok.vocab_size:>7,}  " + "  ".join(
                f"{k} {v:.3f}" for k, v in rows[-1]["chars_per_token"].items())
                + f"  train {seconds:.1f}s  transformers mismatches {mismatched}/{len(docs)}", flush=True)
    return rows


# ---------------------------------------------------------------- --quality: against a fair baseline

# Held out whole: sources the tokenizer never sees. Korean: KLUE (news, Wikipedia, policy and review
# sentences: formal written Korean) and Chatbot_data (short chat questions and answers), so training keeps
# one informal source (nsmc reviews) and one formal one (news); English: the Sherlock Holmes stories (modern
# narrative prose), so training keeps verse (tinyshakespeare) and news (korean_parallel_corpora).
HELD_OUT_SOURCES = "klue,chatbot_data,sherlock_holmes"
# The fair baseline: plain SentencePiece BPE with the project's exactness rules and nothing else: NFC
# ourselves and SentencePiece's identity rule, spaces kept as they are (no dummy prefix, no collapsing),
# single digits, byte fallback; lines are fed without their newlines, so a newline is the byte piece
# <0x0A>, one token of its own. Everything else is SentencePiece's default.
BASELINE_SPM = dict(model_type="bpe", character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True)
# What koen_sllm.tokenizer.train_sentencepiece/training_lines do, as changes to the baseline; the "project" row
# trains through those functions and is checked to give the same model as this description.
KEPT = dict(spm=dict(split_by_unicode_script=False, allow_whitespace_only_pieces=True), units="alone")
_DELIM = "\ufdd1"  # pretokenization delimiter for the candidates that need one (a Unicode noncharacter)
# Exactness checks beyond the documents themselves: literal U+2581, specials as text, spaces, newlines.
EXACT_TEXTS = [
    "a\u2581b", "\u2581", "\u2581\u2581 x \u2581", "word\u2581 \u2581word\n\u2581\n", "▁▁▁", "가\u2581나 다",
    "안녕하세요, 세계! 오늘은 날씨가 좋네요.", "The quick brown fox jumps over the lazy dog.",
    "emoji 😀👍🏽🇰🇷 and ❤️", "rare syllables 똠 뙇 꽯 쓟 햏 뷁", "compatibility jamo ㅋㅋㅋ ㅠㅠ ㄱㄴㄷ ㅏㅑ",
    "   leading spaces", "trailing spaces   ", "multiple   spaces\tand\ttabs", "new\nlines\n\n\nand a final newline\n",
    "\n", "", " \n \n", "숫자 1234567 and 3.14159", "literal </s> <s> <pad> <unk> text", "中文 日本語 Ελληνικά кириллица",
    "\\n <0x0A> <0xE2> \ufdd0\ufdd1 \u3000 \ufeff\u200b",
]


def quality_split(docs: list[dict], held_sources: set[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(training documents, documents of the held-out sources, in-source held-out 5%): seeded, fixed."""
    kept = [d for d in docs if d["source"] not in held_sources]
    held = [d for d in docs if d["source"] in held_sources]
    order = list(range(len(kept)))
    random.Random(0).shuffle(order)
    cut = len(kept) // 20
    return [kept[i] for i in sorted(order[cut:])], held, [kept[i] for i in sorted(order[:cut])]


def _units(texts, mode: str, cut: int = 8192):
    """Training sentences of the candidates. ``lines``: lines without newlines, blank ones skipped (the
    baseline); ``after``: each line with the newline run after it (pieces may end in newlines, never go past
    one); ``after_punct``: the same, but the newline run joins only punctuation (GPT-4's rule: a delimiter
    between a letter or digit and the newlines); ``alone``: a delimiter between each line and its newline
    run, so newline runs are pieces of their own; ``docs``: whole documents (pieces may span line breaks
    both ways)."""
    import re

    for text in texts:
        text = normalize_text(text)
        if mode == "lines":
            pieces = [line for line in text.split("\n") if line.strip()]
        elif mode == "docs":
            pieces = [text]
        else:
            pieces = []
            for m in re.finditer(r"([^\n]*)(\n*)", text):
                line, newlines = m.groups()
                if mode == "alone" and line and newlines:
                    pieces.append(line + _DELIM + newlines)
                elif line or newlines:
                    if mode == "after_punct" and newlines and line and line[-1].isalnum():
                        line += _DELIM
                    pieces.append(line + newlines)
        for piece in pieces:
            for start in range(0, len(piece), cut):
                chunk = piece[start:start + cut]
                # SentencePiece drops a sentence's final newlines; a delimiter after them keeps them.
                yield chunk + _DELIM if mode != "lines" and chunk.endswith("\n") else chunk


class _KiwiBoundaries:
    """Korean morpheme boundaries from kiwipiepy: between a stem and the particles/endings after it in one
    word (사업비 / 를, 확보 / 했다), the split EXAONE makes with MeCab. Optional: ``pip install kiwipiepy``."""

    def __init__(self):
        from kiwipiepy import Kiwi

        self.kiwi = Kiwi(num_workers=resolve_num_proc(0))
        self.cache: dict[str, list[str]] = {}

    def cuts(self, text: str) -> list[int]:
        grammatical = ("J", "E", "XS")
        cuts, prev = [], None
        for tok in self.kiwi.tokenize(text):
            s = tok.start
            if (prev is not None and prev.start < s < len(text) and not text[s - 1].isspace()
                    and tok.tag.startswith(grammatical) and not prev.tag.startswith(grammatical + ("S",))):
                cuts.append(s)
            prev = tok
        return cuts

    def split(self, text: str) -> list[str]:
        if text not in self.cache:
            bounds = [0, *self.cuts(text), len(text)]
            self.cache[text] = [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return self.cache[text]


def _hangul_share(text: str) -> float:
    hangul = sum("\uac00" <= c <= "\ud7a3" or "\u3131" <= c <= "\u318e" for c in text)
    return hangul / max(1, sum(c.isalpha() for c in text))


def _training_units(cand: dict, train: list[dict], kiwi) -> list[str]:
    units = list(_units((d["text"] for d in train), cand.get("units", "lines")))
    if cand.get("kiwi"):
        marked = []
        for u in units:
            if _hangul_share(u) >= 0.3:
                u = _DELIM.join(kiwi.split(u))
            marked.append(u)
        units = marked
    share = cand.get("ko_share")
    if share:  # weight one language by repeating its sentences (every one once, then a seeded choice)
        ko = [u for u in units if _hangul_share(u) >= 0.3]
        en = [u for u in units if _hangul_share(u) < 0.3]
        k_chars, e_chars = sum(map(len, ko)), sum(map(len, en))
        w = share / (1 - share) * e_chars / k_chars
        up, factor = (ko, w) if w >= 1 else (en, 1 / w)
        rng = random.Random(0)
        extra = [u for _ in range(int(factor) - 1) for u in up] + [u for u in up if rng.random() < factor % 1]
        units = units + extra
    return units


def _train_candidate(cand: dict, train: list[dict], vocab: int, kiwi) -> bytes:
    import io

    import sentencepiece as spm

    from koen_sllm.tokenizer import (BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, UNK, UNK_ID, train_sentencepiece,
                                     training_lines)

    if cand.get("project"):
        return train_sentencepiece(training_lines(d["text"] for d in train), vocab, "bpe", 0, resolve_num_proc(0))
    options = {**BASELINE_SPM, **cand.get("spm", {})}
    if cand.get("kiwi") or cand.get("units", "lines") != "lines":
        options["pretokenization_delimiter"] = _DELIM
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_units(cand, train, kiwi)), model_writer=model, vocab_size=vocab,
        max_sentence_length=4 * 8192 + 16, num_threads=resolve_num_proc(0), pad_id=PAD_ID, unk_id=UNK_ID,
        bos_id=BOS_ID, eos_id=EOS_ID, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        minloglevel=2, **options)
    return model.getvalue()


def _ratio(texts: list[str], encoded: list[list[int]]) -> float:
    return sum(map(len, texts)) / max(1, sum(map(len, encoded)))


def _quality_row(cand: dict, split: tuple, vocab: int, work: Path, kiwi, all_texts: list[str],
                 reference: Optional[list], baseline_encode: Optional[Callable]) -> tuple[dict, list, Callable]:
    from transformers import AutoTokenizer

    train, held, insrc = split
    start = time.perf_counter()
    proto = _train_candidate(cand, train, vocab, kiwi)
    train_s = time.perf_counter() - start
    folder = work / cand["name"].replace(" ", "_").replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto)
    (folder / "koen_tokenizer.json").write_text(json.dumps({"model_type": "bpe"}) + "\n", encoding="utf-8")
    tok = KoEnTokenizer.load(folder)
    if cand.get("kiwi") == "encode":  # the same boundaries at encode time: each piece encoded on its own
        def encode_batch(texts):
            out = []
            for text in texts:
                parts = kiwi.split(normalize_text(text)) if _hangul_share(text) >= 0.3 else [text]
                out.append([i for ids in tok.encode_batch(parts) for i in ids])
            return out
    else:
        def encode_batch(texts):
            return tok.encode_batch(texts)

    row = {"name": cand["name"], "change": cand["change"], "vocab": tok.vocab_size, "train_s": round(train_s, 1)}
    for label, docs in (("held", held), ("insrc", insrc)):
        for lang in ("ko", "en"):
            texts = [d["text"] for d in docs if d["lang"] == lang]
            row[f"{label}_{lang}"] = _ratio(texts, encode_batch(texts)) if texts else None
    row["held_per_source"] = {}
    for source in sorted({d["source"] for d in held}):
        texts = [d["text"] for d in held if d["source"] == source]
        row["held_per_source"][source] = _ratio(texts, encode_batch(texts))
    # Encoding speed over the whole sample, one thread (what one packing worker does): CPU time, timed
    # alternately with the baseline's tokenizer, so that other work on the machine moves the ratio little.
    mb = sum(len(t.encode("utf-8")) for t in all_texts) / 1e6
    times, base_times = [], []
    for _ in range(1 if cand.get("kiwi") == "encode" else 3):
        t0 = time.process_time()
        encoded = encode_batch(all_texts)
        times.append(time.process_time() - t0)
        if baseline_encode is not None:
            t0 = time.process_time()
            baseline_encode(all_texts)
            base_times.append(time.process_time() - t0)
    row["encode_mb_s"] = mb / statistics.median(times)
    row["encode_vs_baseline"] = statistics.median(base_times) / statistics.median(times) if base_times else 1.0
    checks = all_texts + EXACT_TEXTS
    encoded += encode_batch(EXACT_TEXTS)
    row["round_trip_failures"] = sum(tok.decode(ids) != normalize_text(t) for t, ids in zip(checks, encoded))
    # The same model through SentencePiece alone, without encode's handling of a literal U+2581.
    plain = tok.sp.encode([normalize_text(t) for t in checks])
    row["plain_sentencepiece_round_trip_failures"] = sum(tok.sp.decode(ids) != normalize_text(t)
                                                         for t, ids in zip(checks, plain))
    row["literal_u2581_ok"] = all(tok.decode(ids) == t for t, ids in zip(EXACT_TEXTS[:6], encode_batch(EXACT_TEXTS[:6])))
    if cand.get("kiwi") == "encode":
        row["hf_mismatches"] = None  # tokenizer.json has no Korean morphological analyser
    else:
        try:
            tok.save_pretrained(folder)
            hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            theirs = hf([normalize_text(t) for t in checks])["input_ids"]
            row["hf_mismatches"] = sum(a != b for a, b in zip(theirs, encoded))
            row["hf_decode_failures"] = sum(hf.decode(ids) != normalize_text(t) for t, ids in zip(checks, encoded))
        except Exception as exc:  # noqa: BLE001 - a failed export is a result here
            row["hf_mismatches"] = f"export failed: {exc}"
    # Characters outside the vocabulary cost one token per UTF-8 byte (a newline is one byte piece in the
    # baseline and not counted here). "byte_ceiling" is chars/token if each of them cost one token: the most
    # any byte-level alphabet (merged bytes for Hanja, emoji, rare syllables) could give.
    sp = tok.sp
    for lang in ("ko", "en"):
        texts = [normalize_text(d["text"]) for d in held if d["lang"] == lang]
        ids = [i for t in tok.encode_batch(texts) for i in t]
        counts: dict[str, int] = {}
        for t in texts:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        outside = {c for c in counts if c != "\n" and sp.is_byte(sp.encode(c)[0])}
        fallback_chars = sum(counts[c] for c in outside)
        fallback_bytes = sum(len(c.encode("utf-8")) * counts[c] for c in outside)
        row[f"held_{lang}_byte_share"] = fallback_bytes / max(1, len(ids))
        row[f"held_{lang}_byte_ceiling"] = _ratio(texts, [[0] * (len(ids) - fallback_bytes + fallback_chars)])
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    row["same_model_as_kept"] = None if reference is None else pieces == reference
    return row, pieces, encode_batch


QUALITY_CANDIDATES = [
    # First block: one change to the baseline each. Second block: one change to the kept configuration each.
    dict(name="baseline", change="plain SentencePiece BPE, same exactness rules"),
    dict(name="previous", change="the project before: + allow_whitespace_only_pieces",
         spm=dict(allow_whitespace_only_pieces=True)),
    dict(name="coverage 1.0", change="character_coverage 1.0 (every training character a piece)",
         spm=dict(character_coverage=1.0)),
    dict(name="coverage 0.9999", change="character_coverage 0.9999", spm=dict(character_coverage=0.9999)),
    dict(name="no script split", change="split_by_unicode_script false (`다.` `'s` `e,` pieces)",
         spm=dict(split_by_unicode_script=False)),
    dict(name="no whitespace split", change="split_by_whitespace false (multi-word pieces `▁of▁the`)",
         spm=dict(split_by_whitespace=False)),
    dict(name="whitespace suffix", change="treat_whitespace_as_suffix (`word▁` instead of `▁word`)",
         spm=dict(treat_whitespace_as_suffix=True)),
    dict(name="max length 8", change="max_sentencepiece_length 8 (default 16)", spm=dict(max_sentencepiece_length=8)),
    dict(name="max length 32", change="max_sentencepiece_length 32", spm=dict(max_sentencepiece_length=32)),
    dict(name="newline alone", change="newline runs are pieces (`\\n\\n`), joined to nothing", units="alone"),
    dict(name="newline after punct", change="pieces may end in newlines after punctuation (`.\\n`), never "
         "after a letter or digit, never go past one", units="after_punct"),
    dict(name="newline after", change="pieces may end in newlines after anything (`▁영화\\n`)", units="after"),
    dict(name="newline free", change="whole documents: pieces may also go past a newline (`\\n이`)", units="docs"),
    dict(name="ko share 50%", change="English text weighted up to 50% of the characters", ko_share=0.5),
    dict(name="ko share 75%", change="Korean text weighted up to 75% of the characters", ko_share=0.75),
    dict(name="kiwi (training)", change="morpheme boundaries stem / particle or ending (kiwipiepy), training only",
         kiwi="train"),
    dict(name="KEPT", change="no script split + newline alone + allow_whitespace_only_pieces", kept=True),
    dict(name="project", change="what koen_sllm.tokenizer trains (train_sentencepiece, training_lines): must equal KEPT",
         project=True),
    dict(name="kept + coverage 1.0", change="character_coverage 1.0", on_kept=True, spm=dict(character_coverage=1.0)),
    dict(name="kept + newline after punct", change="newlines may end pieces after punctuation (`다.\\n`)",
         on_kept=True, units="after_punct"),
    dict(name="kept + newline after", change="newlines may end pieces after anything (`▁영화\\n`)", on_kept=True,
         units="after"),
    dict(name="kept + newline free", change="whole documents", on_kept=True, units="docs"),
    dict(name="kept + no whitespace split", change="split_by_whitespace false", on_kept=True,
         spm=dict(split_by_whitespace=False)),
    dict(name="kept + whitespace suffix", change="treat_whitespace_as_suffix", on_kept=True,
         spm=dict(treat_whitespace_as_suffix=True)),
    dict(name="kept + max length 32", change="max_sentencepiece_length 32", on_kept=True,
         spm=dict(max_sentencepiece_length=32)),
    dict(name="kept + ko share 50%", change="English weighted up to 50%", on_kept=True, ko_share=0.5),
    dict(name="kept + ko share 75%", change="Korean weighted up to 75%", on_kept=True, ko_share=0.75),
    dict(name="kept + kiwi (training)", change="stem / ending boundaries at training only", on_kept=True,
         kiwi="train"),
    dict(name="kept + kiwi (encode too)", change="the same boundaries at training and at encode time",
         on_kept=True, kiwi="encode"),
]


def _resolve_candidate(cand: dict) -> dict:
    if not (cand.get("kept") or cand.get("on_kept")):
        return cand
    spm_options = {**KEPT["spm"], **cand.get("spm", {})}
    return {**cand, "spm": spm_options, "units": cand.get("units", KEPT["units"])}


def quality(docs: list[dict], held_sources: set[str], vocab: int, work: Path, only: Optional[set[str]],
            speed_repeats: int = 5) -> dict:
    split = quality_split(docs, held_sources)
    kiwi = None
    cands = [_resolve_candidate(c) for c in QUALITY_CANDIDATES if not only or c["name"] in only or c.get("project")
             or c["name"] in ("baseline", "KEPT")]
    if any(c.get("kiwi") for c in cands):
        try:
            kiwi = _KiwiBoundaries()
        except ImportError:
            print("  (kiwipiepy not installed: the kiwi rows are skipped; pip install kiwipiepy to measure them)")
            cands = [c for c in cands if not c.get("kiwi")]
    train, held, insrc = split
    all_texts = [d["text"] for d in train + held + insrc]
    print(f"held-out sources: {', '.join(sorted(held_sources))} ({len(held)} docs: "
          + ", ".join(f"{lang} {sum(len(d['text']) for d in held if d['lang'] == lang):,} chars" for lang in ("ko", "en"))
          + f"); training: {len(train)} docs of the other sources; in-source held-out: {len(insrc)} docs")
    rows, kept_pieces, encoders = [], None, {}
    for cand in cands:
        row, pieces, encoders[cand["name"]] = _quality_row(cand, split, vocab, work, kiwi, all_texts,
                                                           kept_pieces if cand.get("project") else None,
                                                           encoders.get("baseline"))
        if cand.get("kept"):
            kept_pieces = pieces
        rows.append(row)
        base = rows[0]
        delta = {k: (row[k] / base[k] - 1) * 100 for k in ("held_ko", "held_en") if row[k] and base[k]}
        print(f"  {row['name']:<28} held ko {row['held_ko']:.3f} ({delta['held_ko']:+5.1f}%)  "
              f"en {row['held_en']:.3f} ({delta['held_en']:+5.1f}%)  in-source ko {row['insrc_ko']:.3f} "
              f"en {row['insrc_en']:.3f}  train {row['train_s']:5.1f}s  encode {row['encode_mb_s']:5.2f} MB/s "
              f"(x{row['encode_vs_baseline']:.2f} baseline)  "
              f"round-trip failures {row['round_trip_failures']} (SentencePiece alone "
              f"{row['plain_sentencepiece_round_trip_failures']})  transformers mismatches {row['hf_mismatches']}"
              + ("" if row["same_model_as_kept"] is None else f"  same vocabulary as KEPT: {row['same_model_as_kept']}"),
              flush=True)
    project = next((r for r in rows if r["name"] == "project"), None)
    if project and project["same_model_as_kept"] is False:
        print("warning: koen_sllm.tokenizer trains another vocabulary than KEPT describes; update KEPT")
    for name in ("baseline", "KEPT"):
        per = next(r for r in rows if r["name"] == name)["held_per_source"]
        print(f"  {name} per held-out source: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    # Encoding speed, baseline against the project: more interleaved repeats than each row's three.
    speed: dict[str, list[float]] = {"baseline": [], "project": []}
    mb = sum(len(t.encode("utf-8")) for t in all_texts) / 1e6
    for _ in range(speed_repeats):
        for name in speed:
            t0 = time.process_time()
            encoders[name](all_texts)
            speed[name].append(mb / (time.process_time() - t0))
    speed_mb_s = {k: statistics.median(v) for k, v in speed.items()}
    print(f"  encoding speed (MB of text per CPU second, one thread), median of {speed_repeats} interleaved runs "
          "over the whole sample: "
          + ", ".join(f"{k} {v:.2f} MB/s" for k, v in speed_mb_s.items())
          + f" (project/baseline {speed_mb_s['project'] / speed_mb_s['baseline']:.3f})")
    return {"held_out_sources": sorted(held_sources), "docs": {"train": len(train), "held": len(held),
                                                                "in_source": len(insrc)}, "rows": rows,
            "encode_mb_s_interleaved": speed_mb_s, "encode_runs_mb_s": speed}


def quality_table(result: dict) -> str:
    """The Markdown table of docs/data.md."""
    rows = result["rows"]
    base = rows[0]
    out = ["| configuration | change | held-out ko | Δ | held-out en | Δ | in-source ko | in-source en | "
           "encoding speed | round trip | transformers |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        hf = r["hf_mismatches"]
        hf = "n/a" if hf is None else ("identical" if hf == 0 else f"{hf} differ")
        rt = "exact" if r["round_trip_failures"] == 0 else f"{r['round_trip_failures']} fail"
        out.append(f"| {r['name']} | {r['change']} | {r['held_ko']:.3f} | {(r['held_ko'] / base['held_ko'] - 1) * 100:+.1f}% "
                   f"| {r['held_en']:.3f} | {(r['held_en'] / base['held_en'] - 1) * 100:+.1f}% | {r['insrc_ko']:.3f} "
                   f"| {r['insrc_en']:.3f} | x{r['encode_vs_baseline']:.2f} | {rt} | {hf} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL with a 'text' (and 'lang') field")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: train a 32k BPE on --data)")
    p.add_argument("--num-proc", type=int, default=0, help="parallel workers (0 = all usable cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab-sweep", action="store_true", help="also compare BPE/unigram at several sizes")
    p.add_argument("--sizes", default="8000,16000,32000,48000")
    p.add_argument("--quality", action="store_true",
                   help="only: the tokenizer against a fair baseline and every candidate (docs/data.md)")
    p.add_argument("--held-out", default=HELD_OUT_SOURCES,
                   help="--quality: sources (the 'source' field) left out of training, comma-separated")
    p.add_argument("--candidates", help="--quality: only these rows (comma-separated names; baseline, KEPT "
                                        "and project always run)")
    p.add_argument("--vocab-size", type=int, default=32000, help="--quality: vocabulary of every row")
    p.add_argument("--json-out", type=Path, help="write all numbers here")
    args = p.parse_args()
    if not args.data.is_file():
        print(f"error: {args.data} not found; pass --data", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    procs = resolve_num_proc(args.num_proc)
    docs = [json.loads(line) for line in args.data.open(encoding="utf-8")]
    held = {s.strip() for s in args.held_out.split(",") if s.strip()}
    if args.quality:
        sources = {(d.get("source"), d.get("lang")) for d in docs}
        for lang in ("ko", "en"):
            left = {s for s, la in sources if la == lang and s not in held}
            if not left or left == {s for s, la in sources if la == lang}:
                print(f"error: --held-out must leave out some but not all {lang} sources "
                      f"(there are: {', '.join(sorted(str(s) for s, la in sources if la == lang))})", file=sys.stderr)
                return 2
    result = {"machine": machine(), "data": str(args.data), "load_before": load()}
    print(f"machine: {result['machine']}\ndata: {args.data} ({len(docs):,} docs)\nload average: {result['load_before']}")
    if args.quality:
        only = {s.strip() for s in args.candidates.split(",")} if args.candidates else None
        with tempfile.TemporaryDirectory() as work:
            result["quality"] = quality(docs, held, args.vocab_size, Path(work), only, args.repeats)
        print(quality_table(result["quality"]))
        kept = next(r for r in result["quality"]["rows"] if r["name"] == "KEPT")
        print("bytes for characters outside the vocabulary (KEPT, held-out): "
              + ", ".join(f"{lang} {kept[f'held_{lang}_byte_share']:.2%} of tokens, chars/token at most "
                          f"{kept[f'held_{lang}_byte_ceiling']:.3f} if each cost one token" for lang in ("ko", "en")))
    else:
        run_throughput(args, docs, procs, result)
    result["load_after"] = load()
    print(f"load average after: {result['load_after']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def run_throughput(args, docs: list[dict], procs: int, result: dict) -> None:
    with tempfile.TemporaryDirectory() as work:
        if args.tokenizer:
            tok = KoEnTokenizer.load(args.tokenizer)
        else:
            tok = train_tokenizer(args.data, Path(work) / "tok", 32000, log=lambda _: None)
        print(f"tokenizer: {tok.model_type} {tok.vocab_size:,} pieces")
        result["throughput"] = throughput(args.data, tok, procs, args.repeats)
        default = "threads" if procs <= AUTO_THREADS_MAX else "processes"
        for name, row in result["throughput"].items():
            if name != "text_mb":
                mark = "  <- default (auto)" if name.startswith(default) else ""
                print(f"  {name:<16}{row['mb_per_s']:8.2f} MB/s   x{row['speedup']:.2f}   runs {row['runs_s']}{mark}")
        result["chars_per_token"] = chars_per_token(tok, docs)
        print("chars/token: " + ", ".join(f"{k} {v:.3f}" for k, v in result["chars_per_token"].items()))
        if args.vocab_sweep:
            print("vocabulary sweep (chars/token on a held-out 5%):")
            result["sweep"] = vocab_sweep(docs, [int(s) for s in args.sizes.split(",")], Path(work))


if __name__ == "__main__":
    sys.exit(main())
