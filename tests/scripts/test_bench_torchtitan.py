"""benchmarks/bench_torchtitan.py without a GPU: this project's shapes in torchtitan's model terms,
the same FLOPs count, the job file torchtitan reads, and the `datasets` stand-in. With torchtitan
installed, a CPU smoke run of its model path too (skipped otherwise; the GPU runs are the benchmark)."""
from __future__ import annotations

import argparse
import json
import sys
import tomllib

import pytest

import bench_torchtitan as bt


def args(**over):
    base = dict(model_size="350m", batch_size=8, seq_len=2048, steps=15, warmup=5, lr=3e-4, seed=0,
                no_compile=False, workers=2, prefetch=2)
    base.update(over)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("size, width, kv", [("350m", 2816, 4), ("1.3b", 5632, 8), ("tiny", 192, 2)])
def test_presets_map_to_torchtitans_llama_with_the_same_ffn(size, width, kv):
    m = bt.titan_model_args(size, 2048)
    assert bt.ffn_hidden(m["dim"], m["multiple_of"], m["ffn_dim_multiplier"]) == width
    assert m["n_kv_heads"] == kv and m["vocab_size"] == 32000 and m["attn_type"] == "sdpa"
    assert m["max_seq_len"] == 2048 and m["attn_mask_type"] == "causal"


def test_shapes_torchtitans_llama_cannot_express_are_refused():
    with pytest.raises(SystemExit, match="qk-norm"):
        bt.titan_model_args("0.6b", 2048)


def test_the_flops_count_is_this_projects():
    # docs/model.md: 6 x (params - input embedding) + 12 x layers x heads x head_dim x seq
    d, layers, heads, kv, ffn, vocab, seq = 1024, 24, 16, 4, 2816, 32000, 2048
    hd = d // heads
    per_layer = d * (heads + 2 * kv) * hd + heads * hd * d + 3 * d * ffn + 2 * d
    matmul = layers * per_layer + d + vocab * d
    assert bt.koen_flops_per_token("350m", seq) == 6 * matmul + 12 * layers * heads * hd * seq


def test_the_job_file_is_torchtitans_and_says_what_runs():
    job = tomllib.loads(bt.job_toml(args(), bt.ROOT / "outputs" / "run"))
    assert job["model"] == {"name": bt.SPEC_NAME, "flavor": "350m"}
    t = job["training"]
    assert (t["local_batch_size"], t["seq_len"], t["steps"]) == (8, 2048, 20)
    assert t["mixed_precision_param"] == "bfloat16" and t["dtype"] == "float32" and t["max_norm"] == 1.0
    assert t["dataloader"] == {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 2}
    assert job["compile"] == {"enable": True, "components": ["model", "loss"]}
    assert job["activation_checkpoint"]["mode"] == "none" and job["checkpoint"]["enable"] is False
    assert job["optimizer"]["implementation"] == "fused" and job["metrics"]["log_freq"] == 10
    assert job["validation"]["enable"] is False
    plain = tomllib.loads(bt.job_toml(args(workers=0, no_compile=True), bt.ROOT / "x"))
    assert "prefetch_factor" not in plain["training"]["dataloader"] and plain["compile"]["enable"] is False
    s = bt.trainer_settings(args())
    assert json.loads(json.dumps(s)) == s and s["activation_checkpoint"] == "none"


def test_the_random_tokens_are_the_other_benchmarks():
    a, b = bt.random_batches(16, 2, 0), bt.random_batches(16, 2, 0)
    assert len(a) == 4 and all((x == y).all() for x, y in zip(a, b)) and a[0].shape == (2, 17)
    assert int(max(t.max() for t in a)) < bt.VOCAB


def test_the_datasets_stand_in_only_where_the_package_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec("datasets")
    for name in ("datasets", "datasets.distributed"):  # whatever is there comes back afterwards
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
        del sys.modules[name]
    used = bt.stand_in_datasets()
    assert used == (real is None or real.origin is None)
    if used:
        from datasets import Dataset, load_dataset  # noqa: F401 - the names torchtitan imports
        from datasets.distributed import split_dataset_by_node

        with pytest.raises(RuntimeError, match="not installed"):
            split_dataset_by_node()


def test_a_cpu_run_of_the_model_path(tmp_path):
    pytest.importorskip("torchtitan")
    out = tmp_path / "tt.json"
    assert bt.main(["--mode", "model", "--device", "cpu", "--model-size", "tiny", "--seq-len", "32",
                    "--batch-size", "2", "--steps", "2", "--warmup", "1", "--no-compile", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    r = rep["results"][0]
    assert rep["mode"] == "model+minimal loop" and "partial" not in rep
    assert r["flops_per_token_model"] == r["flops_per_token"] and r["tokens_per_s"] > 0


def test_the_cpu_is_for_the_model_path_only(capsys):
    with pytest.raises(SystemExit):
        bt.main(["--device", "cpu", "--mode", "trainer"])
    assert "--mode model only" in capsys.readouterr().err
