"""benchmarks/throughput_goal.py: reports in, one verdict per target out; failed or cut-short runs
are "not measured", a GPU other than the goal's is named, the tuned Trainer's settings stand next
to its ratio, FP8 is judged against bf16 of the same call, torchtitan is reported without a
target, and nothing here needs a GPU."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from koen_sllm.config import repo_root

SCRIPT = repo_root() / "benchmarks" / "throughput_goal.py"
H100 = "NVIDIA H100 80GB HBM3"
SETTINGS = {"logging_steps": 10, "dataloader_num_workers": 2, "dataloader_prefetch_factor": 2,
            "accelerator_config.non_blocking": True, "logging_nan_inf_filter": False, "disable_tqdm": True,
            "torch_compile": True, "optim": "adamw_torch_fused"}


def load_module():
    spec = importlib.util.spec_from_file_location("throughput_goal", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tg = load_module()


def report(device=H100, ours=(220_000, 0.54), peer=(100_000, 0.25), curve=None, partial=False, settings=SETTINGS):
    results = [{"name": "koen_sllm", "tokens_per_s": ours[0], "mfu": ours[1]}]
    if peer:
        results.append({"name": tg.PEER, "tokens_per_s": peer[0], "mfu": peer[1], "peer_settings": settings})
    rep = {"device": device, "results": results}
    if peer and settings:
        rep["peer_settings"] = settings
    if curve:
        rep["curve"] = {"ours_vs_peer_mean": curve[0], "noise_mean": curve[1]}
    if partial:
        rep["partial"] = True
    return rep


def titan(tokens=150_000, mfu=0.37, device=H100, mode="trainer", version="0.2.2"):
    return {"device": device, "torchtitan": version, "mode": mode, "reason": "its own Trainer",
            "results": [{"name": "torchtitan", "tokens_per_s": tokens, "mfu": mfu, "mode": mode,
                         "torchtitan": version}]}


def big(tokens=70_000, mfu=0.58, device=H100):
    return report(device=device, ours=(tokens, mfu), peer=None)


def base(**over):
    reps = {"350m_b8": report(), "1.3b_b4": big()}
    reps.update(over)
    return reps


def rows_by_label(rows):
    return {t: (m, v) for t, m, v in rows}


def verdicts(reports, calls=None):
    return [v for _, _, v in tg.judge(reports, calls)]


def test_targets_met_on_the_goals_gpu():
    reps = base(**{"1.3b_b4_fp8_rowwise": big(90_000), "1.3b_b4_fp8_tensorwise": big(95_000)})
    rows = tg.judge(reps)
    assert [v for _, _, v in rows] == ["met"] * 5
    assert "54.0%" in rows[0][1] and "2.20x" in rows[1][1] and "58.0%" in rows[2][1]
    assert "1.286x" in rows[3][1] and "--fp8 rowwise" in rows[3][1] and "1.357x" in rows[4][1]


def test_the_trainer_ratio_names_the_trainers_settings():
    measured = tg.judge(base())[1][1]
    assert "logging_steps=10" in measured and "2 persistent workers, prefetch 2" in measured
    assert "non-blocking copy" in measured and "nan/inf filter off" in measured and "torch_compile" in measured
    old = tg.judge(base(**{"350m_b8": report(settings=None)}))[1][1]
    assert "not recorded" in old and "logging every step" in old


def test_each_target_can_miss_on_its_own():
    assert verdicts(base(**{"350m_b8": report(ours=(200_000, 0.51))}))[:3] == ["not met", "met", "met"]
    assert verdicts(base(**{"350m_b8": report(peer=(140_000, 0.33))}))[:3] == ["met", "not met", "met"]
    assert verdicts(base(**{"1.3b_b4": big(70_000, 0.55)}))[:3] == ["met", "met", "not met"]
    fp8 = base(**{"1.3b_b4_fp8_rowwise": big(80_000), "1.3b_b4_fp8_tensorwise": big(88_000)})
    assert verdicts(fp8)[3:5] == ["not met", "met"]  # 1.14x and 1.26x


def test_fp8_is_judged_only_against_bf16_of_the_same_call():
    reps = base(**{"1.3b_b4_fp8_rowwise": big(90_000), "1.3b_b4_fp8_tensorwise": big(90_000)})
    calls = {"1.3b_b4": "A", "1.3b_b4_fp8_rowwise": "A", "1.3b_b4_fp8_tensorwise": "B"}
    rows = tg.judge(reps, calls)
    assert rows[3][2] == "met" and "different calls" not in rows[3][1]
    assert rows[4][2].startswith("not judged") and "different calls" in rows[4][1]


def test_fp8_at_350m_and_torchtitan_are_reported_without_a_target():
    reps = base(**{"350m_b8_fp8_rowwise": report(ours=(250_000, 0.61), peer=None),
                   "torchtitan_350m_b8": titan(), "torchtitan_1.3b_b4": titan(56_000, 0.47)})
    got = rows_by_label(tg.judge(reps))
    fp8 = got["350m batch 8: FP8 rowwise / bf16 tokens/s (no target)"]
    assert fp8[1] == "reported" and "1.136x" in fp8[0]
    assert "350m batch 8: FP8 tensorwise / bf16 tokens/s (no target)" not in got  # not asked for, no report
    small = got["350m batch 8: this trainer / torchtitan tokens/s (no target)"]
    assert small[1] == "reported" and "1.47x" in small[0] and "torchtitan 0.2.2, trainer" in small[0]
    large = got["1.3b batch 4: this trainer / torchtitan tokens/s (no target)"]
    assert large[1] == "reported" and "1.25x" in large[0] and "47.0% MFU" in large[0]


def test_fp32_moments_are_reported_against_the_defaults_of_the_same_call():
    reps = base(**{"1.3b_b4_fp32_moments": big(56_000, 0.553)})
    got = rows_by_label(tg.judge(reps, {"1.3b_b4": "A", "1.3b_b4_fp32_moments": "A"}))
    row = got["1.3b batch 4: --fp32-moments / the defaults' tokens/s (no target)"]
    assert row[1] == "reported" and "0.800x" in row[0] and "55.3% MFU" in row[0] and "--fp32-moments" in row[0]
    assert "350m batch 8: --fp32-moments / the defaults' tokens/s (no target)" not in got  # not asked for
    apart = rows_by_label(tg.judge(reps, {"1.3b_b4": "A", "1.3b_b4_fp32_moments": "B"}))
    assert "different calls" in apart["1.3b batch 4: --fp32-moments / the defaults' tokens/s (no target)"][0]
    assert tg.selected("moments") == ["350m_b8", "1.3b_b4", "350m_b8_fp32_moments", "1.3b_b4_fp32_moments"]


def test_fa4_is_judged_by_the_350m_goal_and_reported_against_the_defaults():
    reps = base(**{"350m_b8": report(ours=(205_000, 0.502)), "350m_b8_fa4": report(ours=(212_000, 0.52), peer=None),
                   "1.3b_b4_fa4": big(70_700, 0.58)})
    rows = tg.judge(reps, {n: "A" for n in reps})
    assert rows[0][2] == "not met"  # the defaults' own row stays
    assert rows[1][0] == "350m batch 8 with --attn fa4: MFU >= 52% (bf16)" and rows[1][2] == "met"
    got = rows_by_label(rows)
    small = got["350m batch 8: --attn fa4 / the defaults' tokens/s (no target)"]
    assert small[1] == "reported" and "1.034x" in small[0] and "--attn fa4" in small[0]
    assert "1.010x" in got["1.3b batch 4: --attn fa4 / the defaults' tokens/s (no target)"][0]
    assert tg.judge(base(**{"350m_b8_fa4": report(ours=(211_000, 0.519), peer=None)}))[1][2] == "not met"
    assert [r[0] for r in tg.judge(base())].count("350m batch 8 with --attn fa4: MFU >= 52% (bf16)") == 0
    assert tg.selected("fa4") == ["350m_b8", "1.3b_b4", "350m_b8_cudnn", "1.3b_b4_cudnn", "350m_b8_fa4",
                                  "1.3b_b4_fa4", "350m_b8_fa4_no_cudagraphs"]
    graphs = rows_by_label(tg.judge(base(**{"350m_b8": report(ours=(205_000, 0.502)),
                                            "350m_b8_fa4_no_cudagraphs": report(ours=(213_000, 0.522), peer=None)})))
    judged = graphs["350m batch 8 with --attn fa4 --compile-mode default: MFU >= 52% (bf16)"]
    assert judged[1] == "met" and "52.2%" in judged[0]
    ratio = graphs["350m batch 8: --attn fa4 --compile-mode default / the defaults' tokens/s (no target)"]
    assert "1.039x" in ratio[0] and ratio[1] == "reported"
    assert "350m batch 8 with --attn fa4: MFU >= 52% (bf16)" not in graphs  # not asked for, no row


def test_fa4_is_reported_against_cudnn_by_name_where_it_ran_and_the_defaults_name_their_attention():
    """With flash-attn-4 installed the defaults' auto runs FA4 on Hopper, so the FA4 runs are compared
    with --attn cudnn of the same call, and the defaults against it too; the MFU rows say which kernel ran."""
    defaults = report(ours=(213_000, 0.522))
    defaults["results"][0]["attention"] = "auto: FlashAttention-4 (flash-attn-4 on a Hopper GPU)"
    reps = base(**{"350m_b8": defaults, "350m_b8_cudnn": report(ours=(206_000, 0.505), peer=None),
                   "350m_b8_fa4": report(ours=(212_000, 0.52), peer=None)})
    calls = {name: 1 for name in reps}
    rows = tg.judge(reps, calls)
    assert rows[0][2] == "met" and "attention auto: FlashAttention-4" in rows[0][1]
    got = rows_by_label(rows)
    assert "1.034x" in got["350m batch 8: the defaults / --attn cudnn tokens/s (no target)"][0]
    fa4 = got["350m batch 8: --attn fa4 / --attn cudnn tokens/s (no target)"]
    assert fa4[1] == "reported" and "1.029x" in fa4[0] and "206,000" in fa4[0]
    assert "350m batch 8: --attn fa4 / the defaults' tokens/s (no target)" not in got
    # 1.3b without its cuDNN run: its FA4 row stays against the defaults
    assert "1.3b batch 4: the defaults / --attn cudnn tokens/s (no target)" not in got


def test_a_torchtitan_that_did_not_run_says_why():
    failed = {"device": H100, "torchtitan": "0.3.0", "mode": "none", "results": [],
              "reason": "trainer: ImportError: cannot import name 'DataParallelMeshDims'"}
    got = rows_by_label(tg.judge(base(torchtitan_350m_b8=failed, **{"torchtitan_1.3b_b4": None})))
    m, v = got["350m batch 8: this trainer / torchtitan tokens/s (no target)"]
    assert v == "not measured" and "DataParallelMeshDims" in m
    assert got["1.3b batch 4: this trainer / torchtitan tokens/s (no target)"] == ("-", "not measured")


def test_another_gpu_is_named_instead_of_met():
    reps = {"350m_b8": report(device="NVIDIA H200"), "1.3b_b4": big(device="NVIDIA H200"),
            "1.3b_b4_fp8_rowwise": big(90_000, device="NVIDIA H200"),
            "1.3b_b4_fp8_tensorwise": big(90_000, device="NVIDIA H200")}
    rows = tg.judge(reps)
    assert all(v.startswith("met on NVIDIA H200") and "H100" in v for _, _, v in rows)
    assert all("NVIDIA H200" in m for _, m, _ in rows)


def test_missing_runs_and_a_missing_peer_are_not_measured():
    assert verdicts({"350m_b8": None, "1.3b_b4": None}) == ["not measured"] * 5
    assert verdicts({"350m_b8": report(peer=None), "1.3b_b4": None}) == ["met"] + ["not measured"] * 4


def test_a_cut_short_or_unreadable_report_is_not_used(tmp_path):
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(report(partial=True)))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert tg.load(cut) is None and tg.load(bad) is None and tg.load(tmp_path / "absent.json") is None
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report()))
    assert tg.load(good)["device"].endswith("HBM3")


def test_runs_and_groups_are_chosen_by_name():
    assert tg.selected(None) == list(tg.RUNS)
    assert tg.selected("bf16") == ["350m_b8", "1.3b_b4"]
    assert tg.selected("torchtitan_1.3b_b4,1.3b_b4") == ["1.3b_b4", "torchtitan_1.3b_b4"]
    assert tg.selected("targets") == ["350m_b8", "1.3b_b4", "1.3b_b4_fp8_rowwise", "1.3b_b4_fp8_tensorwise"]
    assert set(tg.selected("torchtitan,fp8_350m")) == set(tg.RUNS) - {
        "1.3b_b4_fp8_rowwise", "1.3b_b4_fp8_tensorwise", "350m_b8_fp32_moments", "1.3b_b4_fp32_moments",
        "350m_b8_fa4", "1.3b_b4_fa4", "350m_b8_fa4_no_cudagraphs",
        "350m_b8_cudnn", "1.3b_b4_cudnn", *[n for n in tg.RUNS if "cudagraphs" in n or "b4x2" in n]}
    with pytest.raises(SystemExit, match="neither a run"):
        tg.selected("350m,bogus")
    for script, options, limit in tg.RUNS.values():
        assert script in ("bench", "titan") and "--quick" in options and 0 < limit <= 600
    fp8 = {n: o for n, (_, o, _) in tg.RUNS.items() if "fp8" in n}
    assert len(fp8) == 5 and all(o[o.index("--fp8") + 1] in ("rowwise", "tensorwise") for o in fp8.values())


def test_the_defaults_cuda_graphs_are_reported_against_the_compile_without_them():
    reps = base(**{"350m_b8": report(ours=(206_000, 0.505)), "350m_b8_no_cudagraphs": report(ours=(204_000, 0.5),
                                                                                             peer=None),
                   "350m_b4x2": big(200_000, 0.49), "1.3b_b4_no_cudagraphs": big(69_000, 0.585)})
    got = rows_by_label(tg.judge(reps, {n: "A" for n in reps}))
    label = "{}: the defaults (CUDA graphs on one GPU) / --compile-mode default tokens/s (no target)"
    small = got[label.format("350m batch 8")]
    assert small[1] == "reported" and "1.010x" in small[0] and "--compile-mode auto" in small[0]
    assert "1.014x" in got[label.format("1.3b batch 4")][0]  # 70,000 against 69,000
    assert label.format("350m batch 4 x 2 micro-batches") not in got  # its twin did not run
    assert label.format("1.3b batch 4, --fp8 tensorwise") not in got
    assert all(n in tg.RUNS for n in tg.selected("cudagraphs"))
    for what, run in tg.CUDAGRAPH_PAIRS:
        twin = tg.RUNS[f"{run}_no_cudagraphs"][1]
        assert twin[-2:] == ["--compile-mode", "default"] and "--compile-mode" not in tg.RUNS[run][1]
    assert "--grad-accum" in tg.RUNS["350m_b4x2"][1]


def test_judge_only_reads_earlier_json_and_adds_the_curve_when_present(tmp_path, capsys):
    (tmp_path / "350m_b8.json").write_text(json.dumps(report()))
    (tmp_path / "1.3b_b4.json").write_text(json.dumps(big(60_000, 0.50)))
    (tmp_path / "torchtitan_350m_b8.json").write_text(json.dumps(titan()))
    assert tg.main(["--out", str(tmp_path), "--judge-only"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| met |") == 2 and "| not met |" in summary and "curve" not in summary
    assert "torchtitan" in summary and "| reported |" in summary and "1.3b batch 4: this trainer" not in summary
    (tmp_path / "curve.json").write_text(json.dumps(report(curve=(0.036, 0.026))))
    tg.main(["--out", str(tmp_path), "--judge-only"])
    out = capsys.readouterr().out
    assert "0.036" in out and "0.026" in out and "read against the noise" in out


FAKE = """import json, sys
a = sys.argv[1:]
out = a[a.index('--json') + 1]
if '1.3b' in a and '--fp8' in a and 'tensorwise' in a: sys.exit(3)
if 'titan' in sys.argv[0]:
    rep = {titan}
