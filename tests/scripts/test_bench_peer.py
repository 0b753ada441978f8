"""benchmarks/bench_throughput.py's transformers Trainer peer: the settings it runs with by default
(a user's tuned set-up), the options that bring back the earlier one, and the names transformers
accepts. CPU only; the speed itself is measured on the GPU (docs/benchmarks.md)."""
from __future__ import annotations

import argparse

import pytest

import bench_throughput as bt


def args(**over):
    base = dict(curve=False, no_compile=False, peer_logging_steps=10, peer_workers=2, peer_prefetch=2,
                peer_nan_filter=False, peer_blocking_copy=False, peer_progress_bar=False)
    base.update(over)
    return argparse.Namespace(**base)


def test_the_default_peer_is_tuned():
    kw = bt.peer_training_kwargs(args())
    assert kw["logging_steps"] == 10 and kw["logging_nan_inf_filter"] is False
    assert kw["dataloader_num_workers"] == 2 and kw["dataloader_persistent_workers"] is True
    assert kw["dataloader_prefetch_factor"] == 2 and kw["dataloader_pin_memory"] is True
    assert kw["accelerator_config"] == {"non_blocking": True}
    assert kw["bf16"] and kw["tf32"] and kw["torch_compile"] and kw["optim"] == "adamw_torch_fused"
    assert kw["disable_tqdm"] and kw["eval_strategy"] == "no" and kw["save_strategy"] == "no"
    assert kw["include_num_input_tokens_seen"] == "no"


def test_the_earlier_peer_is_reachable_and_named():
    old = args(peer_logging_steps=1, peer_workers=0, peer_nan_filter=True, peer_blocking_copy=True,
               peer_progress_bar=True)
    kw = bt.peer_training_kwargs(old)
    assert kw["logging_steps"] == 1 and kw["dataloader_num_workers"] == 0
    # torch's DataLoader refuses these without workers
    assert kw["dataloader_persistent_workers"] is False and kw["dataloader_prefetch_factor"] is None
    assert kw["logging_nan_inf_filter"] and kw["accelerator_config"] == {"non_blocking": False}
    assert not kw["disable_tqdm"]
    text = bt.peer_settings_text(bt.peer_settings(old))
    assert "logging_steps=1" in text and "no loader workers" in text and "blocking copy" in text
    assert "nan/inf filter on" in text and "progress bar on" in text
    tuned = bt.peer_settings_text(bt.peer_settings(args()))
    assert "logging_steps=10" in tuned and "2 persistent workers, prefetch 2" in tuned
    assert "non-blocking copy" in tuned and "nan/inf filter off" in tuned and "progress bar off" in tuned


def test_the_curve_logs_every_step_without_workers():
    kw = bt.peer_training_kwargs(args(curve=True))
    assert kw["logging_steps"] == 1 and kw["dataloader_num_workers"] == 0


def test_the_settings_are_recorded_as_json_values():
    import json

    s = bt.peer_settings(args())
    assert json.loads(json.dumps(s)) == s
    assert s["logging_steps"] == 10 and s["accelerator_config.non_blocking"] is True
    assert s["attn_implementation"] == "sdpa"


def test_transformers_accepts_every_name(tmp_path):
    pytest.importorskip("accelerate")  # TrainingArguments needs it
    transformers = pytest.importorskip("transformers")
    kw = bt.peer_training_kwargs(args())
    kw.pop("tf32")  # needs an Ampere or newer GPU; checked against the signature instead
    import inspect

    assert "tf32" in inspect.signature(transformers.TrainingArguments.__init__).parameters
    # use_cpu: bf16 needs it without a GPU (it also turns pinned memory off)
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True, **kw)
    assert targs.logging_steps == 10 and targs.dataloader_num_workers == 2
    assert targs.dataloader_prefetch_factor == 2 and targs.logging_nan_inf_filter is False
    assert targs.accelerator_config.non_blocking is True and targs.disable_tqdm is True


@pytest.mark.parametrize("lever, field, value, without", [
    (["--bf16-moments"], "bf16_moments", True, False),
    (["--fp8", "rowwise"], "fp8", "rowwise", "off"),
    (["--fp8", "tensorwise"], "fp8", "tensorwise", "off"),
])
def test_a_lever_curve_runs_the_same_run_without_the_lever_beside_it(lever, field, value, without, monkeypatch):
    """The curve's first and third runs drop the lever (bf16 moments, the trainer's default, are
    dropped by asking for fp32 moments); the second keeps it; nothing else differs."""
    monkeypatch.setattr(bt.torch.cuda, "is_available", lambda: True)  # the configs as on the GPU it runs on
    a = bt.build_parser().parse_args(["--curve", "--data", "train.bin", *lever])
    assert bt.numeric_lever(a) in ("bf16 moments", "fp8 rowwise (torchao)", "fp8 tensorwise (torchao)")
    with_lever, plain = bt.run_config(a, 0), bt.run_config(a, 0, plain=True)
    assert getattr(with_lever.train, field) == value
    assert getattr(plain.train, field) == without
    setattr(plain.train, field, value)
    assert plain.to_dict() == with_lever.to_dict()


def test_fp32_moments_reach_the_trainer_and_exclude_bf16_moments():
    a = bt.build_parser().parse_args(["--fp32-moments"])
    assert bt.run_config(a, 0).train.bf16_moments is False and bt.numeric_lever(a) == ""
    with pytest.raises(SystemExit):
        bt.build_parser().parse_args(["--fp32-moments", "--bf16-moments"])


def test_no_lever_means_the_peer_curve():
    assert bt.numeric_lever(bt.build_parser().parse_args(["--curve", "--data", "train.bin"])) == ""
