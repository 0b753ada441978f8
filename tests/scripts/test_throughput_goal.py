"""benchmarks/throughput_goal.py: reports in, one verdict per target out; failed or cut-short runs
are "not measured", a GPU other than the goal's is named, and nothing here needs a GPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from koen_sllm.config import repo_root

SCRIPT = repo_root() / "benchmarks" / "throughput_goal.py"


def load_module():
    spec = importlib.util.spec_from_file_location("throughput_goal", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tg = load_module()


def report(device="NVIDIA H100 80GB HBM3", ours=(180_000, 0.52), peer=(80_000, 0.23), curve=None, partial=False):
    results = [{"name": "koen_sllm", "tokens_per_s": ours[0], "mfu": ours[1]}]
    if peer:
        results.append({"name": tg.PEER, "tokens_per_s": peer[0], "mfu": peer[1]})
    rep = {"device": device, "results": results}
    if curve:
        rep["curve"] = {"ours_vs_peer_mean": curve[0], "noise_mean": curve[1]}
    if partial:
        rep["partial"] = True
    return rep


def verdicts(reports):
    return [v for _, _, v in tg.judge(reports)]


def test_targets_met_on_the_goals_gpu():
    rows = tg.judge({"350m_b8": report(), "1.3b_b4": report(ours=(60_000, 0.46), peer=None)})
    assert [v for _, _, v in rows] == ["met", "met", "met"]
    assert "52.0%" in rows[0][1] and "2.25x" in rows[1][1] and "46.0%" in rows[2][1]


def test_each_target_can_miss_on_its_own():
    assert verdicts({"350m_b8": report(ours=(180_000, 0.49)), "1.3b_b4": report(ours=(60_000, 0.46), peer=None)}) \
        == ["not met", "met", "met"]
    assert verdicts({"350m_b8": report(peer=(120_000, 0.3)), "1.3b_b4": report(ours=(50_000, 0.44), peer=None)}) \
        == ["met", "not met", "not met"]


def test_another_gpu_is_named_instead_of_met():
    v = verdicts({"350m_b8": report(device="NVIDIA H200"), "1.3b_b4": report(device="NVIDIA H200", peer=None)})
    assert all(x.startswith("met on NVIDIA H200") and "H100" in x for x in v)


def test_missing_runs_and_a_missing_peer_are_not_measured():
    assert verdicts({"350m_b8": None, "1.3b_b4": None}) == ["not measured"] * 3
    assert verdicts({"350m_b8": report(peer=None), "1.3b_b4": None}) == ["met", "not measured", "not measured"]


def test_a_cut_short_or_unreadable_report_is_not_used(tmp_path):
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(report(partial=True)))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert tg.load(cut) is None and tg.load(bad) is None and tg.load(tmp_path / "absent.json") is None
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report()))
    assert tg.load(good)["device"].endswith("HBM3")


def test_judge_only_reads_earlier_json_and_adds_the_curve_when_present(tmp_path, capsys):
    (tmp_path / "350m_b8.json").write_text(json.dumps(report()))
    (tmp_path / "1.3b_b4.json").write_text(json.dumps(report(ours=(60_000, 0.40), peer=None)))
    assert tg.main(["--out", str(tmp_path), "--judge-only"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| met |") == 2 and "| not met |" in summary and "curve" not in summary
    (tmp_path / "curve.json").write_text(json.dumps(report(curve=(0.036, 0.026))))
    tg.main(["--out", str(tmp_path), "--judge-only"])
    out = capsys.readouterr().out
    assert "0.036" in out and "0.026" in out and "read against the noise" in out


def test_runs_each_benchmark_and_a_failing_one_is_not_measured(tmp_path, monkeypatch, capsys):
    # A stand-in for bench_throughput.py: writes a finished report, except for the 1.3b preset.
    fake = tmp_path / "fake_bench.py"
    fake.write_text(
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "if '1.3b' in a: sys.exit(3)\n"
        f"rep = {json.dumps(report(device='NVIDIA H100 PCIe'))}\n"
        "open(a[a.index('--json') + 1], 'w').write(json.dumps(rep))\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.3b_b4.json").write_text(json.dumps(report(ours=(70_000, 0.6), peer=None)))  # an earlier run's
    monkeypatch.setattr(tg, "BENCH", fake)
    assert tg.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1.3b_b4 failed (exit 3)" in text
    assert verdicts({n: tg.load(out / f"{n}.json") for n in tg.RUNS}) == ["met", "met", "not measured"]
    assert "| not measured |" in (out / "summary.md").read_text()


def test_a_missing_curve_file_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tg.main(["--out", str(tmp_path), "--curve-data", str(tmp_path / "train.bin")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train.bin: no such file" in err and "run_preprocessing.sh" in err


def test_the_script_runs_as_a_command(tmp_path):
    import subprocess
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--judge-only"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.count("not measured") == 3