elif '--fp8' in a:
    rep = {fp8}
elif '1.3b' in a:
    rep = {big}
else:
    rep = {small}
open(out, 'w').write(json.dumps(rep))
"""


def test_runs_each_benchmark_and_a_failing_one_is_not_measured(tmp_path, monkeypatch, capsys):
    # Stand-ins for bench_throughput.py and bench_torchtitan.py: finished reports, except FP8
    # tensorwise at 1.3b, which fails.
    text = FAKE.format(titan=repr(titan()), fp8=repr(big(90_000)), big=repr(big()),
                       small=repr(report(device="NVIDIA H100 PCIe")))
    bench, titan_script = tmp_path / "fake_bench.py", tmp_path / "fake_titan.py"
    bench.write_text(text)
    titan_script.write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.3b_b4_fp8_tensorwise.json").write_text(json.dumps(big(99_000)))  # an earlier run's
    monkeypatch.setattr(tg, "BENCH", bench)
    monkeypatch.setattr(tg, "TITAN", titan_script)
    assert tg.main(["--out", str(out), "--runs", "bf16,1.3b_b4_fp8_rowwise,1.3b_b4_fp8_tensorwise,"
                                                  "torchtitan_350m_b8"]) == 0
    text = capsys.readouterr().out
    assert "1.3b_b4_fp8_tensorwise failed (exit 3)" in text
    assert not (out / "350m_b8_fp8_rowwise.json").exists()  # not asked for
    calls = json.loads((out / "calls.json").read_text())
    assert set(calls) == {"350m_b8", "1.3b_b4", "1.3b_b4_fp8_rowwise", "1.3b_b4_fp8_tensorwise",
                          "torchtitan_350m_b8"} and len(set(calls.values())) == 1
    summary = (out / "summary.md").read_text()
    got = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines()}
    assert got["1.3b batch 4: FP8 rowwise >= 1.25x bf16 tokens/s, same call"].endswith("| met |")
    assert got["1.3b batch 4: FP8 tensorwise >= 1.25x bf16 tokens/s, same call"].endswith("| not measured |")
    assert "| reported |" in got["350m batch 8: this trainer / torchtitan tokens/s (no target)"]
    assert "PCIe" in summary


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
    assert done.returncode == 0 and done.stdout.count("not measured") == 5


def fp8_curve(fp8_vs_bf16, noise):
    rep = report(peer=None)
    rep["curve"] = {"ours_vs_peer_mean": fp8_vs_bf16, "ours_vs_peer_max": 2 * fp8_vs_bf16, "noise_mean": noise,
                    "noise_max": 2 * noise, "last20": [3.10, 3.12, 3.15], "compared": "fp8 tensorwise against bf16"}
    return rep


def test_the_fp8_curve_is_judged_against_two_bf16_seeds():
    label = "1.3b batch 4: FP8 tensorwise loss curve within bf16's run-to-run noise, 200 steps"
    inside = rows_by_label(tg.judge(base(curve_fp8=fp8_curve(0.012, 0.040))))[label]
    assert inside[1] == "within the noise" and "0.012" in inside[0] and "0.040" in inside[0] and "3.120" in inside[0]
    assert rows_by_label(tg.judge(base(curve_fp8=fp8_curve(0.09, 0.04))))[label][1] == "outside the noise"
    assert rows_by_label(tg.judge(base(curve_fp8=None)))[label] == ("-", "not measured")
    assert label not in rows_by_label(tg.judge(base()))  # not asked for, no row


def test_curves_are_chosen_by_name_and_the_fp8_curve_runs_bf16_and_fp8_together(tmp_path, monkeypatch, capsys):
    data = tmp_path / "train.bin"
    data.write_bytes(b"\0" * 64)
    seen = []
    monkeypatch.setattr(tg, "run_bench", lambda name, options, limit, out, script=None: seen.append((name, options)))
    assert tg.main(["--out", str(tmp_path / "o"), "--runs", "bf16", "--curve-data", str(data), "--curves", "fp8"]) == 0
    assert [n for n, _ in seen] == ["350m_b8", "1.3b_b4", "curve_fp8"]
    options = seen[-1][1]
    assert options[options.index("--fp8") + 1] == "tensorwise" and "--curve" in options and "1.3b" in options
    assert options[options.index("--data") + 1] == str(data)
    seen.clear()
    assert tg.main(["--out", str(tmp_path / "o"), "--runs", "bf16", "--curve-data", str(data)]) == 0
    assert [n for n, _ in seen] == ["350m_b8", "1.3b_b4", "curve", "curve_fp8"]  # the default curves
    with pytest.raises(SystemExit) as e:
        tg.main(["--out", str(tmp_path / "o"), "--curve-data", str(data), "--curves", "fp16"])
    assert e.value.code == 2 and "--curves: fp16 unknown" in capsys.readouterr().err
