"""DeepSpeed backend: config building and conflicts, the missing-package error, checkpoint layout.

deepspeed is an optional extra and is not installed in CI, so most tests here
need no engine: config work is pure dictionaries, and the checkpoint tests use a
stub runner (each says so). The last test drives a real engine on CPU (gloo, a
world of one) and is skipped when deepspeed cannot be imported.
"""
from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub

from koen_sllm.engines import deepspeed as B  # noqa: E402
from koen_sllm.engines import deepspeed_config as C  # noqa: E402
from koen_sllm.checkpoint.store import CheckpointError, read_latest, verify_checkpoint  # noqa: E402
from koen_sllm.config import apply_device_defaults, derive_batch_plan, explicit_options, parse_args  # noqa: E402
from koen_sllm.model import KoEnLM, model_config_from_preset  # noqa: E402
from koen_sllm.hf import mapping as HF  # noqa: E402


def run_config(argv: list[str], world: int = 2, has_cuda: bool = True):
    """(cfg, explicit, plan) as the trainer would build them for ``argv``."""
    cfg, _ = parse_args(argv)
    apply_device_defaults(cfg, has_cuda)
    explicit = explicit_options(argv)
    notes = C.apply_ds_options(cfg, explicit, world)
    return cfg, explicit, derive_batch_plan(cfg, world), notes


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- explicit options


def test_explicit_options_names_only_what_was_typed():
    argv = ["--train", "--learning-rate", "1e-4", "--fp32", "--global-batch-size", "8", "--deepspeed"]
    assert explicit_options(argv) == {"mode", "learning_rate", "precision", "global_batch_size", "deepspeed"}
    assert explicit_options([]) == set()
    # the value equal to the default still counts as given
    assert explicit_options(["--batch-size", "4"]) == {"batch_size"}


# ---------------------------------------------------------------- the shipped config


def test_shipped_config_holds_the_reference_values():
    ds, path, shipped = C.load_ds_json("")
    assert shipped and path == C.SHIPPED_CONFIG
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.95], "weight_decay": 0.1}}
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "none", "pin_memory": True}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert key not in ds  # the batch comes from the options


def test_shipped_config_fills_defaulted_options_and_is_filled_by_the_rest():
    cfg, explicit, plan, notes = run_config(["--train", "--deepspeed", "--batch-size", "2", "--grad-accum", "3",
                                             "--max-seq-length", "64"])
    # values the user did not give come from the JSON, and the RunConfig records them
    assert cfg.optim.learning_rate == 5e-5 and cfg.optim.warmup_steps == 10 and cfg.train.precision == "bf16"
    assert any("optimizer.params.lr" in n for n in notes)
    ds = C.build_ds_config(cfg, plan, 123, explicit)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2
    assert ds["optimizer"]["params"] == {"lr": 5e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                         "torch_adam": True}
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 123, "warmup_num_steps": 10, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
        "warmup_type": "linear"}}
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("_comment") for k in ds)
    assert "ZeRO-2, bf16" in C.describe(ds)


def test_explicit_options_override_the_shipped_defaults_without_error():
    cfg, explicit, plan, _ = run_config(["--deepspeed", "--learning-rate", "3e-4", "--fp32", "--warmup-steps", "4",
                                         "--grad-clip", "0.5"])
    ds = C.build_ds_config(cfg, plan, 50, explicit)
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 4
    assert ds["gradient_clipping"] == 0.5


# ---------------------------------------------------------------- a user's config


def test_user_json_values_win_over_defaults(tmp_path):
    spec = write_json(tmp_path / "ds.json", {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "gradient_clipping": 0.3,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 7, "cos_min_ratio": 0.0}},
        "fp16": {"enabled": False}, "bf16": {"enabled": False}, "zero_optimization": {"stage": 3}})
    cfg, explicit, plan, notes = run_config(["--deepspeed", spec])
    assert (plan.micro_batch, plan.grad_accum) == (1, 4)
    assert (cfg.optim.learning_rate, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (2e-4, 0.8, 0.9, 1e-6)
    assert (cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.grad_clip) == (7, 0.0, 0.3)
    assert cfg.train.precision == "fp32"
    ds = C.build_ds_config(cfg, plan, 20, explicit)
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 3
    assert ds["scheduler"]["params"]["cos_min_ratio"] == 0.0
    assert len(notes) >= 6


@pytest.mark.parametrize("argv, data, names", [
    (["--learning-rate", "3e-4"], {"optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}},
     ["--learning-rate 0.0003", "optimizer.params.lr = 5e-05"]),
    (["--fp32"], {"bf16": {"enabled": True}}, ["--fp32 fp32", "bf16/fp16.enabled = \"bf16\""]),
    (["--batch-size", "8"], {"train_micro_batch_size_per_gpu": 2}, ["--batch-size 8", "train_micro_batch_size_per_gpu = 2"]),
    (["--beta2", "0.99"], {"optimizer": {"params": {"betas": [0.9, 0.95]}}}, ["--beta1/--beta2 0.9 0.99", "[0.9, 0.95]"]),
    (["--warmup-steps", "100"], {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10}}},
     ["--warmup-steps 100", "warmup_num_steps = 10"]),
    (["--grad-clip", "0"], {"gradient_clipping": 1.0}, ["--grad-clip 0.0", "gradient_clipping = 1.0"]),
    (["--global-batch-size", "16"], {"gradient_accumulation_steps": 4},
     ["--global-batch-size 16 (= 2 accumulation steps", "4 accumulation steps"]),
    (["--grad-accum", "3"], {"train_batch_size": 32}, ["--grad-accum 3", "4 accumulation steps"]),
])
def test_user_json_conflicting_with_an_explicit_option_names_both(tmp_path, argv, data, names):
    spec = write_json(tmp_path / "mine.json", data)
    with pytest.raises(C.DeepSpeedConfigError) as err:
        run_config(["--deepspeed", spec, *argv])
    msg = str(err.value)
    assert "\n" not in msg and spec in msg
    for name in names:
        assert name in msg, msg


