"""run_h100_dual.sh: option errors, --help, --dry-run, PID file, --status/--stop, log rotation.

Everything here drives the real script through bash. The end-to-end tests at
the bottom start real (CPU, gloo) training runs through the real trainer.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from koen_sllm import config
from koen_sllm.config import repo_root

ROOT = repo_root()
LAUNCHER = ROOT / "scripts" / "run_h100_dual.sh"
WRAPPER = ROOT / "run_h100_dual.sh"
LIB = ROOT / "koen_sllm" / "launcher" / "sbatch_lib.sh"

ALL_OPTIONS = [
    "--test", "--train", "--max-steps", "--dataset-path", "--output-dir", "--logs-dir", "--batch-size",
    "--learning-rate", "--max-seq-length", "--save-steps", "--fp16", "--fp32", "--no-compile", "--num-gpus",
    "--foreground", "--no-save-initial", "--dry-run", "--verbose", "--help", "--model-size", "--grad-accum",
    "--resume", "--deepspeed", "--status", "--stop", "--no-install", "--fp8",
]


def launcher_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("KOEN_CONSOLE_LOG", "KOEN_TEST_GPU_COUNT", "KOEN_STOP_TIMEOUT", "CONDA_PREFIX"):
        env.pop(key, None)
    if sys.prefix != sys.base_prefix:  # the venv running pytest is the one to use
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["KOEN_NO_INSTALL"] = "1"
    env.update(extra)
    return env


def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120,
        script: Path = LAUNCHER) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env or launcher_env(),
                          cwd=cwd, timeout=timeout)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


@pytest.fixture
def procs():
    """Processes a test starts; killed at teardown. A reaper thread waits on each,
    so a finished one disappears instead of lingering as a zombie."""
    started: list[subprocess.Popen] = []

    def start(cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        threading.Thread(target=p.wait, daemon=True).start()
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- option errors: exit 2, one line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["stray"], "unknown option 'stray'"),
        (["--batch-size", "abc"], "--batch-size needs a whole number, got 'abc'"),
        (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
        (["--max-steps", "-3"], "--max-steps must be a positive number, got -3"),
        (["--num-gpus", "1.5"], "--num-gpus needs a whole number, got '1.5'"),
        (["--num-gpus", "0"], "--num-gpus needs a whole number from 1"),
        (["--save-steps=x"], "--save-steps needs a whole number, got 'x'"),
        (["--max-seq-length"], "--max-seq-length needs a value"),
        (["--learning-rate", "fast"], "--learning-rate needs a number, got 'fast'"),
        (["--learning-rate", "0"], "--learning-rate must be a positive number, got 0"),
        (["--learning-rate=-1e-4"], "--learning-rate must be a positive number, got -0.0001"),
        # Values the old launcher let through (non-finite, beyond 64 bits) or did not know.
        (["--learning-rate", "1e999"], "--learning-rate inf is not a finite number"),
        (["--learning-rate", "nan"], "--learning-rate nan is not a finite number"),
        (["--max-steps", "18446744073709551617"], "does not fit a signed 64-bit integer"),
        (["--global-batch-size", "x"], "--global-batch-size needs a whole number, got 'x'"),
        (["--batch", "8"], "unknown option '--batch'"),
        (["--fp16", "--fp32"], "--fp16 and --fp32 cannot be combined"),
        (["--test", "--train"], "--test and --train cannot be combined"),
        (["--status", "--train"], "--status cannot be combined with --train"),
        (["--stop", "--test"], "--stop cannot be combined with --test"),
        (["--status", "--batch-size", "2"], "--status cannot be combined with --batch-size"),
        (["--status", "--stop"], "--status and --stop cannot be combined"),
        (["--model-size", "7b"], "unknown --model-size '7b'"),
        (["--foreground=yes"], "--foreground takes no value, got 'yes'"),
        (["--dataset-path", "/nonexistent/koen data"], "'/nonexistent/koen data' does not exist"),
        (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed config '/nonexistent/ds.json' not found"),
        (["--resume", "/nonexistent/ckpt"], "--resume '/nonexistent/ckpt' does not exist"),
    ],
)
def test_bad_option_exits_2_with_one_line(args, needle, tmp_path):
    res = run(*args, "--logs-dir", str(tmp_path / "logs"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = error_lines(res)
    assert len(lines) == 1, lines
    assert lines[0].startswith("❌") and needle in lines[0]
    assert res.stdout == ""  # nothing printed, nothing started
    assert not (tmp_path / "logs").exists()


def test_train_mode_without_data_exits_2(tmp_path):
    empty = tmp_path / "empty data"
    empty.mkdir()
    (empty / "notes.md").write_text("not training data")
    res = run("--train", "--dataset-path", str(empty))
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "no .jsonl/.txt training data" in lines[0] and str(empty) in lines[0]
    assert "run_preprocessing.sh" in lines[0]


def test_train_mode_accepts_a_prepared_folder_without_its_corpus(tmp_path):
    """Only the token files were copied (a cluster volume): the launcher lets the trainer check them."""
    data = tmp_path / "volume data"
    (data / "prepared" / "mixed_pretraining").mkdir(parents=True)
    (data / "prepared" / "mixed_pretraining" / "meta.json").write_text("{}")
    res = run("--train", "--dry-run", "--dataset-path", str(data), "--logs-dir", str(tmp_path / "logs"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"prepared data in {data / 'prepared' / 'mixed_pretraining'}" in res.stdout
    (data / "prepared" / "second").mkdir()
    (data / "prepared" / "second" / "meta.json").write_text("{}")
    res = run("--train", "--dry-run", "--dataset-path", str(data), "--logs-dir", str(tmp_path / "logs"))
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "2 prepared folders" in lines[0] and "pass --dataset-path the one" in lines[0]


def test_explicit_gpu_count_above_present_exits_2(tmp_path):
    res = run("--dry-run", "--num-gpus", "2", "--logs-dir", str(tmp_path), env=launcher_env(KOEN_TEST_GPU_COUNT="1"))
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "--num-gpus 2" in lines[0] and "only 1 GPU(s) present" in lines[0]
    assert "torch.distributed.run" not in res.stdout


def test_default_gpu_count_is_capped_with_a_warning(tmp_path):
    res = run("--dry-run", "--logs-dir", str(tmp_path), env=launcher_env(KOEN_TEST_GPU_COUNT="1"))
    assert res.returncode == 0, res.stderr
    assert "only 1 GPU(s): using 1" in res.stdout
    assert " --nproc_per_node 1 " in res.stdout


def test_fp16_without_gpu_exits_2(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --fp16 is allowed")
    res = run("--fp16", "--dry-run", "--logs-dir", str(tmp_path))
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "--fp16 needs a CUDA GPU" in lines[0]


def test_fp8_without_gpu_exits_2(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --fp8 may be allowed")
    res = run("--fp8", "rowwise", "--dry-run", "--logs-dir", str(tmp_path))
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "--fp8 needs an NVIDIA GPU with FP8 support" in lines[0] and "drop --fp8" in lines[0]


# ---------------------------------------------------------------- help, defaults, dry run


def test_help_lists_every_option():
    res = run("--help")
    assert res.returncode == 0
    for opt in ALL_OPTIONS:
        assert re.search(rf"(^|\s){re.escape(opt)}(\s|=|$)", res.stdout, re.M), f"{opt} missing from --help"
    assert "-- ARGS" in res.stdout and "docs/launcher.md" in res.stdout


def test_root_wrapper_reaches_the_launcher():
    res = run("--help", script=WRAPPER, cwd=Path("/"))
    assert res.returncode == 0 and "--num-gpus" in res.stdout


def test_the_shell_launcher_keeps_no_option_list_or_default():
    """Options are parsed, defaulted and checked in Python alone (koen_sllm/launcher/options.py)."""
    lines = LAUNCHER.read_text(encoding="utf-8").splitlines()
    code = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    for word in ("--batch-size", "--learning-rate", "--max-steps", "--test", "DEFAULT_", "case "):
        assert word not in code, f"{word} in {LAUNCHER}"
    assert len(lines) < 40


def test_the_options_table_in_docs_matches_the_parser():
    """docs/launcher.md's two tables list every documented launcher option with the parser's help text."""
    from koen_sllm.launcher.options import options_table

    doc = (ROOT / "docs" / "launcher.md").read_text(encoding="utf-8")
    for option, korean, english in options_table():
        rows = [line for line in doc.splitlines() if line.startswith(f"| `{option}")]
        assert len(rows) == 2, f"{option}: {len(rows)} rows in docs/launcher.md"
        assert english in rows[0], f"{option}: the English row does not carry the parser's help: {english!r}"
        assert korean in rows[1], f"{option}: the Korean row does not carry {korean!r}"


def test_every_trainer_option_is_a_launcher_option():
    from koen_sllm.launcher.options import build_launcher_parser

    launcher = {s for a in build_launcher_parser()._actions for s in a.option_strings}
    trainer = {s for a in config.build_parser()._actions for s in a.option_strings}
    assert trainer <= launcher


def _command_from(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if "실행할 명령 / command:" in line)
    return shlex.split(lines[i + 1])


def _trainer_args(stdout: str) -> list[str]:
    """The words after the training script in the command --dry-run prints."""
    cmd = _command_from(stdout)
    return cmd[next(i for i, w in enumerate(cmd) if w.endswith("train_h100_dual.py")) + 1:]


def _config_from(stdout: str) -> dict:
    start = stdout.index("resolved configuration")
    return json.loads(stdout[stdout.index("{", start):])


def test_dry_run_prints_the_command_with_options_and_spaced_paths(tmp_path):
    cwd = tmp_path / "work dir"
    cwd.mkdir()
    data = tmp_path / "my data"
    data.mkdir()
    (data / "corpus.jsonl").write_text('{"text": "안녕하세요"}\n', encoding="utf-8")
    res = run("--dry-run", "--train", "--batch-size", "8", "--learning-rate", "5e-5", "--max-steps", "7",
              "--save-steps", "3", "--grad-accum", "2", "--fp32", "--no-compile", "--no-save-initial",
              "--model-size", "tiny", "--num-gpus", "3", "--max-seq-length", "64", "--resume", "none",
              "--dataset-path", str(data), "--output-dir", "out dir", "--logs-dir", "log's dir",
              "--", "--warmup-steps", "2", cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert "✅ 모든 요구사항 충족" in res.stdout and "📋 학습 정보" in res.stdout
    assert "running 3 CPU processes" in res.stdout or "GPU 확인 완료" in res.stdout
    cmd = _command_from(res.stdout)
    # The torchrun wrapper runs from this checkout even though the current directory is elsewhere.
    assert cmd[1] == "-c" and Path(cmd[3]) == ROOT
    assert cmd[4:8] == ["koen_sllm.launcher.torchrun", "--standalone", "--nproc_per_node", "3"]
    assert Path(cmd[8]) == ROOT / "scripts" / "train_h100_dual.py"
    args = cmd[9:]

    def after(opt):
        return args[args.index(opt) + 1]

    assert args[0] == "--train"
    assert after("--output-dir") == str(cwd / "out dir")  # relative paths follow the caller's directory
    assert after("--logs-dir") == str(cwd / "log's dir")
    assert after("--dataset-path") == str(data)
    assert (after("--batch-size"), after("--learning-rate"), after("--max-steps")) == ("8", "5e-5", "7")
    assert (after("--save-steps"), after("--grad-accum"), after("--max-seq-length")) == ("3", "2", "64")
    assert (after("--model-size"), after("--resume")) == ("tiny", "none")
    assert {"--fp32", "--no-compile", "--no-save-initial"} <= set(args)
    assert after("--warmup-steps") == "2" and "--dry-run" not in args and "--num-gpus" not in args
    # The trainer's own --dry-run resolved the same options.
    cfg = _config_from(res.stdout)
    assert cfg["train"]["batch_size"] == 8 and cfg["train"]["max_steps"] == 7 and cfg["train"]["mode"] == "train"
    assert cfg["ckpt"]["output_dir"] == str(cwd / "out dir") and cfg["optim"]["warmup_steps"] == 2
    assert cfg["train"]["precision"] == "fp32" and cfg["ckpt"]["save_initial"] is False
    assert not (cwd / "out dir").exists() and not (cwd / "log's dir").exists()  # nothing started


def test_dry_run_defaults_and_optional_values(tmp_path):
    res = run("--dry-run", "--resume", "--deepspeed", "--logs-dir", str(tmp_path / "l"), "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    args = _trainer_args(res.stdout)
    assert args[0] == "--test" and "--batch-size" not in args  # defaults stay the trainer's
    assert args[args.index("--resume") + 1] == "auto"
    assert args[-1] == "--deepspeed" or args[args.index("--deepspeed") + 1].startswith("--")
    assert "배치 크기 / batch size: 4" in res.stdout
    # with --deepspeed, what was not typed comes from the JSON: the block shows the value the run uses
    assert "학습률 / learning rate: 5e-05" in res.stdout
    plain = run("--dry-run", "--logs-dir", str(tmp_path / "l"), "--output-dir", str(tmp_path / "o"))
    assert "학습률 / learning rate: 0.0001" in plain.stdout
    # ... and the trainer's resolved configuration already holds the JSON's values
    cfg = _config_from(res.stdout)
    assert cfg["optim"]["learning_rate"] == 5e-5 and cfg["optim"]["warmup_steps"] == 10
    assert _config_from(plain.stdout)["optim"]["learning_rate"] == 1e-4


def test_dry_run_reports_a_deepspeed_json_that_contradicts_an_option(tmp_path):
    ds = tmp_path / "my ds.json"
    ds.write_text('{"optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}}')
    res = run("--dry-run", "--deepspeed", str(ds), "--learning-rate", "2e-3", "--logs-dir", str(tmp_path / "l"),
              "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "--learning-rate 0.002 conflicts with optimizer.params.lr = 5e-05" in res.stdout + res.stderr


def test_resume_by_checkpoint_name_looks_in_the_output_dir(tmp_path):
    (tmp_path / "out" / "checkpoint-500").mkdir(parents=True)
    res = run("--dry-run", "--resume", "checkpoint-500", "--output-dir", str(tmp_path / "out"),
              "--logs-dir", str(tmp_path / "l"), cwd=Path("/"))
    assert res.returncode == 0, res.stderr
    args = _trainer_args(res.stdout)
    assert args[args.index("--resume") + 1] == str(tmp_path / "out" / "checkpoint-500")


# ---------------------------------------------------------------- PID file, --status, --stop


def write_pid_record(logs: Path, pid: int, run_id: str = "test-run") -> None:
    """A PID file as the launcher writes it: the identity of a live process."""
    from koen_sllm.launcher import pidfile

    pidfile.write_pid_file(logs / "training.pid", pidfile.record_for(pid, run_id, logs_dir=str(logs)))


def test_second_start_is_refused_while_the_run_lives(tmp_path, procs):
    logs = tmp_path / "logs"
    logs.mkdir()
    sleeper = procs(["sleep", "60"], start_new_session=True)
    write_pid_record(logs, sleeper.pid)
    res = run("--test", "--logs-dir", str(logs), "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 1
    lines = error_lines(res)
    assert len(lines) == 1 and f"PID {sleeper.pid}" in lines[0] and "already" in lines[0]
    assert "sleep 60" in lines[0]
    assert json.loads((logs / "training.pid").read_text())["pid"] == sleeper.pid  # left alone
    assert not (tmp_path / "out").exists() and not (logs / "training_console.log").exists()


@pytest.mark.parametrize("content", ["bare", "1\n", "0\n", "reused"])
def test_stop_never_signals_a_process_the_pid_file_does_not_prove(tmp_path, procs, content):
    """A bare PID (written by hand or by an older launcher), PID 0 or 1, or a PID now used by
    another process: --status/--stop call the file stale, remove it and signal nothing."""
    logs = tmp_path / "logs"
    logs.mkdir()
    stranger = procs(["sleep", "60"], start_new_session=True)
    if content == "bare":
        (logs / "training.pid").write_text(f"{stranger.pid}\n")
    elif content == "reused":  # the record of an earlier process whose PID the stranger now has
        write_pid_record(logs, stranger.pid)
        record = json.loads((logs / "training.pid").read_text())
        record["start_time"] -= 1
        (logs / "training.pid").write_text(json.dumps(record))
    else:
        (logs / "training.pid").write_text(content)
    res = run("--stop", "--logs-dir", str(logs))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stale PID file" in res.stdout and "nothing to stop" in res.stdout
    assert not (logs / "training.pid").exists()
    time.sleep(0.3)
    assert stranger.poll() is None, "--stop signalled a process that is not the run"
    (logs / "training.pid").write_text(f"{stranger.pid}\n")
    res = run("--status", "--logs-dir", str(logs))
    assert res.returncode == 3 and "no training is running" in res.stdout and stranger.poll() is None


@pytest.mark.parametrize("content", [None, "garbage\n"])
def test_status_cleans_a_stale_pid_file(tmp_path, content):
    logs = tmp_path / "logs"
    logs.mkdir()
    pid = dead_pid()
    (logs / "training.pid").write_text(content or f"{pid}\n")
    (logs / "training_console.log").write_text(
        "[2025-01-01 10:00:00] step 9/10 | loss 3.2100 | lr 1.00e-04 | grad_norm 0.500 | tok/s 1,234 | "
        "tok/s/gpu 617 | mfu n/a | mem n/a | eta 0:00:01\n[2025-01-01 10:00:01] ✅ Training complete / 학습 완료\n")
    res = run("--status", "--logs-dir", str(logs))
    assert res.returncode == 3
    assert "stale PID file" in res.stdout and not (logs / "training.pid").exists()
    assert "no training is running" in res.stdout
    assert "step 9/10 | loss 3.2100 | tok/s 1,234" in res.stdout and "Training complete" in res.stdout


def test_status_reads_the_latest_progress_line(tmp_path, procs):
    logs = tmp_path / "logs"
    logs.mkdir()
    sleeper = procs(["sleep", "60"], start_new_session=True)
    write_pid_record(logs, sleeper.pid)
    older = ("[2025-01-01 10:00:00] step 5/100 | loss 6.0000 | lr 1.00e-04 | grad_norm 1.000 | tok/s 9,999 | "
             "tok/s/gpu 5,000 | mfu 40.0% | mem 10.0 GiB | eta 0:20:00")
    newer = ("[2025-01-01 10:05:00] step 10/100 | loss 5.1234 | lr 1.00e-04 | grad_norm 1.234 | tok/s 12,345 | "
             "tok/s/gpu 6,172 | mfu 45.1% | mem 12.3 GiB | eta 0:12:34")
    (logs / "training_console.log").write_text(f"{older}\nsome other line\n{newer}\n[x] saving\n")
    res = run("--status", "--logs-dir", str(logs))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"running: PID {sleeper.pid}" in res.stdout
    assert "step 10/100 | loss 5.1234 | tok/s 12,345 | ETA 0:12:34  (2025-01-01 10:05:00)" in res.stdout
    assert "step 5/100" not in res.stdout


def test_status_and_stop_with_nothing_running(tmp_path):
    res = run("--status", "--logs-dir", str(tmp_path))
    assert res.returncode == 3 and "no training is running" in res.stdout
    res = run("--stop", "--logs-dir", str(tmp_path))
    assert res.returncode == 0 and "nothing to stop" in res.stdout


FAKE_TORCHRUN = textwrap.dedent("""
    # Stands in for torchrun: one worker that "saves" on SIGTERM; the parent waits for it.
    import signal, subprocess, sys, time
    from pathlib import Path
    out, ignore = Path(sys.argv[1]), sys.argv[2] == "ignore"
    worker = '''
    import signal, sys, time
    from pathlib import Path
    out, ignore = Path(sys.argv[1]), sys.argv[2] == "ignore"
    def on_term(signum, frame):
        (out / "saved").write_text("checkpoint")
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else on_term)
    (out / "ready").write_text("1")
    while True:
        time.sleep(0.1)
    '''
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the workers are to be signalled
    child = subprocess.Popen([sys.executable, "-c", worker, str(out), sys.argv[2]])
    sys.exit(child.wait())
