"""run_record.py: the settings kept with a run, and what a resume may and may not change."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from koen_sllm import run_record as R
from koen_sllm.config import ConfigError, parse_args
from koen_sllm.config import explicit_options


def _started(out: Path, argv: list[str], *, step: int, max_steps: int = 200, world: int = 2) -> dict:
    """The folder of a run started with ``argv`` that saved checkpoint-<step>."""
    cfg, _ = parse_args(argv + ["--output-dir", str(out)])
    cfg.train.model_size, cfg.train.max_seq_length, cfg.train.precision = "tiny", 128, "fp32"
    cfg.train.max_steps = max_steps
    cfg.optim.warmup_steps = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else 2
    g = cfg.train.global_batch_size or cfg.train.batch_size * world * (cfg.train.grad_accum or 1)
    cfg.train.global_batch_size = g
    out.mkdir(parents=True, exist_ok=True)
    record = R.build_record(cfg, run_id="r1", max_steps=max_steps, global_batch_size=g, world_size=world,
                            command=["train_h100_dual.py", *argv])
    R.write_record(out, record)
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir()
    (ckpt / "training_info.json").write_text(json.dumps({"step": step}))
    (out / "latest").write_text(ckpt.name)
    return record


def _resume(out: Path, argv: list[str], world: int = 2):
    argv = argv + ["--output-dir", str(out)]
    cfg, _ = parse_args(argv)
    res = R.resolve_with_record(cfg, explicit_options(argv), world)
    return cfg, res


def test_plain_train_resumes_with_the_recorded_settings(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", "200",
                   "--save-steps", "20", "--vocab-size", "400"], step=68)
    cfg, res = _resume(out, ["--train"])
    assert res.resuming and res.resume_step == 68
    t, o = cfg.train, cfg.optim
    assert (t.batch_size, t.global_batch_size, t.max_steps) == (8, 16, 200)
    assert (o.learning_rate, o.warmup_steps, cfg.ckpt.save_steps, cfg.data.vocab_size) == (1e-3, 2, 20, 400)
    assert "at step 68" in res.notes[0]


@pytest.mark.parametrize("argv, option", [
    (["--learning-rate", "5e-4"], "--learning-rate"),
    (["--global-batch-size", "32"], "--global-batch-size"),
    (["--grad-accum", "2"], "--grad-accum"),
    (["--model-size", "125m"], "--model-size"),
    (["--max-seq-length", "64"], "--max-seq-length"),
    (["--max-steps", "300"], "--max-steps"),  # the run has not finished its 200 steps
    (["--max-steps", "100"], "--max-steps"),
    (["--seed", "7"], "--seed"),
])
def test_a_change_of_schedule_or_data_order_is_refused_with_the_command_that_works(tmp_path, argv, option):
    out = tmp_path / "out"
    _started(out, ["--train", "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", "200"], step=68)
    with pytest.raises(R.RunMismatch) as err:
        _resume(out, ["--train", *argv])
    msg = str(err.value)
    assert option in msg and "at step 68" in msg and f"drop {option}" in msg and "--output-dir" in msg
    assert "\n" not in msg and " / " in msg  # one bilingual line


def test_the_same_value_typed_again_is_no_change(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--batch-size", "8", "--learning-rate", "1e-3"], step=10)
    cfg, res = _resume(out, ["--train", "--learning-rate", "0.001", "--batch-size", "8", "--max-steps", "200"])
    assert cfg.optim.learning_rate == 1e-3 and len(res.notes) == 1


def test_safe_changes_are_applied_with_a_note(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--batch-size", "8", "--save-steps", "20"], step=68)
    cfg, res = _resume(out, ["--train", "--save-steps", "50", "--batch-size", "4", "--log-steps", "5"])
    assert cfg.ckpt.save_steps == 50 and cfg.train.log_steps == 5
    assert cfg.train.batch_size == 4 and cfg.train.global_batch_size == 16  # accumulation makes up the rest
    text = "\n".join(res.notes)
    assert "--save-steps: 500 -> 50" not in text and "--save-steps: 20 -> 50" in text
    assert "8 per process x 2 -> 4 x 2 with 2 accumulation step(s); same global batch of 16" in text


def test_bf16_moments_follow_the_record_and_may_change_with_a_note(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--batch-size", "8", "--bf16-moments"], step=68)
    cfg, res = _resume(out, ["--train"])
    assert cfg.train.bf16_moments is True and len(res.notes) == 1  # kept from the record
    cfg, res = _resume(out, ["--train", "--fp32-moments"])
    assert cfg.train.bf16_moments is False
    assert any(n.startswith("--bf16-moments/--fp32-moments:") for n in res.notes), res.notes


def test_a_run_of_the_retired_native_fp8_linear_goes_on_through_torchao_with_a_note(tmp_path):
    out = tmp_path / "out"
    record = _started(out, ["--train", "--batch-size", "8", "--fp8", "tensorwise"], step=68)
    record["config"]["train"]["fp8_impl"] = "native"  # as runs recorded it before the linear was retired
    R.write_record(out, record)
    cfg, res = _resume(out, ["--train"])
    assert cfg.train.fp8 == "tensorwise" and res.resume_step == 68
    assert R.RETIRED_FP8_NOTE in res.notes and "torchao" in R.RETIRED_FP8_NOTE
    record["config"]["train"]["fp8_impl"] = "auto"  # torchao's runs resume as they were, without the note
    R.write_record(out, record)
    assert R.RETIRED_FP8_NOTE not in _resume(out, ["--train"])[1].notes


def test_another_gpu_count_keeps_the_global_batch(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--batch-size", "4"], step=30, world=2)
    cfg, res = _resume(out, ["--train"], world=1)
    assert cfg.train.global_batch_size == 8 and cfg.train.batch_size == 4 and cfg.train.grad_accum is None
    assert any("4 per process x 2 -> 4 x 1 with 2 accumulation" in n for n in res.notes)
    with pytest.raises(R.RunMismatch, match="does not divide"):
        _resume(out, ["--train", "--batch-size", "3"], world=1)


def test_bf16_weights_need_one_micro_batch_per_step_on_resume(tmp_path):
    out = tmp_path / "out"
    rec = _started(out, ["--train", "--batch-size", "4"], step=30, world=2)
    rec["config"]["train"]["bf16_weights"] = True
    R.write_record(out, rec)
    with pytest.raises(R.RunMismatch, match="use --batch-size 8"):
        _resume(out, ["--train"], world=1)


def test_max_steps_may_extend_a_finished_schedule_with_the_learning_rate_change_shown(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--learning-rate", "1e-3", "--max-steps", "200"], step=200)
    cfg, res = _resume(out, ["--train", "--max-steps", "400"])
    assert cfg.train.max_steps == 400
    note = next(n for n in res.notes if "--max-steps 200 -> 400" in n)
    assert "from 0.0001 to 0.00055" in note  # the cosine laid over 400 steps, warm-up kept


def test_test_mode_and_resume_none_never_write_over_a_training_run(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train"], step=12)
    with pytest.raises(R.RunMismatch, match="holds a training run"):
        _resume(out, ["--test"])
    with pytest.raises(R.RunMismatch, match="--resume none would start a new run"):
        _resume(out, ["--train", "--resume", "none"])


def test_a_test_run_is_replaced_and_never_resumed_by_training(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--test"], step=10, max_steps=10)
    cfg, res = _resume(out, ["--train", "--learning-rate", "5e-4"])
    assert not res.resuming and cfg.ckpt.resume == "none" and cfg.optim.learning_rate == 5e-4
    assert "earlier test run" in res.notes[0]


def test_a_folder_without_checkpoints_binds_nothing(tmp_path):
    out = tmp_path / "out"
    _started(out, ["--train", "--learning-rate", "1e-3"], step=5)
    for p in out.glob("checkpoint-*"):
        (p / "training_info.json").unlink()
        p.rmdir()
    (out / "latest").unlink()
    cfg, res = _resume(out, ["--train", "--learning-rate", "5e-4"])
    assert cfg.optim.learning_rate == 5e-4 and not res.resuming


def test_an_older_folder_without_run_json_uses_its_checkpoint_settings(tmp_path):
    out = tmp_path / "out"
    rec = _started(out, ["--train", "--batch-size", "8", "--learning-rate", "1e-3"], step=40)
    (out / "run.json").unlink()
    info = {"step": 40, "config": rec["config"], "max_steps": 200,
            "batch_plan": {"micro_batch": 8, "world_size": 2, "grad_accum": 1}, "world_size": 2}
    (out / "checkpoint-40" / "training_info.json").write_text(json.dumps(info))
    cfg, res = _resume(out, ["--train"])
    assert res.resuming and cfg.optim.learning_rate == 1e-3 and cfg.train.global_batch_size == 16


def test_an_unreadable_record_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    with pytest.raises(ConfigError, match="run.json is unreadable"):
        _resume(out, ["--train"])


def test_the_record_is_written_atomically_and_keeps_its_history(tmp_path):
    out = tmp_path / "out"
    rec = _started(out, ["--train"], step=1)
    cfg, _ = parse_args(["--train", "--output-dir", str(out)])
    again = R.build_record(cfg, run_id="r2", max_steps=200, global_batch_size=16, world_size=1,
                           previous=rec, changes=["batch: ..."])
    R.write_record(out, again)
    back = json.loads((out / "run.json").read_text())
    assert back["run_id"] == "r1" and back["created"] == rec["created"]
    assert [h["run_id"] for h in back["history"]] == ["r1", "r2"] and back["history"][1]["changes"] == ["batch: ..."]
    assert not list(out.glob(".run.json.tmp-*"))
