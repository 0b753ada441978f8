"""--fp8: the option, its refusals, which layers become torchao's FP8 linears, and checkpoints
that stay the same with and without them (resume in both directions).

On CPU torchao's FP8 matmuls run in its emulation (``emulate=True``: the same casts and scales,
the products in higher precision); the GPU test at the end runs the real ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e2e_support import write_corpus
from fp8_support import needs_torchao
from koen_sllm import distributed as D
from koen_sllm import fp8 as F
from koen_sllm.config import FP8_MODES, ConfigError, RunConfig, apply_device_defaults, parse_args, repo_root, validate
from koen_sllm.hf import mapping as HF
from koen_sllm.model import KoEnLM, model_config_from_preset

NO_GPU = ("--fp8 needs an NVIDIA GPU with FP8 support (compute capability 8.9 or newer: H100, H200, L4, RTX 4090); "
          "this run has none — drop --fp8")
KINDS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(seed: int = 0, **overrides) -> KoEnLM:
    torch.manual_seed(seed)
    return KoEnLM(model_config_from_preset("tiny", 320, 32, **overrides))


# ---------------------------------------------------------------- the option


def test_fp8_is_off_by_default_and_parses_each_recipe():
    cfg, _ = parse_args([])
    assert cfg.train.fp8 == "off"
    for recipe in FP8_MODES:
        cfg, _ = parse_args(["--fp8", recipe])
        assert cfg.train.fp8 == recipe
        assert RunConfig.from_dict(json.loads(cfg.to_json())).train.fp8 == recipe
    assert RunConfig.from_dict({"train": {}}).train.fp8 == "off"  # records written before the option


def test_an_unknown_recipe_is_refused():
    with pytest.raises(ConfigError, match=r"argument --fp8: invalid choice: 'mxfp8'"):
        parse_args(["--fp8", "mxfp8"])
    cfg = RunConfig.from_dict({"train": {"fp8": "blockwise"}})  # e.g. from a hand-edited run.json
    with pytest.raises(ConfigError, match=r"^--fp8 'blockwise' is unknown; choose one of off, tensorwise, rowwise$"):
        validate(cfg)


def test_the_retired_fp8_impl_option_is_refused_with_what_replaced_it():
    for argv in (["--fp8", "tensorwise", "--fp8-impl", "native"], ["--fp8-impl=torchao"], ["--fp8-impl"]):
        with pytest.raises(ConfigError) as err:
            parse_args(argv)
        assert str(err.value) == ("--fp8-impl was retired with the project's own FP8 linear (its loss curve lay "
                                  "outside bf16's noise on an H100); --fp8 runs through torchao: drop --fp8-impl")
        assert err.value.exit_code == 2


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_bf16_gpu_run_takes_fp8(recipe):
    cfg, _ = parse_args(["--train", "--fp8", recipe])
    apply_device_defaults(cfg, has_cuda=True)
    assert (cfg.train.fp8, cfg.train.precision) == (recipe, "bf16")


@pytest.mark.parametrize("argv, has_cuda, message", [
    (["--fp8", "rowwise"], False, NO_GPU),
    (["--fp8", "tensorwise", "--bf16"], False, NO_GPU),
    (["--fp8", "rowwise", "--fp16"], True, "--fp8 rowwise needs bf16 precision (FP8 training runs under bf16 "
                                           "autocast), but this run uses fp16; add --bf16 or drop --fp8"),
    (["--fp8", "rowwise", "--fp32"], True, "but this run uses fp32; add --bf16 or drop --fp8"),
    (["--fp8", "tensorwise", "--deepspeed"], True, "--fp8 tensorwise is for the DDP path; the DeepSpeed engine is "
                                                   "not converted to FP8 here: drop --fp8 or --deepspeed"),
    (["--fp8", "rowwise", "--batch-size", "3", "--max-seq-length", "100"], True,
     "--batch-size 3 x --max-seq-length 100 = 300; pass a --max-seq-length that is a multiple of 16 or drop --fp8"),
])
def test_fp8_is_refused_where_it_cannot_run(argv, has_cuda, message):
    cfg, _ = parse_args(argv)
    with pytest.raises(ConfigError) as err:
        apply_device_defaults(cfg, has_cuda=has_cuda)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_the_cpu_error_is_one_line_and_exit_2_through_the_trainer_cli(tmp_path, capsys, monkeypatch):
    from koen_sllm.cli import train_main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = train_main(["--fp8", "rowwise", "--output-dir", str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"❌ 옵션 오류 / {NO_GPU}"], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_the_cpu_error_through_the_training_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, str(repo_root() / "scripts" / "train_h100_dual.py"), "--fp8", "tensorwise",
                          "--output-dir", str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("❌") and NO_GPU in lines[0], lines


def pretend_gpu(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_an_old_gpu_stops_the_trainer_before_it_starts(tmp_path, capsys, monkeypatch):
    from koen_sllm import cli

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    pretend_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(D, "init_distributed", lambda *a, **k: pytest.fail("the run must stop before it starts"))
    code = cli.train_main(["--fp8", "rowwise", "--output-dir", str(tmp_path / "out"),
                           "--logs-dir", str(tmp_path / "logs")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"❌ {cli.KO_FP8} / --fp8 needs an NVIDIA GPU with FP8 support")
    assert "NVIDIA A100-SXM4-80GB has compute capability 8.0" in lines[0]


def test_a_gpu_older_than_sm89_is_named_with_its_capability(monkeypatch):
    pretend_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(F.Fp8Unavailable) as err:
        F.check_fp8_support("cuda:0")
    assert str(err.value) == ("--fp8 needs an NVIDIA GPU with FP8 support (compute capability 8.9 or newer: H100, "
                              "H200, L4, RTX 4090); this run's GPU NVIDIA A100-SXM4-80GB has compute capability 8.0 "
                              "— drop --fp8")
    assert err.value.exit_code == 2
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # L4, RTX 4090
    F.check_fp8_device("cuda:0")
    with pytest.raises(F.Fp8Unavailable, match="this run has none"):
        F.check_fp8_support("cpu")


def test_a_missing_torchao_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # the import then fails as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(F.Fp8Unavailable) as err:
        F.require_torchao()
    assert str(err.value) == ("--fp8 needs the torchao package, which is not installed; install it with: "
                              "pip install 'koen-sllm[fp8]' (in a checkout: pip install -e '.[fp8]'), or drop --fp8")
    assert err.value.exit_code == 2
    with pytest.raises(F.Fp8Unavailable, match="needs the torchao package"):
        F.convert_to_fp8(tiny(), "rowwise", emulate=True)


def test_the_start_checks_name_torchao_after_the_gpu(monkeypatch):
    from koen_sllm.cli import missing_requirements

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    pretend_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    install = "pip install 'koen-sllm[fp8]' (in a checkout: pip install -e '.[fp8]')"
    for recipe in ("tensorwise", "rowwise"):
        cfg, _ = parse_args(["--train", "--fp8", recipe])
        assert [str(e) for e, _ in missing_requirements(cfg)] == [
            f"--fp8 {recipe} needs the torchao package, which is not installed; install it with: {install}, "
            "or drop --fp8"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(F.Fp8Unavailable, match="compute capability 8.0"):
        F.check_fp8_support("cuda:0")  # the GPU's error comes first


def test_fp8_may_change_on_a_resume_with_a_note(tmp_path):
    from koen_sllm import run_record as R
    from koen_sllm.config import explicit_options

    out = tmp_path / "out"
    cfg, _ = parse_args(["--train", "--fp8", "rowwise", "--output-dir", str(out)])
    cfg.train.model_size, cfg.train.max_seq_length, cfg.train.max_steps = "tiny", 128, 100
    cfg.train.global_batch_size = 8
    out.mkdir()
    R.write_record(out, R.build_record(cfg, run_id="r1", max_steps=100, global_batch_size=8, world_size=2,
                                       command=["train_h100_dual.py"]))
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "training_info.json").write_text(json.dumps({"step": 10}))
    (out / "latest").write_text("checkpoint-10")
    for typed, expected, note in ((["--train"], "rowwise", None),
                                  (["--train", "--fp8", "off"], "off", "--fp8: rowwise -> off (recorded rowwise)"),
                                  (["--train", "--fp8", "tensorwise"], "tensorwise",
                                   "--fp8: rowwise -> tensorwise (recorded rowwise)")):
        argv = typed + ["--output-dir", str(out)]
        cfg, _ = parse_args(argv)
        res = R.resolve_with_record(cfg, explicit_options(argv), 2)
        assert cfg.train.fp8 == expected
        assert (note in res.notes) if note else not any("--fp8" in n for n in res.notes)


# ---------------------------------------------------------------- which layers are converted


def test_the_filter_takes_the_five_projections_and_never_the_output_layer():
    lin = torch.nn.Linear
    for kind in KINDS:
        assert F.converts(lin(64, 128, bias=False), f"layers.3.mlp.{kind}")
    assert not F.converts(lin(64, 320, bias=False), "lm_head")
    assert not F.converts(lin(64, 64), "layers.0.self_attn.other_proj")
    assert not F.converts(torch.nn.Embedding(320, 64), "embed_tokens")
    assert not F.converts(lin(64, 200), "layers.0.mlp.gate_proj")  # 200 is no multiple of 16
    assert not F.converts(lin(200, 64), "layers.0.mlp.down_proj")


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "tie_embeddings": True}])
def test_every_projection_is_converted_and_nothing_else(recipe, overrides):
    model = tiny(**overrides)
    converted = F.convert_to_fp8(model, recipe, emulate=True)
    expected = [f"layers.{i}.{part}.{kind}" for i in range(2)
                for part, kind in [("self_attn", k) for k in KINDS[:2]] + [("mlp", k) for k in KINDS[2:]]]
    assert converted == expected
    assert all(type(model.get_submodule(name)).__name__ == "Float8Linear" for name in converted)
    assert type(model.lm_head) is torch.nn.Linear and type(model.embed_tokens) is torch.nn.Embedding
    assert F.describe(model, recipe).startswith(f"fp8 ({recipe} scaling): 10 projections' matmuls in FP8 through "
                                                "torchao.float8")
    layer = model.layers[0].self_attn.qkv_proj
    assert layer.config.cast_config_input.scaling_granularity.value == ("axiswise" if recipe == "rowwise"
                                                                        else "tensorwise")
    with pytest.raises(RuntimeError, match="already converted to FP8"):
        F.convert_to_fp8(model, recipe, emulate=True)


@needs_torchao
def test_layers_whose_sizes_are_not_multiples_of_16_stay_in_bf16():
    model = tiny(intermediate_size=200)
    converted = F.convert_to_fp8(model, "rowwise", emulate=True)
    assert converted == [f"layers.{i}.self_attn.{k}" for i in range(2) for k in KINDS[:2]]
    assert all(type(model.layers[i].mlp.gate_proj) is torch.nn.Linear for i in range(2))
    line = F.describe(model, "rowwise")
    assert "4 projections' matmuls in FP8" in line and "6 kept in bf16" in line and "layers.0.mlp.gate_proj" in line
    assert "MFU stays against the dense bf16 peak" in line


@needs_torchao
def test_conversion_needs_an_fp8_gpu_unless_emulated():
    with pytest.raises(F.Fp8Unavailable, match="this run has none"):
        F.convert_to_fp8(tiny(), "rowwise", "cpu")
    with pytest.raises(F.Fp8Unavailable, match="this run has none"):
        F.convert_to_fp8(tiny(), "rowwise")  # the model's own device


# ---------------------------------------------------------------- the state dict and checkpoints


@needs_torchao
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "tie_embeddings": True}])
def test_the_state_dict_keeps_its_names_and_tensors(overrides):
    plain, model = tiny(**overrides), tiny(**overrides)
    params = dict(model.named_parameters())
    F.convert_to_fp8(model, "tensorwise", emulate=True)
    assert dict(model.named_parameters()) == params  # the same Parameter objects: the optimizer keeps them
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    before, after = plain.state_dict(), model.state_dict()
    assert list(after) == list(before)
    for name, t in after.items():
        assert type(t) is torch.Tensor and t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    hf_plain, hf_fp8 = HF.hf_state_dict(plain), HF.hf_state_dict(model)
    assert list(hf_fp8) == list(hf_plain) and all(torch.equal(hf_fp8[k], hf_plain[k]) for k in hf_plain)
    # and back: transformers' tensors load into a converted model and into a plain one
    other = tiny(seed=1, **overrides)
    F.convert_to_fp8(other, "rowwise", emulate=True)
    HF.load_hf_state_dict(other, hf_plain)
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in before)


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_the_fp8_model_trains_close_to_the_plain_one(recipe):
    x = torch.randint(0, 320, (4, 33), generator=torch.Generator().manual_seed(0))
    plain, model = tiny(), tiny()
    F.convert_to_fp8(model, recipe, emulate=True)
    ref, loss = plain(x[:, :-1], x[:, 1:]), model(x[:, :-1], x[:, 1:])
    assert loss != ref  # the products really went through FP8
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    first = loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(6):
        opt.step()
        opt.zero_grad()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    assert loss.item() < first - 0.5


# ---------------------------------------------------------------- the trainer: resume both ways


def _trainer(tmp_path: Path, fp8: str, max_steps: int, monkeypatch, logs: str):
    """A CPU trainer whose DDP engine converts with torchao's emulation (the options refuse --fp8
    on CPU, so the recipe is set after them)."""
    from koen_sllm.engines import ddp
    from koen_sllm.logs import setup_logging
    from koen_sllm.trainer import Trainer

    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_corpus(data)
    cfg, _ = parse_args(["--train", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2",
                         "--max-steps", str(max_steps), "--vocab-size", "400", "--num-proc", "1",
                         "--dataset-path", str(data), "--output-dir", str(tmp_path / "out"),
                         "--logs-dir", str(tmp_path / logs), "--no-save-initial", "--save-steps", "1000",
                         "--eval-steps", "0", "--learning-rate", "3e-3"])
    apply_device_defaults(cfg, False)
    cfg.train.fp8 = fp8
    monkeypatch.setattr(ddp, "convert_to_fp8", partial(F.convert_to_fp8, emulate=True))
    setup_logging(cfg.logs_dir, 0)
    tr = Trainer(cfg, D.init_distributed())
    tr.setup()
    return tr


@needs_torchao
@pytest.mark.parametrize("first, second", [("rowwise", "off"), ("off", "tensorwise"), ("tensorwise", "rowwise")])
def test_a_checkpoint_resumes_into_fp8_and_plain_runs_alike(tmp_path, monkeypatch, first, second):
    from koen_sllm.logs import close_handlers

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        a = _trainer(tmp_path, first, 3, monkeypatch, "logs-a")
        assert len(a.engine.fp8_layers) == (0 if first == "off" else 10)
        summary = a.train()
        assert summary.steps == 3 and torch.isfinite(torch.tensor(summary.final_loss))
        weights = {k: v.clone() for k, v in a.engine.weights_for_saving().items()}
        moments = {k: v["exp_avg"].clone() for k, v in a.engine.optimizer.state_dict()["state"].items()}
        saved = load_file(str(summary.last_checkpoint / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in saved.values())
        assert "model.layers.0.self_attn.q_proj.weight" in saved and not any("float8" in k for k in saved)
        close_handlers()

        b = _trainer(tmp_path, second, 5, monkeypatch, "logs-b")  # --resume auto: checkpoint-3
        assert b.step == 3 and len(b.engine.fp8_layers) == (0 if second == "off" else 10)
        state = b.raw_model.state_dict()
        assert list(state) == list(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
        resumed = b.engine.optimizer.state_dict()["state"]
        assert all(torch.equal(resumed[k]["exp_avg"], m) for k, m in moments.items())
        summary = b.train()
        assert summary.steps == 5 and torch.isfinite(torch.tensor(summary.final_loss))
        if second != "off":
            log = (tmp_path / "logs-b" / "training_rank_0.log").read_text()
            assert f"fp8 ({second} scaling): 10 projections' matmuls in FP8 through torchao.float8" in log
    finally:
        close_handlers()


@needs_torchao
def test_a_checkpoint_of_an_fp8_run_loads_in_transformers(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from koen_sllm.logs import close_handlers

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        tr = _trainer(tmp_path, "rowwise", 2, monkeypatch, "logs")
        ckpt = tr.train().last_checkpoint
        x = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            plain = KoEnLM(tr.raw_model.cfg)  # our own model, unconverted, from the same checkpoint
            HF.load_hf_state_dict(plain, load_file(str(ckpt / "model.safetensors")))
            ours = plain.eval()(x)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).eval()(x).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    finally:
        close_handlers()


# ---------------------------------------------------------------- on the GPU


def fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= F.MIN_CAPABILITY


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_gpu(), reason="needs a CUDA GPU with FP8 matmuls (compute capability 8.9 or newer)")
@needs_torchao
@pytest.mark.parametrize("options", [["--fp8", "rowwise"], ["--fp8", "tensorwise"]])
def test_a_tiny_model_trains_with_fp8_on_the_gpu(tmp_path, monkeypatch, options):
    """The real thing: --fp8 through the options, the DDP engine and torch.compile."""
    from koen_sllm.logs import close_handlers, setup_logging
    from koen_sllm.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data)
    cfg, _ = parse_args(["--train", "--model-size", "tiny", "--max-seq-length", "64", "--batch-size", "8",
                         "--max-steps", "30", "--vocab-size", "400", "--num-proc", "1", "--dataset-path", str(data),
                         "--output-dir", str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs"),
                         "--no-save-initial", "--save-steps", "1000", "--eval-steps", "0",
                         "--learning-rate", "3e-3", "--warmup-steps", "2", *options])
    apply_device_defaults(cfg, True)
    setup_logging(cfg.logs_dir, 0)
    try:
        tr = Trainer(cfg, D.init_distributed())
        tr.setup()
        assert len(tr.engine.fp8_layers) == 10 and tr.t.compile
        losses = [float(tr.train_step()[0]) for _ in range(30)]
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
        assert list(tr.raw_model.state_dict()) == list(KoEnLM(tr.raw_model.cfg).state_dict())
    finally:
        close_handlers()
