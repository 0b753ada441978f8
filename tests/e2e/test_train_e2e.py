"""The trainer end to end on CPU: 2 gloo processes, the tiny model, a small corpus.

Crash consistency (SIGKILL mid-run, then exact resume), SIGTERM, non-finite
steps, world-size changes, and the README's test run through the launcher.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e2e_support import cpu_env, latest, losses, write_corpus
from koen_sllm.config import repo_root

pytestmark = pytest.mark.slow

ROOT = repo_root()
TRAIN = ROOT / "scripts" / "train_h100_dual.py"
LAUNCHER = ROOT / "run_h100_dual.sh"



@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A deterministic Korean/English corpus shared by the runs (its prepared cache too)."""
    return write_corpus(tmp_path_factory.mktemp("data"))


def torchrun_cmd(nproc: int, run_dir: Path, dataset: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(TRAIN), "--dataset-path", str(dataset), "--output-dir", str(run_dir / "out"),
            "--logs-dir", str(run_dir / "logs"), "--vocab-size", "400", "--num-proc", "1",
            "--model-size", "tiny", "--max-seq-length", "64", "--log-steps", "1", "--learning-rate", "2e-3", *args]


def train(nproc: int, run_dir: Path, dataset: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, run_dir, dataset, *args), capture_output=True, text=True,
                          env=cpu_env(), timeout=300)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


TRAIN_ARGS = ("--train", "--batch-size", "2", "--max-steps", "12", "--save-steps", "4")


def test_sigkill_then_resume_is_bit_exact(tmp_path, dataset):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(2, full, dataset, *TRAIN_ARGS)
    proc = train(2, crashed, dataset, *TRAIN_ARGS, "--debug-kill-step", "10", expect=None)
    assert proc.returncode != 0
    assert latest(crashed) == "checkpoint-8" and not (crashed / "out" / "checkpoint-12").exists()
    resumed = train(2, crashed, dataset, *TRAIN_ARGS)  # --resume auto is the train-mode default
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    a, b = losses(full), losses(crashed)
    assert sorted(a) == list(range(1, 13)) and sorted(b) == list(range(1, 13))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit for bit, every step
    assert same_weights(full / "out" / "checkpoint-12", crashed / "out" / "checkpoint-12")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, dataset):
    run_dir = tmp_path / "run"
    console = tmp_path / "console.txt"
    with console.open("w") as sink:  # a file, not a pipe: nobody drains a pipe while we wait
        proc = subprocess.Popen(torchrun_cmd(2, run_dir, dataset, "--train", "--batch-size", "2", "--max-steps",
                                             "100000", "--save-steps", "100000"),
                                stdout=sink, stderr=subprocess.STDOUT, text=True, env=cpu_env())
        metrics = run_dir / "logs" / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, console.read_text()[-4000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2
        for pid in workers:  # what the launcher's --stop does
            os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=120)
    out = console.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "received: saving a checkpoint at this step boundary" in out
    assert "Training stopped" in out
    name = latest(run_dir)
    step = int(name.split("-")[1])
    assert step >= 3 and (run_dir / "out" / name / "trainer_state.pt").exists()
    info = json.loads((run_dir / "out" / name / "training_info.json").read_text())
    assert info["step"] == step and info["world_size"] == 2


def test_nonfinite_step_is_skipped_then_the_run_stops_after_the_limit(tmp_path, dataset):
    ok = train(2, tmp_path / "one", dataset, "--train", "--batch-size", "2", "--max-steps", "6",
               "--debug-nan-steps", "3")
    assert "non-finite loss or gradient at step 3" in ok.stdout
    assert ok.stdout.count("non-finite loss or gradient") == 1  # rank 0 speaks for both
    assert "bad steps skipped: 1" in ok.stdout and latest(tmp_path / "one") == "checkpoint-6"
    assert all(v == v for v in losses(tmp_path / "one").values())  # no NaN reached the weights or the log

    bad = train(2, tmp_path / "many", dataset, "--train", "--batch-size", "2", "--max-steps", "8",
                "--save-steps", "2", "--debug-nan-steps", "3,4,5", "--max-bad-steps", "3", expect=1)
    assert "stopped after 3 consecutive non-finite steps at step 3" in bad.stdout + bad.stderr
    assert latest(tmp_path / "many") == "checkpoint-2"
    from koen_sllm.checkpoint.store import verify_checkpoint

    assert verify_checkpoint(tmp_path / "many" / "out" / "checkpoint-2")[0]


