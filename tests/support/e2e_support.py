"""Shared pieces of the end-to-end tests: a small corpus, the CPU environment, run readers."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

KO = ["오늘", "날씨가", "좋아서", "공원에", "산책을", "했습니다", "모델을", "학습하고", "데이터를", "정리했다", "한국어", "문장"]
EN = ["the", "model", "reads", "small", "batches", "of", "text", "and", "learns", "quickly", "every", "day"]


def write_corpus(folder: Path, docs: int = 300, seed: int = 11) -> Path:
    """A deterministic Korean/English JSONL corpus (60% Korean documents) in `folder`."""
    rng = random.Random(seed)
    with (folder / "mixed_pretraining.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(docs):
            lang, words = ("ko", KO) if i % 5 < 3 else ("en", EN)
            text = " ".join(" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(8))
            fh.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    return folder


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment for a child run: one thread per process, offline, this virtualenv first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KOEN_CONSOLE_LOG", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", KOEN_NO_INSTALL="1")
    env.update(extra)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from logs/metrics.jsonl; a resumed run's records replace the killed run's."""
    out: dict[int, float] = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def latest(run_dir: Path) -> str:
    return (run_dir / "out" / "latest").read_text().strip()
