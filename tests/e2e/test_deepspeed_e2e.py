"""The trainer with --deepspeed, end to end on CPU: 2 gloo processes, the tiny model, ZeRO-2 in fp32.

deepspeed is an optional extra that CI does not install; the first test (the
missing-package error) runs everywhere, the others only where it imports
(an environment with ``pip install -e ".[deepspeed]"``; docs/deepspeed.md):

    python -m pytest tests/test_deepspeed_e2e.py

The runs share one corpus and each other's checkpoints, so they are few: one
uninterrupted DeepSpeed run, the same run killed at step 10 and resumed, and a
DDP run with the same options to compare losses against.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e2e_support import cpu_env, latest, losses, write_corpus
from koen_sllm.config import repo_root
from koen_sllm.run_lock import LOCK_NAME
from koen_sllm.run_record import RECORD_NAME

pytestmark = pytest.mark.slow

ROOT = repo_root()
TRAIN = ROOT / "scripts" / "train_h100_dual.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (optional extra)")
INSTALL_LINE = 'pip install -e ".[deepspeed]"'

# 12 steps, checkpoints every 4; step attempt 3 gets a NaN loss, so 13 attempts make the 12 steps.
# --learning-rate, --fp32 and --warmup-steps are explicit, so they override the shipped JSON's
# defaults (lr 5e-5, bf16, 10 warm-up steps) and the DDP run below trains the same thing.
RUN_ARGS = ("--train", "--batch-size", "2", "--max-steps", "12", "--save-steps", "4", "--fp32",
            "--warmup-steps", "3", "--eval-steps", "6")


def _env(**extra: str) -> dict[str, str]:
    return cpu_env(DS_ACCELERATOR="cpu", **extra)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


def trainer_args(run_dir: Path, dataset: Path, *args: str) -> list[str]:
    return [str(TRAIN), "--dataset-path", str(dataset), "--output-dir", str(run_dir / "out"),
            "--logs-dir", str(run_dir / "logs"), "--vocab-size", "400", "--num-proc", "1", "--model-size", "tiny",
            "--max-seq-length", "64", "--log-steps", "1", "--learning-rate", "2e-3", *args]


def train(nproc: int, run_dir: Path, dataset: Path, *args: str, expect=0) -> subprocess.CompletedProcess:
    """``nproc`` gloo processes under torchrun; 0 means a plain ``python`` run (a world of one)."""
    launch = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(nproc)]
    proc = subprocess.run(launch + trainer_args(run_dir, dataset, *args), capture_output=True, text=True,
                          env=_env(), timeout=300)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


# ---------------------------------------------------------------- without the package


def test_missing_package_stops_at_once_with_the_install_line(tmp_path):
    """Runs everywhere. Where deepspeed is installed, a stand-in package that fails to import like
    an absent one shadows it, so the same path is exercised."""
    env = _env()
    if HAS_DEEPSPEED:
        fake = tmp_path / "shadow" / "deepspeed"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'deepspeed'\", name='deepspeed')\n")
        env["PYTHONPATH"] = str(fake.parent)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", "--train", "--dataset-path",
                           str(tmp_path / "no-data"), "--output-dir", str(out), "--logs-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and INSTALL_LINE in lines[0] and "not installed" in lines[0], proc.stderr
    # It stopped before anything else: no data was looked for, nothing was written.
    assert not out.exists() and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- with the package


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ds-full")
    proc = train(2, run_dir, dataset, *RUN_ARGS, "--deepspeed", "--debug-nan-steps", "3")
    assert "backend: DeepSpeed ZeRO-2, fp32" in proc.stdout
    return run_dir


@needs_deepspeed
def test_two_process_run_trains_and_saves_model_directories(full_run):
    out = full_run / "out"
    assert latest(full_run) == "checkpoint-12"
    assert sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, RECORD_NAME)) == [
        "checkpoint-12", "checkpoint-4", "checkpoint-8", "initial_model", "latest"]
    from koen_sllm.checkpoint.store import verify_checkpoint

    ckpt = out / "checkpoint-12"
    ok, why = verify_checkpoint(ckpt)
    assert ok, why
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "zero").iterdir())
    assert sum("optim_states" in n for n in shards) == 2  # one ZeRO-2 partition per rank
    assert not (out / "initial_model" / "deepspeed").exists()  # a model directory only
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["backend"] == "deepspeed" and state["step"] == 12 and len(state["rng_per_rank"]) == 2
    assert "optimizer" not in state and "scheduler" not in state  # they live in the engine's files
    info = json.loads((ckpt / "training_info.json").read_text())
    assert info["backend"] == "deepspeed" and info["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert info["deepspeed_config"]["train_batch_size"] == 4 and info["config"]["optim"]["warmup_steps"] == 3

    a = losses(full_run)
    assert sorted(a) == list(range(1, 13)) and all(v == v for v in a.values())
    assert sum(a[s] for s in (10, 11, 12)) < sum(a[s] for s in (1, 2, 3)) - 0.3  # it learns
    console = (full_run / "logs" / "training_rank_0.log").read_text()
    assert "non-finite loss or gradient at step 3: update skipped" in console

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    ids = tok("안녕하세요 hello", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    first, last = weights(out / "initial_model"), weights(ckpt)
    assert first.keys() == last.keys() and not all(torch.equal(first[k], last[k]) for k in first)


@needs_deepspeed
def test_sigkill_then_resume_auto_repeats_the_uninterrupted_losses(full_run, dataset, tmp_path):
    crashed = tmp_path / "crashed"
    proc = train(2, crashed, dataset, *RUN_ARGS, "--deepspeed", "--debug-nan-steps", "3", "--debug-kill-step", "10",
                 expect=None)
    assert proc.returncode != 0
    assert latest(crashed) == "checkpoint-8" and not (crashed / "out" / "checkpoint-12").exists()
    # The hook counts attempts from the process start, so the resumed run leaves it out.
    resumed = train(2, crashed, dataset, *RUN_ARGS, "--deepspeed")  # --resume auto is the train default
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    a, b = losses(full_run), losses(crashed)
    assert sorted(b) == list(range(1, 13))
    assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # bit for bit, every step
    wa, wb = weights(full_run / "out" / "checkpoint-12"), weights(crashed / "out" / "checkpoint-12")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def ddp_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp")
    train(2, run_dir, dataset, *RUN_ARGS, "--debug-nan-steps", "3")
    return run_dir


@needs_deepspeed
def test_zero2_fp32_follows_ddp_step_for_step(full_run, ddp_run):
    """Same seed, data, schedule and skipped step: only the order of float sums differs."""
    a, b = losses(ddp_run), losses(full_run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    wa, wb = weights(ddp_run / "out" / "checkpoint-12"), weights(full_run / "out" / "checkpoint-12")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@needs_deepspeed
def test_checkpoints_of_the_other_backend_or_world_size_are_refused(full_run, ddp_run, dataset, tmp_path):
    """One line each, exit 1, nothing resumed. Plain python runs: a world of one."""
    cases = [
        (full_run / "out" / "checkpoint-8", (), "was saved by the DeepSpeed backend; resume it with --deepspeed"),
        (ddp_run / "out" / "checkpoint-8", ("--deepspeed",), "was saved by the DDP backend; resume it without"),
        # the same global batch (4 sequences) on one process: the ZeRO partitions do not fit
        (full_run / "out" / "checkpoint-8", ("--deepspeed",),
         "holds ZeRO optimizer shards of 2 processes, this run has 1; resume with 2 processes"),
    ]
    for i, (ckpt, extra, message) in enumerate(cases):
        run_dir = tmp_path / f"case{i}"
        proc = train(0, run_dir, dataset, "--train", "--batch-size", "4", "--max-steps", "12", "--fp32",
                     "--warmup-steps", "3", "--resume", str(ckpt), *extra, expect=1)
        errors = [l for l in proc.stdout.splitlines() if "❌" in l]
        assert len(errors) == 1 and message in errors[0] and str(ckpt) in errors[0], proc.stdout[-3000:]
        assert not (run_dir / "out" / "latest").exists()


@needs_deepspeed
def test_user_json_conflicting_with_an_explicit_option_is_exit_2(dataset, tmp_path):
    mine = tmp_path / "my_ds.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW",
                                                                                 "params": {"lr": 5e-5}}}))
    run_dir = tmp_path / "run"
    proc = train(0, run_dir, dataset, "--train", "--max-steps", "4", "--deepspeed", str(mine), expect=2)
    errors = [l for l in proc.stdout.splitlines() if "❌" in l]
    assert len(errors) == 1, proc.stdout[-3000:]
    assert ("--learning-rate 0.002 conflicts with optimizer.params.lr = 5e-05 in " + str(mine)) in errors[0]
    assert "drop --learning-rate or edit the file" in errors[0]
    # stopped before any data or checkpoint work (the run's lock may have been taken)
    assert not [p for p in (run_dir / "out").glob("*") if p.name != LOCK_NAME]
    # Under torchrun every rank finds the conflict; rank 0 alone reports it on the console.
    two = train(2, tmp_path / "two", dataset, "--train", "--max-steps", "4", "--deepspeed", str(mine), expect=None)
    assert two.returncode != 0
    lines = [l for l in two.stdout.splitlines() if "❌" in l]
    assert len(lines) == 1 and "conflicts with optimizer.params.lr = 5e-05" in lines[0], two.stdout[-3000:]


# ---------------------------------------------------------------- ZeRO-3 with offload

ZERO3_FILE = ROOT / "configs" / "ds_zero3_offload.json"
ZERO3_ARGS = ("--train", "--batch-size", "2", "--max-steps", "8", "--save-steps", "4", "--fp32", "--ce-chunk-tokens", "64",
              "--warmup-steps", "3", "--eval-steps", "4", "--deepspeed", str(ZERO3_FILE))


@pytest.fixture(scope="module")
def zero3_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ds-zero3")
    proc = train(2, run_dir, dataset, *ZERO3_ARGS)
    assert ("backend: DeepSpeed ZeRO-3, fp32, optimizer offload cpu, parameter offload cpu" in proc.stdout), \
        proc.stdout[-3000:]
    assert "note: activation_checkpointing = true from" in proc.stdout  # the shipped file turns recomputation on
    return run_dir


@needs_deepspeed
def test_zero3_offload_trains_saves_and_exports(zero3_run):
    """The shipped ZeRO-3 file on two gloo processes: the weights are built partitioned
    (deepspeed.zero.Init), each checkpoint holds one weight and one optimizer partition per rank,
    model.safetensors holds the whole consolidated model, and transformers loads it offline."""
    out = zero3_run / "out"
    assert latest(zero3_run) == "checkpoint-8"
    ckpt = out / "checkpoint-8"
    files = sorted(p.name for p in (ckpt / "deepspeed" / "zero").iterdir())
    assert sum("optim_states" in n for n in files) == 2 and sum("model_states" in n for n in files) == 2, files
    assert not (out / "initial_model" / "deepspeed").exists()
    info = json.loads((ckpt / "training_info.json").read_text())
    zero = info["deepspeed_config"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    assert info["config"]["train"]["activation_checkpointing"] is True
    a = losses(zero3_run)
    assert sorted(a) == list(range(1, 9)) and a[8] < a[1] - 0.3  # it learns

    from transformers import AutoModelForCausalLM

    first, last = weights(out / "initial_model"), weights(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]
    assert first.keys() == last.keys() and not any(torch.equal(first[k], last[k]) for k in first
                                                   if k.endswith("proj.weight"))
    # Initialised like the other backends: norms at one, projections small.
    assert torch.equal(first["model.norm.weight"], torch.ones_like(first["model.norm.weight"]))
    assert 0.01 < float(first["model.layers.0.mlp.up_proj.weight"].std()) < 0.03


@needs_deepspeed
def test_zero3_offload_sigkill_then_resume_is_exact(zero3_run, dataset, tmp_path):
    crashed = tmp_path / "crashed"
    proc = train(2, crashed, dataset, *ZERO3_ARGS, "--debug-kill-step", "7", expect=None)
    assert proc.returncode != 0 and latest(crashed) == "checkpoint-4"
    resumed = train(2, crashed, dataset, *ZERO3_ARGS)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a, b = losses(zero3_run), losses(crashed)
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit for bit, every step
    wa, wb = weights(zero3_run / "out" / "checkpoint-8"), weights(crashed / "out" / "checkpoint-8")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The export script takes a ZeRO-3 checkpoint like any other (it copies the model files).
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", "auto",
                           "--output-root", str(crashed / "out"), "--output", str(export)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(torch.equal(weights(export)[k], wa[k]) for k in wa)


@needs_deepspeed
def test_zero3_weights_do_not_depend_on_the_number_of_processes(zero3_run, dataset, tmp_path):
    """Drawn on rank 0 one gathered parameter at a time: one process builds the same initial model."""
    one = tmp_path / "one"
    train(0, one, dataset, "--train", "--batch-size", "4", "--max-steps", "1", "--fp32", "--warmup-steps", "1",
          "--deepspeed", str(ZERO3_FILE))
    wa, wb = weights(zero3_run / "out" / "initial_model"), weights(one / "out" / "initial_model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_deepspeed
def test_zero3_partial_optimizer_offload_trains_and_resumes_exactly(dataset, tmp_path):
    """configs/ds_zero3_8b_one_gpu.json (offload_optimizer.ratio 0.55) through the trainer on two
    gloo processes: the start-up line names the split, and a kill and a resume repeat the
    uninterrupted losses. A CPU accelerator keeps every sub-group in host memory, so the GPU half's
    own state (engines/partial_offload.py) is tested in tests/unit/test_deepspeed.py."""
    spec = json.loads((ROOT / "configs" / "ds_zero3_8b_one_gpu.json").read_text())
    assert spec["zero_optimization"]["offload_optimizer"]["ratio"] == 0.55
    spec["zero_optimization"]["sub_group_size"] = 20_000
    mine = tmp_path / "partial.json"
    mine.write_text(json.dumps(spec))
    args = [a if a != str(ZERO3_FILE) else str(mine) for a in ZERO3_ARGS]
    straight = tmp_path / "straight"
    proc = train(2, straight, dataset, *args)
    assert "optimizer offload cpu (55% of it, the rest on the GPU)" in proc.stdout, proc.stdout[-3000:]
    crashed = tmp_path / "crashed"
    proc = train(2, crashed, dataset, *args, "--debug-kill-step", "7", expect=None)
    assert proc.returncode != 0 and latest(crashed) == "checkpoint-4"
    train(2, crashed, dataset, *args)
    a, b = losses(straight), losses(crashed)
    assert sorted(a) == list(range(1, 9)) and a[8] < a[1] - 0.3
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]

