#!/usr/bin/env python3
"""Data preparation at corpus scale: time, throughput, peak memory and peak disk per input size.

    python benchmarks/bench_prepare_scale.py                         # 10 / 100 / 500 MB from the sample
    python benchmarks/bench_prepare_scale.py --sizes 10,100 --twice  # and build the largest twice, compare

The input of each size is the sample (../shared/data/ko_en_sample.jsonl) replicated; every copy
after the first has the words of each line shuffled with its own seed, so no document repeats
(nothing deduplicates) while the characters, languages and line lengths stay the sample's. Each
size runs the user's command, ``python -m koen_sllm.data.prepare INPUT --recipe1``, from an empty
folder, in a process of its own: wall time, CPU seconds (user + system, children included), the
peak resident memory of the largest process, and the peak disk used under the output folder
(sampled every 0.2 s). With --twice the largest size is prepared again in another folder and
the tokenizer and token files are compared byte for byte. Not a test: numbers depend on the
machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ko_en_sample.jsonl"


def make_input(sample: Path, out: Path, size_mb: int) -> int:
    """``size_mb`` megabytes of JSONL from ``sample``; returns the bytes written."""
    docs = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    target = size_mb * 1_000_000
    written, copy = 0, 0
    with open(out, "w", encoding="utf-8") as f:
        while written < target:
            for i, doc in enumerate(docs):
                text = doc["text"]
                if copy:
                    rng = random.Random(copy * 1_000_003 + i)
                    lines = []
                    for line in text.split("\n"):
                        words = line.split(" ")
                        rng.shuffle(words)
                        lines.append(" ".join(words))
                    text = "\n".join(lines)
                row = json.dumps({**doc, "text": text}, ensure_ascii=False) + "\n"
                f.write(row)
                written += len(row.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return written


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def run_prepare(inp: Path, work: Path) -> dict:
    """The user's command on ``inp`` into ``work``; the measurements of one run."""
    work.mkdir(parents=True)
    peak = {"disk": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["disk"] = max(peak["disk"], _du(work))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # A runner process of its own, so getrusage(RUSAGE_CHILDREN) counts this size alone.
    code = ("import resource, subprocess, sys, json, time\n"
            "t = time.monotonic()\n"
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': r.returncode, 'wall': time.monotonic() - t, 'cpu': u.ru_utime + u.ru_stime,"
            " 'maxrss_kb': u.ru_maxrss, 'stderr': r.stderr[-2000:]}))\n")
    cmd = [sys.executable, "-m", "koen_sllm.data.prepare", str(inp), "--recipe1", "--output",
           str(work / "mixed_pretraining.jsonl")]
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    done.set()
    watcher.join()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"prepare failed on {inp}: {out['stderr']}")
    out["peak_disk"] = max(peak["disk"], _du(work))
    meta = json.loads((work / "prepared" / "mixed_pretraining" / "meta.json").read_text())
    out["tokenizer"] = meta["tokenizer"]
    out["tokens"] = sum(s["tokens"] for s in meta["splits"].values())
    return out


def digests(prepared: Path) -> dict:
    names = ["tokenizer/tokenizer.model"] + sorted(p.name for p in prepared.glob("*.bin"))
    return {n: hashlib.sha256((prepared / n).read_bytes()).hexdigest() for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", default="10,100,500", help="input sizes in MB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/koen-prepare-scale"))
    ap.add_argument("--twice", action="store_true", help="prepare the largest size twice and compare the files")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: pass --data")
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for mb in sizes:
        inp = args.work / f"input-{mb}mb.jsonl"
        nbytes = make_input(args.data, inp, mb)
        r = run_prepare(inp, args.work / f"run-{mb}mb")
        r["input"] = nbytes
        rows.append(r)
        tok = r["tokenizer"]
        print(f"{mb:>5} MB: wall {r['wall']:7.1f} s, CPU {r['cpu']:7.1f} s ({r['cpu'] / (nbytes / 1e6):.3f} CPU-s/MB), "
              f"{nbytes / 1e6 / r['wall']:5.2f} MB/s, peak memory {r['maxrss_kb'] / 1024:7.0f} MiB, "
              f"peak disk {r['peak_disk'] / 2**20:7.0f} MiB ({r['peak_disk'] / nbytes:.2f}x the input), "
              f"tokenizer lines {tok.get('sample_lines', 0):,} of {tok.get('training_lines', 0):,}", flush=True)
        (args.work / f"input-{mb}mb.jsonl").unlink() if mb != sizes[-1] or not args.twice else None
    print("\n| input | wall | CPU | CPU-s per MB | MB/s | peak memory (largest process) | peak disk | "
          "tokenizer lines (sample of) |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mb, r in zip(sizes, rows):
        tok = r["tokenizer"]
        print(f"| {mb} MB | {r['wall']:.1f} s | {r['cpu']:.1f} s | {r['cpu'] / (r['input'] / 1e6):.3f} | "
              f"{r['input'] / 1e6 / r['wall']:.2f} | {r['maxrss_kb'] / 1024:,.0f} MiB | "
              f"{r['peak_disk'] / 2**20:,.0f} MiB ({r['peak_disk'] / r['input']:.2f}x) | "
              f"{tok.get('sample_lines', 0):,} of {tok.get('training_lines', 0):,} |")
    if args.twice:
        mb = sizes[-1]
        first = digests(args.work / f"run-{mb}mb" / "prepared" / "mixed_pretraining")
        again = run_prepare(args.work / f"input-{mb}mb.jsonl", args.work / f"run-{mb}mb-again")
        second = digests(args.work / f"run-{mb}mb-again" / "prepared" / "mixed_pretraining")
        same = first == second
        print(f"\n{mb} MB prepared twice (wall {again['wall']:.1f} s): tokenizer and token files "
              f"{'byte-identical' if same else 'DIFFER'}")
        for name in first:
            print(f"  {name}: {first[name][:16]} {'==' if first[name] == second.get(name) else '!='} "
                  f"{second.get(name, '')[:16]}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