""")


def _start_fake_run(tmp_path, procs, mode="save"):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "training_console.log").write_text("[2025-01-01 10:00:00] step 1/10 | loss 1.0000 | eta 0:00:09\n")
    script = tmp_path / "fake_torchrun.py"
    script.write_text(FAKE_TORCHRUN)
    parent = procs([sys.executable, str(script), str(tmp_path), mode], start_new_session=True,
                   env=dict(os.environ, KOEN_RUN_ID="test-run"))
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and parent.poll() is None, "fake run did not start"
        time.sleep(0.05)
    write_pid_record(logs, parent.pid)
    return logs, parent


def test_stop_signals_the_workers_and_waits(tmp_path, procs):
    logs, parent = _start_fake_run(tmp_path, procs)
    res = run("--stop", "--logs-dir", str(logs), env=launcher_env(KOEN_STOP_TIMEOUT="30"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "saved").read_text() == "checkpoint"  # the worker got SIGTERM, not the parent
    assert parent.wait(timeout=10) == 0
    assert "the run has ended" in res.stdout and not (logs / "training.pid").exists()
    assert "step 1/10" in res.stdout  # the last lines of the log
    log = (logs / "training_console.log").read_text()
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[launcher\] --stop: SIGTERM to workers \d+", log, re.M)


def test_stop_times_out_with_advice_and_does_not_signal_twice(tmp_path, procs):
    logs, parent = _start_fake_run(tmp_path, procs, mode="ignore")
    res = run("--stop", "--logs-dir", str(logs), env=launcher_env(KOEN_STOP_TIMEOUT="1"))
    assert res.returncode == 1
    assert "still running after 1 s" in res.stdout and f"kill {parent.pid}" in res.stdout
    assert (logs / "training.pid").exists() and parent.poll() is None
    res = run("--stop", "--logs-dir", str(logs), env=launcher_env(KOEN_STOP_TIMEOUT="1"))
    assert res.returncode == 1 and "already requested" in res.stdout
    assert (logs / "training_console.log").read_text().count("--stop: SIGTERM") == 1


# ---------------------------------------------------------------- start paths, with a stand-in trainer

FAKE_TRAINER = textwrap.dedent("""
    # Stands in for scripts/train_h100_dual.py under torchrun: progress lines, per-rank files,
    # SIGTERM -> "save" and exit 0 at the next step (a second one exits at once).
    import os, signal, sys, time
    rank, args = int(os.environ.get("RANK", 0)), sys.argv[1:]
    if "--dry-run" in args:
        print('{"fake": true}')
        sys.exit(0)
    if os.environ.get("FAKE_EXIT"):
        if rank == 0:
            print(time.strftime("[%Y-%m-%d %H:%M:%S] ") + "❌ " + os.environ.get("FAKE_REASON", "failed"), flush=True)
        sys.exit(int(os.environ["FAKE_EXIT"]))
    logs = args[args.index("--logs-dir") + 1]
    stops = []
    def on_signal(signum, frame):
        stops.append(signum)
        if len(stops) > 1:
            sys.exit(99)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(f"{logs}/training_rank_{rank}.log", "a") as fh:
        fh.write(f"rank {rank} up\\n")
    console = os.environ.get("KOEN_CONSOLE_LOG")
    def log(msg):
        if rank == 0:
            line = time.strftime("[%Y-%m-%d %H:%M:%S] ") + msg
            print(line, flush=True)
            if console:
                with open(console, "a") as fh:
                    fh.write(line + "\\n")
    n = int(os.environ.get("FAKE_STEPS", "5"))
    for step in range(1, n + 1):
        if stops:
            log("Training stopped (signal) | final loss 4.0")
            sys.exit(0)
        log(f"step {step}/{n} | loss {5 - step / 100:.4f} | lr 1.00e-04 | grad_norm 1.000 | tok/s 1,234 | "
            f"tok/s/gpu 617 | mfu n/a | mem n/a | eta 0:00:{n - step:02d}")
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.2")))
    log("Training complete | final loss 4.0")