def test_equal_values_are_no_conflict(tmp_path):
    spec = write_json(tmp_path / "ds.json", {"optimizer": {"params": {"lr": 3e-4}}, "bf16": {"enabled": True}})
    cfg, explicit, plan, _ = run_config(["--deepspeed", spec, "--learning-rate", "0.0003", "--bf16"])
    assert C.build_ds_config(cfg, plan, 10, explicit)["optimizer"]["params"]["lr"] == 3e-4


def test_residual_stream_follows_the_json_precision(tmp_path):
    """The DeepSpeed JSON may set the precision after the device defaults: the residual stream
    is decided once it is final (fp16 keeps the fp32 stream), and an explicit bf16 stream
    under an fp16 JSON is refused in one line."""
    fp16 = write_json(tmp_path / "fp16.json", {"fp16": {"enabled": True}})
    cfg, _, _, _ = run_config(["--deepspeed", fp16])
    assert (cfg.train.precision, cfg.train.bf16_residual) == ("fp16", False)
    cfg, _, _, _ = run_config(["--deepspeed"])  # the shipped config: bf16
    assert (cfg.train.precision, cfg.train.bf16_residual) == ("bf16", True)
    with pytest.raises(C.ConfigError, match="--bf16-residual needs bf16 precision, but this run uses fp16"):
        run_config(["--deepspeed", fp16, "--bf16-residual"])


# ---------------------------------------------------------------- train_batch_size


def test_train_batch_size_is_derived_when_absent():
    cfg, explicit, plan, _ = run_config(["--deepspeed", "--batch-size", "3", "--global-batch-size", "24"], world=4)
    ds = C.build_ds_config(cfg, plan, 10, explicit)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (24, 2)


def test_train_batch_size_alone_sets_the_accumulation(tmp_path):
    spec = write_json(tmp_path / "ds.json", {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4})
    cfg, explicit, plan, _ = run_config(["--deepspeed", spec], world=2)
    assert plan.grad_accum == 4 and plan.sequences_per_step == 32
    assert C.build_ds_config(cfg, plan, 10, explicit)["train_batch_size"] == 32


@pytest.mark.parametrize("data, fragment", [
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, "not a multiple of micro-batch 4 x 2 processes = 8"),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
     "disagrees with micro-batch 4 x gradient_accumulation_steps 2 x 2 processes = 16"),
    ({"train_batch_size": 0}, "train_batch_size = 0"),
])
def test_inconsistent_train_batch_size_is_an_error(tmp_path, data, fragment):
    spec = write_json(tmp_path / "ds.json", data)
    with pytest.raises(C.DeepSpeedConfigError, match="train_batch_size") as err:
        run_config(["--deepspeed", spec], world=2)
    assert fragment in str(err.value)


# ---------------------------------------------------------------- invalid files