def test_world_size_change_keeps_the_token_position(tmp_path, dataset):
    args = ("--train", "--max-steps", "8", "--save-steps", "4")
    full, moved = tmp_path / "full", tmp_path / "moved"
    train(2, full, dataset, *args, "--batch-size", "2")
    train(2, moved, dataset, *args, "--batch-size", "2", "--debug-kill-step", "6", expect=None)
    assert latest(moved) == "checkpoint-4"
    # Same global batch (4 sequences) on one process: continues at the same position.
    train(1, moved, dataset, *args, "--batch-size", "4")
    a, b = losses(full), losses(moved)
    for step in range(5, 9):  # summation order differs across world sizes, so close, not bitwise
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    # A different global batch would reorder the data: refused before anything starts, with the fix.
    refused = train(1, moved, dataset, "--train", "--global-batch-size", "2", expect=1)
    text = refused.stdout + refused.stderr
    assert "would change the run: --global-batch-size 2 (the run has 4)" in text and "drop --global-batch-size" in text
    assert latest(moved) == "checkpoint-8"


def test_readme_test_run_through_the_launcher(tmp_path):
    """./run_h100_dual.sh --test in the foreground with 2 CPU processes and no data at all."""
    out, logs, empty = tmp_path / "out dir", tmp_path / "logs dir", tmp_path / "no data"
    empty.mkdir()
    proc = subprocess.run(["bash", str(LAUNCHER), "--test", "--foreground", "--no-install", "--num-gpus", "2",
                           "--max-steps", "30", "--dataset-path", str(empty), "--output-dir", str(out),
                           "--logs-dir", str(logs), "--learning-rate", "2e-3", "--", "--vocab-size", "512",
                           "--num-proc", "1"],
                          capture_output=True, text=True, env=cpu_env(), timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert "DUMMY" in text.upper()  # the loud warning
    rec = [json.loads(l) for l in (logs / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rec if r["type"] == "train"]
    assert len(train_losses) == 30
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5  # it learns
    assert any(r["type"] == "eval" for r in rec)
    for rank in (0, 1):
        assert (logs / f"training_rank_{rank}.log").stat().st_size > 0
        assert (logs / f"training_detail_rank_{rank}.log").stat().st_size > 0
    console = (logs / "training_console.log").read_text()
    assert "Training complete" in console and "step 30/30" in console

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("initial_model", "checkpoint-30"):
        model = AutoModelForCausalLM.from_pretrained(out / name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(out / name, local_files_only=True)
        ids = tok("안녕하세요 hello", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert not same_weights(out / "initial_model", out / "checkpoint-30")


def test_no_save_final_keeps_the_periodic_checkpoints_only(tmp_path, dataset):
    run = tmp_path / "run"
    train(1, run, dataset, "--train", "--batch-size", "2", "--max-steps", "3", "--save-steps", "2",
          "--no-save-initial", "--no-save-final")
    assert latest(run) == "checkpoint-2"
    assert not (run / "out" / "checkpoint-3").exists()
    assert sorted(losses(run)) == [1, 2, 3]


def test_chunked_loss_option_trains_like_the_plain_loss(tmp_path, dataset):
    args = ("--train", "--batch-size", "2", "--max-steps", "3", "--no-save-initial", "--no-save-final", "--fp32")
    train(1, tmp_path / "plain", dataset, *args)
    proc = train(1, tmp_path / "chunked", dataset, *args, "--ce-chunk-tokens", "24")
    assert "output layer + cross-entropy in chunks of 24 tokens" in proc.stdout + proc.stderr
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "chunked")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)


def test_bf16_residual_is_the_bf16_default_and_can_be_turned_off(tmp_path, dataset):
    args = ("--train", "--batch-size", "2", "--max-steps", "3", "--no-save-initial", "--no-save-final", "--bf16")
    plain = train(1, tmp_path / "fp32-stream", dataset, *args, "--fp32-residual")
    assert "residual stream in" not in plain.stdout + plain.stderr
    proc = train(1, tmp_path / "bf16-stream", dataset, *args)
    assert "residual stream in bfloat16" in proc.stdout + proc.stderr
    a, b = losses(tmp_path / "fp32-stream"), losses(tmp_path / "bf16-stream")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a != b and all(abs(a[s] - b[s]) < 0.1 for s in a), (a, b)  # other rounding, same training


def test_bf16_moments_train_and_resume_bit_exact(tmp_path, dataset):
    """--bf16-moments through the trainer: named at start, and a killed run resumes bit for bit
    with its bf16 moments (they are saved as they are held)."""
    args = ("--train", "--batch-size", "2", "--max-steps", "6", "--save-steps", "3", "--bf16", "--bf16-weights",
            "--bf16-moments")
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    proc = train(1, full, dataset, *args)
    assert "fp32 master weights in the optimizer (--fp32-weights turns this off); AdamW's moments in bf16" in proc.stdout
    train(1, crashed, dataset, *args, "--debug-kill-step", "5", expect=None)
    assert latest(crashed) == "checkpoint-3"
    train(1, crashed, dataset, *args)
    a, b = losses(full), losses(crashed)
    assert sorted(a) == list(range(1, 7)) and [a[s] for s in a] == [b[s] for s in a]
    assert same_weights(full / "out" / "checkpoint-6", crashed / "out" / "checkpoint-6")


def test_bf16_weights_resume_bit_exact_keep_fp32_checkpoints_and_train_like_fp32_weights(tmp_path, dataset):
    """bf16 weights with fp32 masters in the optimizer, two gloo processes: a killed run resumes
    bit for bit, checkpoints hold the fp32 masters (not bf16 values), a NaN step is skipped on the
    update's own flag, and the losses follow the fp32-weight run to bf16 rounding."""
    args = ("--train", "--batch-size", "2", "--max-steps", "8", "--save-steps", "4", "--bf16")
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    proc = train(2, full, dataset, *args, "--bf16-weights")
    assert "weights in bf16, fp32 master weights in the optimizer" in proc.stdout
    train(2, crashed, dataset, *args, "--bf16-weights", "--debug-kill-step", "6", expect=None)
    assert latest(crashed) == "checkpoint-4"
    resumed = train(2, crashed, dataset, *args, "--bf16-weights")
    assert "at step 4" in resumed.stdout
    a, b = losses(full), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 9)) and [a[s] for s in a] == [b[s] for s in a]
    assert same_weights(full / "out" / "checkpoint-8", crashed / "out" / "checkpoint-8")

    weights = load_file(str(full / "out" / "checkpoint-8" / "model.safetensors"))
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.to(torch.bfloat16).float())  # the masters

    train(2, tmp_path / "fp32w", dataset, *args, "--fp32-weights")
    c = losses(tmp_path / "fp32w")
    assert a != c and all(abs(a[s] - c[s]) < 0.02 for s in a), (a, c)
    assert a[8] < a[1] - 0.2  # it trained

    nan = train(2, tmp_path / "nan", dataset, *args, "--bf16-weights", "--debug-nan-steps", "3")
    assert "non-finite loss or gradient at step 3" in nan.stdout and "bad steps skipped: 1" in nan.stdout
    d = losses(tmp_path / "nan")
    assert d[1] == a[1] and d[2] == a[2] and all(v == v for v in d.values())