""")


@pytest.fixture
def fake_checkout(tmp_path):
    """A copy of the launcher scripts beside a stand-in trainer, with this package importable."""
    root = tmp_path / "check out"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "run_h100_dual.sh", root / "scripts" / "run_h100_dual.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(ROOT / "koen_sllm", root / "koen_sllm", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "scripts" / "train_h100_dual.py").write_text(FAKE_TRAINER)
    return root


def fake_env(root: Path, **extra: str) -> dict[str, str]:
    return launcher_env(PYTHONPATH=str(root), **extra)


def wait_until_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if re.search(r"^State:\s+Z", Path(f"/proc/{pid}/status").read_text(), re.M):
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    raise AssertionError(f"PID {pid} still running after {timeout} s")


def test_background_start_rotates_logs_writes_the_pid_and_prints_commands(fake_checkout):
    logs = fake_checkout / "logs" / "test"  # a test run's own folder
    logs.mkdir(parents=True)
    (logs / "training_console.log").write_text("earlier run\n")
    (logs / "training_detail_rank_0.log").write_text("earlier detail\n")
    (logs / "training.pid").write_text(f"{dead_pid()}\n")  # stale: cleaned with a note
    res = run("--test", "--no-install", script=fake_checkout / "scripts" / "run_h100_dual.sh",
              env=fake_env(fake_checkout, FAKE_STEPS="3"))
    assert res.returncode == 0, res.stdout + res.stderr
    pid = int(re.search(r"PID: (\d+)", res.stdout).group(1))
    assert "stale PID file" in res.stdout
    assert "step 1/3" in res.stdout  # it waited for the first step
    assert f"ps -p {pid}" in res.stdout and f"kill {pid}" in res.stdout and "--stop" in res.stdout
    assert f"tail -f '{logs}/training_console.log'" in res.stdout  # quoted: the path has a space
    wait_until_dead(pid)
    assert (logs / "training_console.log.1").read_text() == "earlier run\n"
    assert (logs / "training_detail_rank_0.log.1").read_text() == "earlier detail\n"
    console = (logs / "training_console.log").read_text()
    assert "step 3/3" in console and "Training complete" in console
    assert re.search(r"^\[[\d: -]+\] \[launcher\] started in the background, PID " + str(pid), console, re.M)
    assert (logs / "training_rank_0.log").exists() and (logs / "training_rank_1.log").exists()
    res = run("--status", script=fake_checkout / "scripts" / "run_h100_dual.sh", env=fake_env(fake_checkout))
    assert res.returncode == 3 and "step 3/3" in res.stdout and "Training complete" in res.stdout


def test_background_run_that_dies_before_its_first_step_is_reported(fake_checkout):
    res = run("--test", script=fake_checkout / "scripts" / "run_h100_dual.sh",
              env=fake_env(fake_checkout, FAKE_EXIT="3", FAKE_REASON="no such corpus"))
    assert res.returncode == 1
    last = res.stderr.splitlines()[-1]
    assert "failed before its first step (exit 3)" in last and "no such corpus" in last
    assert "started in the background" in res.stdout  # it did start, and then said it failed
    assert not (fake_checkout / "logs" / "test" / "training.pid").exists()


def test_foreground_exit_code_is_the_workers(fake_checkout):
    script = fake_checkout / "scripts" / "run_h100_dual.sh"
    res = run("--foreground", script=script, env=fake_env(fake_checkout, FAKE_EXIT="5"))
    assert res.returncode == 5  # the worker's own code, not torchrun's blanket 1
    assert "failed with exit code 5" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr and "ChildFailedError" not in res.stdout + res.stderr
    logs = fake_checkout / "logs" / "test"
    assert "the run exited with code 5" in (logs / "training_console.log").read_text()
    assert "ChildFailedError" in (logs / "training_detail_rank_0.log").read_text()  # the report, kept
    assert not (logs / "training.pid").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_signal_asks_the_workers_to_save(fake_checkout, sig):
    logs = fake_checkout / "logs" / "test"
    # A shell started with SIGINT ignored (pytest under a background job or some CI runners) can
    # never trap it; a user's terminal starts the launcher with the default disposition.
    proc = subprocess.Popen(["bash", str(fake_checkout / "scripts" / "run_h100_dual.sh"), "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=fake_env(fake_checkout, FAKE_STEPS="400", FAKE_STEP_S="0.1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        console = logs / "training_console.log"
        deadline = time.time() + 60
        while not (console.exists() and "step 3/400" in console.read_text()):
            assert time.time() < deadline and proc.poll() is None, "the stand-in run did not start"
            time.sleep(0.1)
        assert (logs / "training.pid").exists()  # --status/--stop work from another terminal
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping after a checkpoint save" in out
    console = (logs / "training_console.log").read_text()
    assert "Training stopped" in console and "step 400/400" not in console
    assert re.search(r"\[launcher\] signal: SIGTERM to workers \d+ \d+ \(request 1\)", console)
    assert not (logs / "training.pid").exists()


# ---------------------------------------------------------------- shell helpers


def _bash(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "$0"; {script}', str(LIB), *args],
                          capture_output=True, text=True, timeout=30)


def test_shquote_round_trips_through_the_shell():
    words = ["plain", "with space", "it's", "$HOME", "", "a\"b", "*.jsonl", "tab\there", "한국어 경로"]
    res = _bash('koen_shquote "$@"', *words)
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == words
    assert res.stdout.startswith("plain 'with space' ")


def test_rotation_keeps_five_and_never_overwrites(tmp_path):
    logs = tmp_path / "logs dir"
    logs.mkdir()
    (logs / "training_console.log").write_text("run6")
    for i in range(1, 6):
        (logs / f"training_console.log.{i}").write_text(f"run{6 - i}")
    (logs / "training_rank_0.log").write_text("r0")
    (logs / "training_rank_1.log").write_text("r1")
    (logs / "training_detail_rank_1.log").write_text("d1")
    (logs / "training_detail_rank_0.log").write_text("")  # empty: nothing to keep
    (logs / "metrics.jsonl").write_text("{}")
    from koen_sllm.launcher.files import rotate_logs

    assert rotate_logs(logs) == 4
    assert [(logs / f"training_console.log.{i}").read_text() for i in range(1, 6)] == \
        ["run6", "run5", "run4", "run3", "run2"]  # run1 (the oldest) dropped
    assert not (logs / "training_console.log").exists()
    assert (logs / "training_rank_0.log.1").read_text() == "r0"
    assert (logs / "training_rank_1.log.1").read_text() == "r1"
    assert (logs / "training_detail_rank_1.log.1").read_text() == "d1"
    assert (logs / "training_detail_rank_0.log").exists() and not (logs / "training_detail_rank_0.log.1").exists()
    assert (logs / "metrics.jsonl").read_text() == "{}"


def test_progress_summary_parses_the_documented_line():
    line = ("[2025-01-01 10:05:00] step 10/100 | loss 5.1234 | lr 1.00e-04 | grad_norm 1.234 | tok/s 12,345 | "
            "tok/s/gpu 6,172 | mfu n/a | mem 12.3 GiB | eta 0:12:34")
    from koen_sllm.launcher.control import progress_summary

    assert progress_summary(line) == "step 10/100 | loss 5.1234 | tok/s 12,345 | ETA 0:12:34  (2025-01-01 10:05:00)"


def test_the_sbatch_rotation_matches_the_launchers(tmp_path):
    """train.sbatch rotates with the shell helper; it must leave what the launcher leaves."""
    for i in range(1, 6):
        (tmp_path / f"training_console.log.{i}").write_text(f"run{6 - i}")
    (tmp_path / "training_console.log").write_text("run6")
    res = _bash('koen_rotate_file "$1"', str(tmp_path / "training_console.log"))
    assert res.returncode == 0
    assert [(tmp_path / f"training_console.log.{i}").read_text() for i in range(1, 6)] == \
        ["run6", "run5", "run4", "run3", "run2"]


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    files = [LAUNCHER, WRAPPER, LIB, ROOT / "koen_sllm" / "launcher" / "setup_env.sh", ROOT / "scripts" / "train.sbatch"]
    res = subprocess.run(["shellcheck", "-x", *map(str, files)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("extra, shown", [
    (["--max-steps", "20"], "train (20 steps)"),
    ([], "train (one epoch)"),
])
def test_train_mode_line_names_the_step_count_once(tmp_path, extra, shown):
    (tmp_path / "mixed_pretraining.jsonl").write_text('{"text": "안녕하세요"}\n', encoding="utf-8")
    res = run("--dry-run", "--train", *extra, "--dataset-path", str(tmp_path), "--logs-dir", str(tmp_path / "l"),
              "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stdout + res.stderr
    mode = [line for line in res.stdout.splitlines() if "mode:" in line]
    assert mode and mode[0].endswith(shown), mode


# ---------------------------------------------------------------- environments as they are


def _fake_venv(tmp_path: Path, probe_says: str) -> tuple[Path, Path]:
    """A virtualenv whose python answers the requirement probe with ``probe_says`` and records any pip call."""
    venv, marker = tmp_path / "other venv", tmp_path / "pip-was-run"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [[ "$1" == "-m" && "$2" == "pip" ]]; then touch {shlex.quote(str(marker))}; exit 0; fi
        if [[ "$1" == "-c" ]]; then echo {shlex.quote(probe_says)}; exit 0; fi
        exec {shlex.quote(sys.executable)} "$@"
        """))
    python.chmod(0o755)
    return venv, marker


