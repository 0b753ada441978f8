"""scripts/plot_metrics.py: records in, a PNG with the right panels out; bad files give clear errors."""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from koen_sllm.config import repo_root

pytest.importorskip("matplotlib")
SCRIPT = repo_root() / "scripts" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_module():
    spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


pm = load_module()


def write_records(path: Path, records, extra_lines=()) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


def full_records(steps=30):
    out = []
    for s in range(1, steps + 1):
        out.append({"type": "train", "step": s, "loss": 8 * math.exp(-s / 10) + 2, "lr": 1e-4 * min(1, s / 5),
                    "grad_norm": 1 + 0.1 * (s % 3), "tokens_per_s": 1000 + s, "tokens_per_s_per_gpu": 500 + s,
                    "mfu": 0.4, "mem_gib": 3.5, "tokens_seen": s * 4096, "elapsed_s": s * 0.5})
        if s % 10 == 0:
            out.append({"type": "eval", "step": s, "val_loss_ko": 3.1, "val_bpb_ko": 1.1, "val_loss_en": 2.9,
                        "val_bpb_en": 0.9, "val_loss": 3.0})
    return out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_full_run_gives_all_panels_in_a_valid_png(tmp_path):
    src = write_records(tmp_path / "metrics.jsonl", full_records())
    res = pm.plot_metrics(src, dpi=50)
    out = tmp_path / "loss_curve.png"  # default: next to the input
    assert res["out"] == out
    assert res["panels"] == ["train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "memory", "grad_norm"]
    assert (res["train"], res["eval"], res["malformed"]) == (30, 3, 0)
    width, height = png_size(out)
    assert (width, height) == (650, 680)  # 2 columns x 4 rows of 6.5 x 3.4 in, at 50 dpi
    assert out.stat().st_size > 10_000


def test_figure_axes_match_the_panels():
    m = pm.Metrics(train=[{"type": "train", "step": s, "loss": 5.0 - s * 0.1, "lr": 1e-4} for s in range(1, 6)])
    fig, names = pm.build_figure(m)
    assert names == ["train_loss", "lr"] and len(fig.axes) == 2
    assert fig.axes[0].get_title().startswith("training loss (last 4.5000")


def test_minimal_records_give_one_panel(tmp_path):
    src = write_records(tmp_path / "m.jsonl", [{"step": s, "loss": 3.0} for s in range(1, 4)])
    res = pm.plot_metrics(src, tmp_path / "sub" / "one.png", dpi=40)
    assert res["panels"] == ["train_loss"]
    assert png_size(tmp_path / "sub" / "one.png") == (260, 136)


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    src = write_records(tmp_path / "metrics.jsonl", full_records(5),
                        ["{not json", '{"type": "train", "loss": 1.0}', "[1, 2]", '{"type": "note", "step": 1}'])
    res = run_cli(str(src), "-o", str(tmp_path / "x.png"), "--dpi", "40")
    assert res.returncode == 0, res.stderr
    assert "skipped 3 malformed line(s)" in res.stderr and "first at line 6" in res.stderr
    assert "wrote" in res.stdout and (tmp_path / "x.png").read_bytes()[:8] == PNG_SIGNATURE


def test_resumed_steps_keep_the_later_record(tmp_path):
    first = [{"type": "train", "step": s, "loss": 10.0 + s} for s in range(1, 6)]
    after_resume = [{"type": "train", "step": s, "loss": 1.0 * s} for s in range(3, 8)]
    m = pm.load_metrics(write_records(tmp_path / "m.jsonl", first + after_resume))
    assert [r["step"] for r in m.train] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in m.train] == [11.0, 12.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert m.superseded == 3


def test_ema_is_debiased():
    assert pm.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert pm.ema([0.0, 2.0], 0.5) == pytest.approx([0.0, 1.0 / 0.75])


@pytest.mark.parametrize("content, needle", [
    (None, "metrics file not found"),
    ("", "no training records"),
    ("garbage\n{broken\n", "no training records"),
    ('{"type": "eval", "step": 1, "val_loss": 2.0}\n', "no training records"),
])
def test_unusable_files_are_clear_errors(tmp_path, content, needle):
    src = tmp_path / "metrics.jsonl"
    if content is not None:
        src.write_text(content)
    res = run_cli(str(src))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not (tmp_path / "loss_curve.png").exists()
    if content == "garbage\n{broken\n":
        assert "2 malformed line(s), first at line 1" in lines[0]


def test_bad_smoothing_is_rejected(tmp_path):
    src = write_records(tmp_path / "m.jsonl", full_records(3))
    res = run_cli(str(src), "--smooth", "1.5")
    assert res.returncode == 2 and "--smooth must lie in [0, 1)" in res.stderr