@pytest.mark.parametrize("text, fragment", [
    ('{"zero_optimization": {"stage": 2,}}', "invalid JSON at line 1 column 35"),
    ("[1, 2]", "top level must be a JSON object"),
    ('{"optimizer": {"type": "Lamb"}}', 'optimizer.type = "Lamb"'),
    ('{"scheduler": {"type": "OneCycle"}}', 'scheduler.type = "OneCycle"'),
    # the reference config's spelling, which DeepSpeed itself would reject at start
    ('{"scheduler": {"type": "WarmupCosineLR", "params": {"cosine_min_ratio": 0.0}}}',
     "scheduler.params.cosine_min_ratio"),
    ('{"scheduler": {"params": {"warmup_type": "log"}}}', 'warmup_type = "log"'),
    ('{"scheduler": {"params": {"total_num_steps": 99}}}', "pass --max-steps 99"),
    ('{"zero_optimization": {"stage": 5}}', "zero_optimization.stage is 5; use 0, 1, 2 or 3"),
    ('{"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}',
     'offload_optimizer.device is "gpu"; use "none", "cpu" or "nvme"'),
    ('{"optimizer": {"params": {"lr": -1}}}', "optimizer.params.lr = -1"),
    ('{"bf16": {"enabled": true}, "fp16": {"enabled": true}}', "both bf16 and fp16"),
])
def test_invalid_user_json_is_one_line_naming_the_problem(tmp_path, text, fragment):
    spec = write_json(tmp_path / "bad.json", text)
    with pytest.raises(C.DeepSpeedConfigError) as err:
        cfg, explicit, plan, _ = run_config(["--deepspeed", spec, "--max-steps", "10"])
        C.build_ds_config(cfg, plan, 10, explicit)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("zero, shown, use", [
    ({"stage": 7}, "stage is 7", "use 0, 1, 2 or 3"),
    ({"stage": -1}, "stage is -1", "use 0, 1, 2 or 3"),
    ({"stage": True}, "stage is true", "use 0, 1, 2 or 3"),  # a bool is an int to Python, not a stage
    ({"stage": 2.0}, "stage is 2.0", "use 0, 1, 2 or 3"),
    ({"stage": "2"}, 'stage is "2"', "use 0, 1, 2 or 3"),
    ({"stage": None}, "stage is null", "use 0, 1, 2 or 3"),
    ({"offload_optimizer": {"device": "gpu"}}, 'offload_optimizer.device is "gpu"', 'use "none", "cpu" or "nvme"'),
    ({"stage": 3, "offload_param": {"device": "disk"}}, 'offload_param.device is "disk"',
     'use "none", "cpu" or "nvme"'),
    ({"offload_optimizer": "cpu"}, 'offload_optimizer is "cpu"', 'use an object such as {"device": "cpu"}'),
    ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs stage 3 (only ZeRO-3 partitions the "
     "weights), the file has stage 2", 'set "stage": 3 or remove offload_param'),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
     'offload_optimizer.ratio is 0.5 with device "cpu" and stage 2', 'use a number from 0 to 1 with "device": "cpu"'),
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "ratio": 0.5}},
     'offload_optimizer.ratio is 0.5 with device "nvme" and stage 3', "use a number from 0 to 1"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 1.5}},
     'offload_optimizer.ratio is 1.5 with device "cpu" and stage 3', "use a number from 0 to 1"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": "half"}},
     'offload_optimizer.ratio is "half" with device "cpu" and stage 3', "use a number from 0 to 1"),
])
def test_apply_ds_options_checks_the_zero_section(tmp_path, zero, shown, use):
    """What --dry-run runs: the stage and offload devices fail here, not when the engine starts."""
    spec = write_json(tmp_path / "ds.json", {"zero_optimization": zero})
    cfg, _ = parse_args(["--deepspeed", spec])
    apply_device_defaults(cfg, False)
    with pytest.raises(C.DeepSpeedConfigError) as err:
        C.apply_ds_options(cfg, explicit_options(["--deepspeed", spec]), 2)
    msg = str(err.value)
    assert msg.startswith(f"--deepspeed {spec}: zero_optimization.{shown}; {use}"), msg
    assert "\n" not in msg


def test_apply_ds_options_stage_7_message(tmp_path):
    spec = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 7}})
    cfg, _ = parse_args(["--deepspeed", spec])
    with pytest.raises(C.DeepSpeedConfigError) as err:
        C.apply_ds_options(cfg, set(), 1)
    assert str(err.value) == f"--deepspeed {spec}: zero_optimization.stage is 7; use 0, 1, 2 or 3"


@pytest.mark.parametrize("zero", [{"stage": 0}, {"stage": 1}, {"stage": 3, "offload_param": {"device": "cpu"}},
                                  {"offload_optimizer": {"device": "nvme"}}, {"offload_optimizer": None}, {},
                                  {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.55}}])
def test_apply_ds_options_accepts_valid_zero_sections(tmp_path, zero):
    spec = write_json(tmp_path / "ds.json", {"zero_optimization": zero})
    cfg, explicit, plan, _ = run_config(["--deepspeed", spec, "--max-steps", "10"])
    ds = C.build_ds_config(cfg, plan, 10, explicit)
    assert C.zero_stage(ds) == zero.get("stage", C.DEFAULT_ZERO_STAGE)
    partial = "ratio" in (zero.get("offload_optimizer") or {})
    assert ("optimizer offload cpu (55% of it, the rest on the GPU)" in C.describe(ds)) == partial