def test_dry_run_never_installs_anything(tmp_path):
    venv, marker = _fake_venv(tmp_path, "missing torch")
    env = launcher_env(VIRTUAL_ENV=str(venv))
    env.pop("KOEN_NO_INSTALL")
    res = run("--dry-run", "--logs-dir", str(tmp_path / "l"), "--output-dir", str(tmp_path / "o"), env=env)
    assert res.returncode == 1
    assert "missing" in res.stderr and "torch" in res.stderr and "pip install" in res.stderr
    assert not marker.exists(), "--dry-run ran pip"
    # The same start without --dry-run does install: the check above can fail.
    res = run("--logs-dir", str(tmp_path / "l"), "--output-dir", str(tmp_path / "o"), env=env)
    assert marker.exists()
    for action in ("--status", "--stop"):
        marker.unlink(missing_ok=True)
        run(action, "--logs-dir", str(tmp_path / "l"), env=env)
        assert not marker.exists()


def test_the_launcher_runs_its_own_checkout_from_inside_another(fake_checkout, tmp_path):
    """Started from inside another checkout, the launcher (and what it starts) runs its own code:
    `python3 -m` would have put the current directory's koen_sllm first."""
    other = tmp_path / "other checkout"
    (other / "koen_sllm" / "launcher").mkdir(parents=True)
    (other / "koen_sllm" / "__init__.py").write_text("")
    (other / "koen_sllm" / "launcher" / "__init__.py").write_text("")
    (other / "koen_sllm" / "launcher" / "__main__.py").write_text("raise SystemExit('wrong checkout')\n")
    res = run("--dry-run", "--output-dir", str(tmp_path / "o"), "--logs-dir", str(tmp_path / "l"),
              script=fake_checkout / "scripts" / "run_h100_dual.sh", env=fake_env(fake_checkout), cwd=other)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wrong checkout" not in res.stderr and "📋 학습 정보" in res.stdout


