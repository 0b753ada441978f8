"""benchmarks/curve_band.py: several --curve reports pooled into one bf16 band, each lever read
against the bf16 runs of its own seed; no GPU needed."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from koen_sllm.config import repo_root

SCRIPT = repo_root() / "benchmarks" / "curve_band.py"


def load_module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("curve_band", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cb = load_module()
ARGS = {"model_size": "1.3b", "batch_size": "4", "seq_len": "2048", "steps": "200", "seed": "1",
        "data": "train.bin", "lr": "0.0003", "warmup_steps": "20"}


def curve(seed: int, shift: float = 0.0, steps: int = 200) -> list:
    """A falling loss with a little run-to-run noise; ``shift`` lifts it from step 60 on."""
    rng = np.random.default_rng(seed)
    x = np.arange(steps)
    return list(10 - 2 * np.log1p(x / 20) + rng.normal(0, 0.05, steps) + shift * (x >= 60))


def report(run: int, lever: str, shift: float, **args) -> dict:
    return {"args": {**ARGS, **args}, "title": "1.3b test",
            "results": [{"name": "koen_sllm bf16", "losses": curve(10 + run)},
                        {"name": f"koen_sllm {lever}", "losses": curve(20 + run, shift)},
                        {"name": "koen_sllm bf16 seed 2", "losses": curve(30 + run)}]}


def test_a_lever_that_lags_is_outside_the_band_and_one_that_does_not_is_inside():
    b = cb.band({"a.json": report(0, "fp8 (native)", 0.15), "b.json": report(1, "fp8 (torchao)", 0.0),
                 "c.json": report(2, "fp8 (native)", 0.15)})
    assert b["bf16_runs"] == 6
    assert set(b["band"]) == {"run to run", "seed to seed"}
    by_name = {lev["name"]: lev for lev in b["levers"]}
    assert not by_name["koen_sllm fp8 (native) (a)"]["inside"] and not by_name["koen_sllm fp8 (native) (c)"]["inside"]
    assert by_name["koen_sllm fp8 (torchao) (b)"]["inside"]
    assert len(by_name["koen_sllm fp8 (torchao) (b)"]["to_bf16"]) == 3  # each bf16 run of its seed
    assert by_name["koen_sllm fp8 (native) (a)"]["mean"] > b["band_max"] >= by_name["koen_sllm fp8 (torchao) (b)"]["mean"]
    lines = cb.report_lines(b)
    assert lines[0].startswith("bf16 band over 6 runs: run to run ") and "outside the band" in lines[1]


def test_runs_of_different_commands_or_without_a_lever_are_refused():
    with pytest.raises(cb.BandError, match=r"b.json: seed is '2', but a.json has '1'"):
        cb.band({"a.json": report(0, "fp8", 0), "b.json": report(1, "fp8", 0, seed="2")})
    plain = report(0, "fp8", 0)
    plain["results"] = plain["results"][:2]
    with pytest.raises(cb.BandError, match="a.json: not a --curve report with a lever"):
        cb.band({"a.json": plain})
    with pytest.raises(cb.BandError, match="no curve reports"):
        cb.band({})


def test_the_command_line_writes_the_band_and_the_picture(tmp_path, capsys):
    paths = []
    for i, shift in enumerate((0.2, 0.0)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report(i, "fp8", shift)))
    out, png = tmp_path / "band.json", tmp_path / "band.png"
    assert cb.main([*map(str, paths), "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "(r0): to the bf16 runs of its seed" in printed and "outside the band" in printed
    assert [lev["inside"] for lev in json.loads(out.read_text())["levers"]] == [False, True]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit) as e:
        cb.main([str(tmp_path / "bad.json")])
    assert e.value.code == 2 and "bad.json: cannot read it as JSON" in capsys.readouterr().err