def test_dry_run_refuses_a_bad_zero_stage(tmp_path, capsys, monkeypatch):
    from koen_sllm.cli import train_main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    spec = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 7}})
    code = train_main(["--deepspeed", spec, "--dry-run", "--output-dir", str(tmp_path / "out"),
                       "--logs-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 2 and f"--deepspeed {spec}: zero_optimization.stage is 7; use 0, 1, 2 or 3" in err, err


def test_json_learning_rate_above_one_is_refused(tmp_path):
    spec = write_json(tmp_path / "ds.json", {"optimizer": {"params": {"lr": 3}}})
    with pytest.raises(C.DeepSpeedConfigError, match=r"optimizer\.params\.lr = 3 in .* is invalid: it must be a "
                                                     r"positive number no larger than 1 \(AdamW peak rates"):
        run_config(["--deepspeed", spec])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(C.DeepSpeedConfigError, match=r"nope\.json: file not found"):
        run_config(["--deepspeed", str(tmp_path / "nope.json")])


def test_offload_leaves_the_cpu_optimizer_to_deepspeed(tmp_path):
    spec = write_json(tmp_path / "off.json", {"zero_optimization": {"stage": 2, "offload_optimizer": {
        "device": "cpu", "pin_memory": True}}})
    cfg, explicit, plan, _ = run_config(["--deepspeed", spec])
    ds = C.build_ds_config(cfg, plan, 10, explicit)
    assert "torch_adam" not in ds["optimizer"]["params"] and C.offload_device(ds) == "cpu"


def test_shipped_zero3_file_offloads_weights_and_optimizer_and_recomputes():
    """configs/ds_zero3_offload.json fixes only the ZeRO layout and recomputation: learning rate,
    schedule and precision stay the options' (no conflict with an explicit one)."""
    spec = str(C.SHIPPED_CONFIG.parent / "ds_zero3_offload.json")
    argv = ["--deepspeed", spec, "--learning-rate", "2e-4", "--warmup-steps", "5", "--model-size", "8b"]
    cfg, explicit, plan, notes = run_config(argv)
    assert cfg.train.activation_checkpointing is True and cfg.train.precision == "bf16"  # the GPU default
    assert [n for n in notes if n.startswith("activation_checkpointing = true from")] and len(notes) == 1
    ds = C.build_ds_config(cfg, plan, 100, explicit)
    assert C.zero_stage(ds) == 3 and C.offload_device(ds) == C.offload_device(ds, "offload_param") == "cpu"
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and "torch_adam" not in ds["optimizer"]["params"]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5 and ds["bf16"]["enabled"]
    assert C.describe(ds).startswith("DeepSpeed ZeRO-3, bf16, optimizer offload cpu, parameter offload cpu, ")
    cfg2, explicit2, plan2, _ = run_config(["--deepspeed"])
    assert "parameter offload" not in C.describe(C.build_ds_config(cfg2, plan2, 10, explicit2))  # ZeRO-3 only


def test_shipped_8b_one_gpu_file_is_the_zero3_file_with_part_of_the_optimizer_on_the_gpu():
    """configs/ds_zero3_8b_one_gpu.json may differ from ds_zero3_offload.json only by the split
    measured on one H100 (docs/deepspeed.md), so the two cannot drift apart."""
    folder = C.SHIPPED_CONFIG.parent
    full, partial = (json.loads((folder / n).read_text()) for n in ("ds_zero3_offload.json", "ds_zero3_8b_one_gpu.json"))
    zero = partial["zero_optimization"]
    assert zero.pop("sub_group_size") == 200_000_000 and zero["offload_optimizer"].pop("ratio") == 0.55
    assert {k: v for k, v in partial.items() if k != "_comment"} == {k: v for k, v in full.items() if k != "_comment"}
    cfg, explicit, plan, _ = run_config(["--deepspeed", str(folder / "ds_zero3_8b_one_gpu.json"), "--model-size", "8b"])
    ds = C.build_ds_config(cfg, plan, 100, explicit)
    assert C.describe(ds).startswith("DeepSpeed ZeRO-3, bf16, optimizer offload cpu (55% of it, the rest on the GPU), "
                                     "parameter offload cpu, ")


@pytest.mark.parametrize("section, fragment", [
    ([], "activation_checkpointing is []; use an object ({} turns on --activation-checkpointing), or remove it"),
    ({"partition_activations": True, "cpu_checkpointing": True},
     "activation_checkpointing.cpu_checkpointing is not supported: the model recomputes each layer with "
     "torch.utils.checkpoint"),
])
def test_deepspeed_activation_checkpointing_switches_the_model_does_not_use_are_refused(tmp_path, section, fragment):
    spec = write_json(tmp_path / "ds.json", {"activation_checkpointing": section})
    with pytest.raises(C.DeepSpeedConfigError) as err:
        run_config(["--deepspeed", spec])
    assert str(err.value).startswith(f"--deepspeed {spec}: {fragment}"), str(err.value)


def test_unmerged_config_is_refused(tmp_path):
    """build_ds_config must not let the loader (from cfg) and the engine (from the JSON) disagree."""
    spec = write_json(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": 1})
    cfg, _ = parse_args(["--deepspeed", spec])
    apply_device_defaults(cfg, True)
    plan = derive_batch_plan(cfg, 2)  # apply_ds_options skipped: plan has micro-batch 4
    with pytest.raises(C.DeepSpeedConfigError, match="call apply_ds_options"):
        C.build_ds_config(cfg, plan, 10, set())


# ---------------------------------------------------------------- the package is optional


def test_missing_package_error_has_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(B.DeepSpeedUnavailable) as err:
        B.require_deepspeed()
    msg = str(err.value)
    assert msg == ('DeepSpeed 패키지가 설치되어 있지 않습니다 / --deepspeed needs the deepspeed package, which is not '
                   'installed; install it with: pip install -e ".[deepspeed]"')
    with pytest.raises(B.DeepSpeedUnavailable):  # the runner fails the same way, before touching the model
        B.DeepSpeedRunner(torch.nn.Linear(2, 2), {})


def test_missing_dependency_is_named(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "deepspeed":
            raise ModuleNotFoundError("No module named 'hjson'", name="hjson")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(B.DeepSpeedUnavailable, match=r"^DeepSpeed 패키지를 불러올 수 없습니다 / --deepspeed: deepspeed "
                                                     r"is installed but its dependency 'hjson' is missing.*pip install -e"):
        B.require_deepspeed()


# ---------------------------------------------------------------- checkpoints (stub engine)


def tiny_model(tie: bool = False) -> KoEnLM:
    torch.manual_seed(3)
    return KoEnLM(model_config_from_preset("tiny", 256, 32, tie_embeddings=tie))


@pytest.mark.parametrize("tie", [False, True])
def test_consolidated_names_match_the_models_own_mapping(tie):
    """_hf_names maps gathered parameters through a weightless copy of the model."""
    model = tiny_model(tie)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    got, want = B._hf_names(model, full), HF.hf_state_dict(model)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert ("lm_head.weight" in got) is (not tie)


class StubRunner:
    """Stands in for DeepSpeedRunner (no engine runs on this CPU test machine without the package):
    real consolidated weights, fake engine shards written like DeepSpeed's layout."""

    def __init__(self, model, fail=False):
        self.model, self.fail = model, fail

    def hf_state_dict(self):
        return HF.hf_state_dict(self.model)

    def save_into(self, directory, tag=B.ENGINE_TAG):
        if self.fail:
            raise OSError(28, "No space left on device")
        d = Path(directory) / B.ENGINE_DIR / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"module")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")


def tokenizer_dir(path: Path) -> Path:
    path.mkdir()
    (path / "tokenizer.model").write_bytes(b"sp")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_collective_save_is_atomic_and_exports_a_model_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    root = tmp_path / "out"
    path = B.save_checkpoint_collective(
        StubRunner(model), root, "checkpoint-2", hf_config=HF.hf_config(model, 2, 3, 0),
        tokenizer_dir=tokenizer_dir(tmp_path / "tok"), training_info={"step": 2},
        trainer_state={"step": 2, "backend": "deepspeed"}, keep_last=2)
    assert path == root / "checkpoint-2" and read_latest(root) == "checkpoint-2"
    ok, why = verify_checkpoint(path)
    assert ok, why
    listed = {e["path"] for e in json.loads((path / "manifest.json").read_text())["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.model", "trainer_state.pt",
            "deepspeed/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= listed
    assert B.has_engine_state(path) and not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5)


def test_failed_engine_write_keeps_earlier_checkpoints(tmp_path):
    """A rank failing to write its shard fails the save on every rank; latest stays put."""
    model, root = tiny_model(), tmp_path / "out"
    kw = dict(hf_config=HF.hf_config(model, 2, 3, 0), tokenizer_dir=None, training_info={}, trainer_state={"step": 1})
    B.save_checkpoint_collective(StubRunner(model), root, "checkpoint-1", **kw)
    with pytest.raises(CheckpointError, match="DeepSpeed could not write its state.*No space left on device"):
        B.save_checkpoint_collective(StubRunner(model, fail=True), root, "checkpoint-2", **kw)
    assert read_latest(root) == "checkpoint-1" and verify_checkpoint(root / "checkpoint-1")[0]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "latest"]


class StubEngine:
    """Minimal engine for the runner's bookkeeping (the real one needs the package)."""

    def __init__(self, accum):
        self.accum, self.micro, self.steps, self.loaded = accum, 0, 0, None

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accum == 0

    def __call__(self, x, y):
        return torch.tensor(2.0, requires_grad=True)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.steps += 1
        self.micro += 1

    def was_step_applied(self):
        return True

    def get_global_grad_norm(self):
        return torch.tensor(0.5)

    def load_checkpoint(self, d, tag, **kw):
        self.loaded = (d, tag)
        return d, {"note": 1}


def stub_runner(accum):
    runner = B.DeepSpeedRunner.__new__(B.DeepSpeedRunner)
    runner.engine, runner.grad_accum = StubEngine(accum), accum
    return runner


def test_runner_keeps_micro_batches_in_step_with_the_engine():
    r = stub_runner(3)
    assert r.forward_backward(None, None, False).item() == 2.0
    r.forward_backward(None, None, False)
    with pytest.raises(B.DeepSpeedBackendError, match="optimizer step was called before the last micro-batch"):
        stub_runner(2).optimizer_step()
    r.forward_backward(None, None, True)
    assert r.optimizer_step() == (0.5, True) and r.engine.steps == 1
    with pytest.raises(B.DeepSpeedBackendError, match="gradient_accumulation_steps is 3"):
        r.forward_backward(None, None, True)  # a new step starts: this is not its last micro-batch


def test_load_checks_the_engine_files_and_world_size(tmp_path):
    r = stub_runner(1)
    with pytest.raises(B.DeepSpeedBackendError, match="saved by the DDP backend"):
        r.load_from(tmp_path)
    shard_dir = tmp_path / B.ENGINE_DIR / B.ENGINE_TAG
    shard_dir.mkdir(parents=True)
    for rank in (0, 1):
        (shard_dir / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(B.DeepSpeedBackendError, match="shards of 2 processes, this run has 1; resume with 2"):
        r.load_from(tmp_path)
    (shard_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert r.load_from(tmp_path) == {"note": 1}
    assert r.engine.loaded == (str(tmp_path / B.ENGINE_DIR), B.ENGINE_TAG)


def test_an_engine_state_with_separate_q_k_v_is_refused_with_the_reason(tmp_path, monkeypatch):
    r = stub_runner(1)
    (tmp_path / B.ENGINE_DIR / B.ENGINE_TAG).mkdir(parents=True)

    def old_layout(*args, **kwargs):  # what torch's load_state_dict says inside the engine
        raise RuntimeError('Error(s) in loading state_dict for KoEnLM:\n\tMissing key(s) in state_dict: '
                           '"layers.0.self_attn.qkv_proj.weight". \n\tUnexpected key(s) in state_dict: '
                           '"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight".')

    monkeypatch.setattr(r.engine, "load_checkpoint", old_layout)
    with pytest.raises(B.DeepSpeedBackendError, match="separate matrices.*--resume none"):
        r.load_from(tmp_path)

    def other_failure(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(r.engine, "load_checkpoint", other_failure)
    with pytest.raises(RuntimeError, match="out of memory"):  # not mistaken for the layout change
        r.load_from(tmp_path)


def test_resume_refuses_a_checkpoint_of_the_other_backend(tmp_path):
    """The trainer's check before the engine starts: the engine's folder, or trainer_state's "backend"."""
    from koen_sllm.run_state import RunSetupError, check_resume_backend

    ddp_ckpt, ds_ckpt = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    ddp_ckpt.mkdir()
    (ds_ckpt / B.ENGINE_DIR / B.ENGINE_TAG).mkdir(parents=True)
    check_resume_backend("ddp", ddp_ckpt)
    check_resume_backend("deepspeed", ds_ckpt)
    with pytest.raises(RunSetupError, match="^다른 백엔드로 저장된 체크포인트입니다 / .*checkpoint-4 was saved by the DDP "
                                            "backend; resume it without --deepspeed"):
        check_resume_backend("deepspeed", ddp_ckpt)
    with pytest.raises(RunSetupError, match="checkpoint-8 was saved by the DeepSpeed backend; resume it with --deepspeed"):
        check_resume_backend("ddp", ds_ckpt)
    with pytest.raises(RunSetupError, match="saved by the DeepSpeed backend"):  # the saved key decides when given
        check_resume_backend("ddp", ddp_ckpt, "deepspeed")


# ---------------------------------------------------------------- a real engine, where installed


@pytest.fixture(scope="module")
def ds_world():
    """One gloo world of one for every real-engine test: DeepSpeed caches its process groups,
    so the group lives until the module ends, and the environment is restored after."""
    try:
        B.require_deepspeed()
    except B.DeepSpeedUnavailable as exc:
        pytest.skip(str(exc))
    import torch.distributed as dist

    saved = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ["DS_ACCELERATOR"] = "cpu"
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_engine_trains_saves_and_resumes_on_cpu(tmp_path, ds_world, precision):
    """Runs only where deepspeed imports (not in CI): ZeRO-2 on CPU."""
    from safetensors.torch import load_file

    argv = ["--deepspeed", f"--{precision}", "--batch-size", "2", "--grad-accum", "2", "--max-seq-length", "32",
            "--learning-rate", "1e-3", "--warmup-steps", "1"]
    cfg, explicit, plan, _ = run_config(argv, world=1, has_cuda=False)
    ds = C.build_ds_config(cfg, plan, 6, explicit)
    data = torch.randint(0, 256, (6, 2, 2, 33), generator=torch.Generator().manual_seed(0))

    def steps(runner, first, last):
        out = []
        for s in range(first, last):
            loss = sum(runner.forward_backward(data[s, m, :, :-1], data[s, m, :, 1:], m == 1).item() for m in range(2))
            norm, applied = runner.optimizer_step()
            assert applied and norm > 0
            out.append(loss / 2)
        return out

    r = B.DeepSpeedRunner(tiny_model(), ds)
    first = steps(r, 0, 3)
    assert r.lr < 1e-3 and all(0 < v < 10 for v in first)  # past the warm-up, cosine decay has begun
    model = tiny_model()
    path = B.save_checkpoint_collective(r, tmp_path, "checkpoint-3", hf_config=HF.hf_config(model, 2, 3, 0),
                                        tokenizer_dir=None, training_info={}, trainer_state={"step": 3})
    saved = load_file(str(path / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    if precision == "bf16":  # the export holds the fp32 master weights, not the bf16 working copy
        w = saved["model.layers.0.mlp.up_proj.weight"]
        assert not torch.equal(w, w.to(torch.bfloat16).float())
    rest = steps(r, 3, 5)
    r2 = B.DeepSpeedRunner(tiny_model(), ds)
    r2.load_from(path)
    reloaded = r2.hf_state_dict()
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)
    assert steps(r2, 3, 5) == pytest.approx(rest, abs=1e-6)  # resumed exactly


def test_partial_offload_checkpoints_keep_the_gpu_half_of_the_optimizer(tmp_path, ds_world):
    """configs/ds_zero3_8b_one_gpu.json (offload_optimizer.ratio 0.55): DeepSpeed steps the sub-groups
    kept on the GPU with a second AdamW whose state its checkpoints leave out; ours hold it, so a
    resume continues exactly. On a CPU accelerator DeepSpeed labels every sub-group "cpu", so the
    first half is labelled as the GPU's here, which routes it to that second AdamW as on a GPU."""
    from koen_sllm.engines import partial_offload as P

    spec = json.loads((C.SHIPPED_CONFIG.parent / "ds_zero3_8b_one_gpu.json").read_text())
    spec["zero_optimization"]["sub_group_size"] = 20_000  # several sub-groups in the tiny model
    argv = ["--deepspeed", write_json(tmp_path / "partial.json", spec), "--fp32", "--batch-size", "2",
            "--max-seq-length", "32", "--learning-rate", "1e-3", "--warmup-steps", "1", "--ce-chunk-tokens", "16"]
    cfg, explicit, plan, _ = run_config(argv, world=1, has_cuda=False)
    ds = C.build_ds_config(cfg, plan, 6, explicit)
    mcfg = model_config_from_preset("tiny", 256, 32, ce_chunk_tokens=16)
    data = torch.randint(0, 256, (6, 2, 33), generator=torch.Generator().manual_seed(0))

    def make():
        torch.manual_seed(0)
        model = B.build_partitioned_model(lambda init: KoEnLM(mcfg, init_weights=init), ds, torch.device("cpu"))
        runner = B.DeepSpeedRunner(model, ds)
        devices = runner.engine.optimizer.subgroup_to_device
        for i in range(len(devices) // 2):
            devices[i] = "cuda"
        return runner

    def steps(runner, first, last):
        out = []
        for s in range(first, last):
            out.append(runner.forward_backward(data[s, :, :-1], data[s, :, 1:], True).item())
            assert runner.optimizer_step()[1]
        return out

    r = make()
    assert len(P.gpu_subgroups(r.engine.optimizer)) >= 2
    steps(r, 0, 3)
    assert len(r.engine.optimizer.backup_optimizer.state) == len(P.gpu_subgroups(r.engine.optimizer))
    path = B.save_checkpoint_collective(r, tmp_path, "checkpoint-3", hf_config=HF.hf_config(KoEnLM(mcfg), 2, 3, 0),
                                        tokenizer_dir=None, training_info={}, trainer_state={"step": 3})
    state_file = path / B.ENGINE_DIR / B.ENGINE_TAG / P.STATE_FILE.format(rank=0)
    assert state_file.is_file()
    rest = steps(r, 3, 6)
    r2 = make()
    r2.load_from(path)
    assert steps(r2, 3, 6) == rest  # resumed exactly, both halves' moments included
    state_file.unlink()  # what DeepSpeed alone would have saved: refused, not resumed with fresh moments
    with pytest.raises(P.PartialOffloadError, match="holds no state for the optimizer sub-groups this run keeps"):
        make().load_from(path)


TWO_RANK_SCRIPT = r'''
import json, sys, torch
from pathlib import Path
from koen_sllm import distributed as D
from koen_sllm.config import explicit_options
from koen_sllm.engines import deepspeed as B
from koen_sllm.config import apply_device_defaults, derive_batch_plan, parse_args
from koen_sllm.hf import mapping as HF
from koen_sllm.model import KoEnLM, model_config_from_preset

out, stage = Path(sys.argv[1]), int(sys.argv[2])
info = D.init_distributed()
argv = ["--deepspeed", "--fp32", "--batch-size", "2", "--grad-accum", "2", "--max-seq-length", "32",
        "--learning-rate", "1e-3", "--warmup-steps", "2"]
cfg, _ = parse_args(argv)
apply_device_defaults(cfg, False)
explicit = explicit_options(argv)
B.apply_ds_options(cfg, explicit, info.world_size)
plan = derive_batch_plan(cfg, info.world_size)
ds = B.build_ds_config(cfg, plan, 8, explicit)
ds["zero_optimization"]["stage"] = stage
mcfg = model_config_from_preset("tiny", 256, 32)

def make():
    torch.manual_seed(0)
    return B.DeepSpeedRunner(KoEnLM(mcfg), ds)

def run(r, first, last, nan_step=-1):
    rec = []
    for s in range(first, last):
        xs = torch.randint(0, 256, (2, 2, 2, 33), generator=torch.Generator().manual_seed(100 + s))[info.rank]
        loss = sum(r.forward_backward(xs[m, :, :-1], xs[m, :, 1:], m == 1, nan_loss=s == nan_step).item()
                   for m in range(2)) / 2
        norm, applied = r.optimizer_step()
        rec.append([loss, applied])
    return rec

r = make()
before = run(r, 0, 4, nan_step=2)
path = B.save_checkpoint_collective(r, out, "checkpoint-4", hf_config=HF.hf_config(r.module, 2, 3, 0),
                                    tokenizer_dir=None, training_info={}, trainer_state={"step": 4})
after = run(r, 4, 6)
r2 = make()
r2.load_from(path)
resumed = run(r2, 4, 6)
try:
    B.save_checkpoint_collective(r2, out, ".bad", hf_config={}, tokenizer_dir=None, training_info={},
                                 trainer_state=None)
    failure = None
except Exception as exc:
    failure = f"{type(exc).__name__}: {exc}"
(out / f"rank{info.rank}.json").write_text(json.dumps(
    {"before": before, "after": after, "resumed": resumed, "path": str(path), "failure": failure}))
D.cleanup()
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_real_engine_two_ranks_save_collectively(tmp_path, stage):
    """Two gloo processes on CPU (only where deepspeed imports): the non-finite step is skipped on
    both ranks, the collective save publishes one checkpoint, resuming repeats the same losses,
    and a failed save raises the same error on every rank instead of hanging."""
    try:
        B.require_deepspeed()
    except B.DeepSpeedUnavailable as exc:
        pytest.skip(str(exc))
    import subprocess

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out), str(stage)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [a for _, a in ranks[0]["before"]] == [True, True, False, True]
    assert [l for l, _ in ranks[0]["after"]] == pytest.approx([l for l, _ in ranks[0]["resumed"]], abs=1e-6)
    assert ranks[0]["path"] == ranks[1]["path"] == str(out / "checkpoint-4")
    assert read_latest(out) == "checkpoint-4" and verify_checkpoint(out / "checkpoint-4")[0]
    shards = sorted(p.name for p in (out / "checkpoint-4" / B.ENGINE_DIR / B.ENGINE_TAG).iterdir())
    assert sum("optim_states" in n for n in shards) == 2
    assert ranks[0]["failure"] == ranks[1]["failure"] and "CheckpointError" in ranks[0]["failure"]


@pytest.mark.parametrize("stage, measured", [(3, 1_219_494_852), (2, 1_524_260_606)])
def test_checkpoint_estimate_covers_the_measured_size_by_stage(stage, measured):
    """The sizes one real checkpoint of the 125m preset (76,204,800 parameters, 2 CPU processes,
    fp32) took on disk: ZeRO-3 keeps no module copy, so its estimate is lower; each estimate covers
    its measurement without asking for much more (the disk check refuses runs by it)."""
    estimate = B.estimate_ds_checkpoint_bytes(76_204_800, stage)
    assert measured <= estimate <= 1.1 * measured


def test_an_8b_zero3_run_needs_two_checkpoints_of_about_110_gib():
    """What docs/deepspeed.md says of the 8b preset: refused on a 64 GiB disk, room on 235 GiB."""
    two = 2 * B.estimate_ds_checkpoint_bytes(7_241_732_096, 3)
    assert 64 << 30 < two < 235 << 30