def test_compiled_ddp_with_accumulation_trains_like_eager(tmp_path, dataset):
    """torch.compile around DDP (Dynamo splits the graph at DDP's gradient buckets) on two gloo
    processes, with accumulation so no_sync passes through the compiled wrapper: the same losses
    as the eager run, to compiled-kernel rounding."""
    args = ("--train", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3", "--no-save-initial",
            "--no-save-final", "--fp32")
    train(2, tmp_path / "eager", dataset, *args)
    proc = train(2, tmp_path / "compiled", dataset, *args, "--compile", "--ddp-bucket-mb", "1")
    assert "compile on" in proc.stdout + proc.stderr
    assert "DDP, 1 MB gradient buckets" in proc.stdout + proc.stderr
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    assert a[3] < a[1] - 0.05  # the steps trained, so equal losses are not the untouched weights'


def test_check_resume_script_compares_straight_and_resumed_losses(tmp_path, dataset):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "check_resume.sh"), "--steps", "4", "--num-gpus", "2", "--dataset-path",
         str(dataset), "--", "--model-size", "tiny", "--max-seq-length", "64", "--vocab-size", "400",
         "--num-proc", "1", "--batch-size", "2", "--learning-rate", "2e-3"],
        capture_output=True, text=True, env=cpu_env(KOEN_PYTHON=sys.executable, CHECK_DIR=str(tmp_path / "check")),
        timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "largest |difference| over steps 3-4: 0 (bit-identical)" in proc.stdout
    assert (tmp_path / "check" / "straight" / "out" / "checkpoint-2").is_dir()