def test_a_python3_that_has_everything_is_used_as_it_is(fake_checkout):
    """No virtualenv active, no .venv: a python3 on PATH with torch & co (a container image) is used,
    with or without --no-install, and nothing is created or installed."""
    env = fake_env(fake_checkout, FAKE_STEPS="1")
    env.pop("VIRTUAL_ENV", None)
    bin_dir = fake_checkout / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    for extra in (["--no-install"], []):
        if not extra:
            env.pop("KOEN_NO_INSTALL", None)
        res = run("--dry-run", *extra, script=fake_checkout / "scripts" / "run_h100_dual.sh", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "used as is" in res.stdout + res.stderr
        assert not (fake_checkout / ".venv").exists()


# ---------------------------------------------------------------- resume by name


def test_resume_of_a_missing_checkpoint_lists_the_ones_that_exist(tmp_path):
    out = tmp_path / "out"
    for name in ("checkpoint-10", "checkpoint-20", "initial_model"):
        (out / name).mkdir(parents=True)
    (tmp_path / "x.jsonl").write_text("")
    res = run("--dry-run", "--train", "--resume", "checkpoint-999", "--output-dir", str(out),
              "--dataset-path", str(tmp_path), "--logs-dir", str(tmp_path / "l"), cwd=tmp_path)
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "checkpoint-999" in lines[0]
    assert "checkpoint-20, checkpoint-10, initial_model" in lines[0]


def test_the_launcher_process_needs_only_the_standard_library():
    """It runs before any environment exists: with torch (and numpy) unimportable it still parses,
    checks and answers --help, --status and --stop."""
    code = ("import sys; sys.modules.update(torch=None, numpy=None, sentencepiece=None, safetensors=None); "
            "import koen_sllm.launcher.__main__ as m, koen_sllm.launcher.options as o; "
            "o.parse(['--train', '--batch-size', '8', '--global-batch-size', '16']); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
