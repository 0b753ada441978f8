#!/usr/bin/env python3
"""Tokenization throughput: the parallel paths against a plain single-process loop.

    python benchmarks/bench_tokenize.py                       # ../shared/data/ko_en_sample.jsonl, 32k BPE
    python benchmarks/bench_tokenize.py --data corpus.jsonl --tokenizer datasets/prepared/mixed_pretraining/tokenizer
    python benchmarks/bench_tokenize.py --vocab-sweep         # BPE vs unigram at 8k/16k/32k/48k (docs/data.md)

All paths run in the same process, on the same file and tokenizer, in
interleaved repeats (median reported), and must produce identical ids. The
work measured is what packing does: parse JSON, NFC, encode, append EOS,
convert to a numpy array. Throughput is UTF-8 megabytes of text per second.
Not a test: numbers depend on the machine and on whatever else runs on it,
so the load average is printed with them.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from koen_sllm.config import repo_root  # noqa: E402
from koen_sllm.data.pack import AUTO_THREADS_MAX, encode_jsonl, resolve_num_proc  # noqa: E402
from koen_sllm.tokenizer import KoEnTokenizer, train_tokenizer, train_tokenizer_on_texts  # noqa: E402

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL with a 'text' (and 'lang') field")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: train a 32k BPE on --data)")
    p.add_argument("--num-proc", type=int, default=0, help="parallel workers (0 = all usable cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab-sweep", action="store_true", help="also compare BPE/unigram at several sizes")
    p.add_argument("--sizes", default="8000,16000,32000,48000")
    p.add_argument("--json-out", type=Path, help="write all numbers here")
    args = p.parse_args()
    if not args.data.is_file():
        print(f"error: {args.data} not found; pass --data", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    procs = resolve_num_proc(args.num_proc)
    docs = [json.loads(line) for line in args.data.open(encoding="utf-8")]
    result = {"machine": machine(), "data": str(args.data), "load_before": load()}
    print(f"machine: {result['machine']}\ndata: {args.data} ({len(docs):,} docs)\nload average: {result['load_before']}")
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
    result["load_after"] = load()
    print(f"load average after: {result['load_after']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
