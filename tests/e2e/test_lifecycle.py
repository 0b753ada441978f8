"""A run's life through ./run_h100_dual.sh, end to end on CPU: start, stop, resume, kill, refuse.

Each test replays a reported sequence with the real launcher, torchrun and
trainer (gloo processes, a tiny model, vocabulary 400, one generated corpus
shared by the whole module so the tokenizer and token files are prepared once).
Every folder lives under tmp_path; the repository's own outputs/ and logs/ are
never written. Every process a test starts carries a marker in its environment,
so teardown can kill exactly those (the workers run in sessions of their own,
out of reach of torchrun's process group).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from e2e_support import cpu_env, write_corpus
from koen_sllm.config import repo_root

pytestmark = pytest.mark.slow

try:  # the trainer pulls in every module of the package
    import koen_sllm.trainer  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the checkout
    pytest.skip(f"the trainer cannot be imported ({type(exc).__name__}: {exc})", allow_module_level=True)

ROOT = repo_root()
LAUNCHER = ROOT / "run_h100_dual.sh"
TRAINER = ROOT / "scripts" / "train_h100_dual.py"
TINY = ["--vocab-size", "400", "--num-proc", "1"]
# A run that would take hours: it only ends when a test ends it.
LONG = ["--train", "--batch-size", "8", "--max-steps", "100000", "--save-steps", "100000", "--no-save-initial"]
PROGRESS = re.compile(r"step (\d+)/(\d+) \| loss ")
MARK = "LIFECYCLE_TEST_TOKEN"  # in the environment of every process a test starts, workers included
STILL_RUNNING = "still running in the background"


# ---------------------------------------------------------------- /proc helpers (independent of the launcher's)


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw.rpartition(b")")[2].decode("ascii", "replace").split()


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(name))
    return sorted(out)


def marked(token: str) -> list[int]:
    entry = f"{MARK}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if entry in env.split(b"\0") and alive(int(name)):
            found.append(int(name))
    return found


def describe(pids: list[int]) -> str:
    """State, parent and kernel wait channel of each process: what a hung worker was doing."""
    out = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            out.append(f"{pid}: gone")
            continue
        keep = [ln for ln in status.splitlines() if ln.startswith(("State:", "PPid:", "SigBlk:", "SigCgt:"))]
        out.append(f"{pid}: {' | '.join(keep)} | wchan {wchan}")
    return "\n".join(out)


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------- files


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time: any write shows."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def pid_record(logs: Path) -> dict:
    return json.loads((logs / "training.pid").read_text())


def latest_step(out: Path) -> int:
    name = (out / "latest").read_text().strip()
    assert name.startswith("checkpoint-"), name
    return int(name.removeprefix("checkpoint-"))


def resolved_config(stdout: str) -> dict:
    """The JSON the launcher's --dry-run prints after 'resolved configuration:'."""
    _, sep, rest = stdout.partition("resolved configuration:")
    assert sep, stdout[-3000:]
    return json.loads(rest)


def dry_run_command(stdout: str) -> list[str]:
    """The trainer's command line a --dry-run prints (the line after 'command:'), as words."""
    lines = stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.rstrip().endswith("command:"))
    return shlex.split(lines[at + 1])


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def show(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-3000:]}"


# ---------------------------------------------------------------- the launcher, with its processes accounted for


class Launcher:
    """Runs ./run_h100_dual.sh in a test's folder; cleanup() kills whatever the test left running."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.token = uuid.uuid4().hex
        self.torchruns: list[tuple[int, int]] = []  # (pid, start time): never signal a reused PID

    def env(self, **extra: str) -> dict[str, str]:
        env = cpu_env()
        # A launcher or trainer around the test session must not leak its run id, PID file or limits in.
        for name in list(env):
            if (name.startswith(("KOEN_", "TORCHELASTIC_", "MASTER_")) and name != "KOEN_NO_INSTALL") \
                    or name == "CONDA_PREFIX":
                del env[name]
        env[MARK] = self.token
        env.update(extra)
        return env

    def __call__(self, *args, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", str(LAUNCHER), *map(str, args)], capture_output=True, text=True,
                             env=self.env(**env), cwd=self.cwd, timeout=timeout)
        for pid in re.findall(r"PID: (\d+)$", res.stdout, re.M):  # "🔢 프로세스 ID / PID: N" of a started run
            self.track(int(pid))
        return res

    def track(self, pid: int) -> None:
        st = start_time(pid)
        if st is not None:
            self.torchruns.append((pid, st))

    def trainer(self, *args, timeout: float = 180) -> subprocess.CompletedProcess:
        """The trainer under plain torchrun, past every check of the launcher."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(TRAINER), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(), cwd=self.cwd, timeout=timeout)

    def cleanup(self) -> None:
        for pid, st in self.torchruns:
            if start_time(pid) == st and alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)  # torchrun leads a session (and process group) of its own
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in marked(self.token):  # workers, and anything else the test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while marked(self.token) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def launch(tmp_path):
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.cleanup()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One small Korean/English corpus for the module; its prepared tokens are cached beside it."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs=240, seed=7)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """A finished training run with checkpoints (6, 9, 12), a learning rate other than the default,
    and its record; tests that use it only read it and check that it stays as it is."""
    base = tmp_path_factory.mktemp("finished")
    out, logs = base / "out", base / "logs"
    launcher = Launcher(base)
    try:
        res = launcher("--train", "--foreground", "--max-steps", "12", "--save-steps", "3", "--learning-rate",
                       "1e-3", "--batch-size", "8", "--num-gpus", "1", *TINY, "--dataset-path", corpus,
                       "--output-dir", out, "--logs-dir", logs)
    finally:
        launcher.cleanup()
    assert res.returncode == 0, show(res)
    assert latest_step(out) == 12
    return out, logs


def folders(corpus: Path, out: Path, logs: Path) -> list[str]:
    return ["--dataset-path", str(corpus), "--output-dir", str(out), "--logs-dir", str(logs)]


# ---------------------------------------------------------------- the tests


def test_readme_sequence_stop_then_plain_train_resumes(launch, corpus, tmp_path):
    # Every trainer option is a launcher option; the dry run writes nothing.
    dry = launch("--dry-run", "--train", "--global-batch-size", "16", *TINY,
                 *folders(corpus, tmp_path / "dry-out", tmp_path / "dry-logs"))
    assert dry.returncode == 0, show(dry)
    assert option(dry_run_command(dry.stdout), "--global-batch-size") == "16", dry.stdout[-3000:]
    assert not (tmp_path / "dry-out").exists() and not (tmp_path / "dry-logs").exists()

    out, logs = tmp_path / "out", tmp_path / "logs"
    first = launch(*LONG, *TINY, *folders(corpus, out, logs))
    assert first.returncode == 0, show(first)
    assert STILL_RUNNING in first.stdout and PROGRESS.search(first.stdout), show(first)

    stop = launch("--stop", "--logs-dir", logs, KOEN_STOP_TIMEOUT="180")
    assert stop.returncode == 0, show(stop)
    assert "the run has ended" in stop.stdout
    stopped = latest_step(out)

    # Only where the run lives and its data: batch size, vocabulary and schedule come from run.json.
    again = launch("--train", *folders(corpus, out, logs))
    assert again.returncode == 0, show(again)
    assert "resuming the run recorded in" in again.stdout, show(again)
    steps = [(int(s), int(m)) for s, m in PROGRESS.findall(again.stdout)]
    assert steps, show(again)
    assert steps[0][0] > stopped and steps[0][1] == 100000, (steps, stopped)
    assert "batch size: 8 (" in again.stdout and "(tokenizer 400)" in again.stdout, show(again)
    assert "❌" not in again.stdout + again.stderr, show(again)
    assert STILL_RUNNING in again.stdout

    stop = launch("--stop", "--logs-dir", logs, KOEN_STOP_TIMEOUT="180")
    assert stop.returncode == 0, show(stop)
    assert latest_step(out) > stopped


def test_resume_never_silently_changes_the_schedule(launch, corpus, finished_run):
    out, logs = finished_run
    dry = launch("--dry-run", "--train", "--batch-size", "8", "--num-gpus", "1", *folders(corpus, out, logs))
    assert dry.returncode == 0, show(dry)
    cfg = resolved_config(dry.stdout)
    assert cfg["train"]["max_steps"] == 12, cfg["train"]  # the recorded schedule, not the training default
    assert cfg["optim"]["learning_rate"] == pytest.approx(1e-3), cfg["optim"]

    before_out, before_logs = snapshot(out), snapshot(logs)
    refused = launch("--train", "--learning-rate", "5e-4", "--num-gpus", "1", *folders(corpus, out, logs))
    assert refused.returncode == 2, show(refused)
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, show(refused)
    assert "would change the run" in lines[0] and "--learning-rate" in lines[0] and "--output-dir" in lines[0]
    assert snapshot(out) == before_out  # nothing started, nothing written
    assert snapshot(logs) == before_logs


def test_kill_9_of_the_process_group_ends_every_worker(launch, corpus, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = [*LONG, "--num-gpus", "2", *TINY, *folders(corpus, out, logs)]
    first = launch(*args)
    assert first.returncode == 0 and STILL_RUNNING in first.stdout, show(first)
    torchrun = pid_record(logs)["pid"]
    workers = children(torchrun)
    assert len(workers) == 2, workers
    assert os.getpgid(torchrun) == torchrun  # the run leads a process group of its own...
    assert all(os.getpgid(w) != torchrun for w in workers)  # ...which torchrun's workers leave

    os.killpg(torchrun, signal.SIGKILL)
    try:
        wait_for(lambda: not any(alive(w) for w in workers), 120, "the workers to end after kill -9 of torchrun")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(workers)}\n--- console\n{tail(logs / 'training_console.log')}")
    assert (out / "latest").exists()  # the workers saved before they went

    status = launch("--status", "--logs-dir", logs)
    assert status.returncode == 3, show(status)
    assert "removed a stale PID file" in status.stdout, show(status)
    assert not (logs / "training.pid").exists()

    # No orphan holds the folders' locks: the same run starts again at once.
    again = launch(*args)
    assert again.returncode == 0 and STILL_RUNNING in again.stdout, show(again)
    assert "resuming the run recorded in" in again.stdout  # from the checkpoint the workers saved


def test_test_mode_never_overwrites_a_training_run(launch, corpus, finished_run, tmp_path):
    out, _ = finished_run
    before, latest = snapshot(out), (out / "latest").read_text()
    refused = launch("--test", "--foreground", "--max-steps", "2", "--num-gpus", "1", *TINY,
                     *folders(corpus, out, tmp_path / "test-logs"))
    assert refused.returncode == 2, show(refused)
    assert "holds a training run" in refused.stderr and str(out) in refused.stderr, show(refused)
    assert (out / "latest").read_text() == latest
    assert snapshot(out) == before

    # Without folders a test run has its own, inside the checkout: only a dry run may look there.
    repo_folders = [ROOT / "outputs" / "test", ROOT / "logs" / "test"]
    existed = [p.exists() for p in repo_folders]
    dry = launch("--dry-run", "--test", "--num-gpus", "1", *TINY, "--dataset-path", corpus)
    assert dry.returncode == 0, show(dry)
    cfg = resolved_config(dry.stdout)
    assert Path(cfg["ckpt"]["output_dir"]).parts[-2:] == ("outputs", "test"), cfg["ckpt"]
    assert Path(cfg["train"]["logs_dir"]).parts[-2:] == ("logs", "test"), cfg["train"]
    command = dry_run_command(dry.stdout)
    assert Path(option(command, "--output-dir")).parts[-2:] == ("outputs", "test"), command
    assert Path(option(command, "--logs-dir")).parts[-2:] == ("logs", "test"), command
    assert [p.exists() for p in repo_folders] == existed


def test_two_runs_cannot_share_one_output_folder(launch, corpus, tmp_path):
    out = tmp_path / "out"
    logs_a, logs_b, logs_c = tmp_path / "logs-a", tmp_path / "logs-b", tmp_path / "logs-c"
    # A saves its initial model, then nothing until it is stopped: its folder must stay exactly so.
    args = ["--train", "--batch-size", "8", "--max-steps", "100000", "--save-steps", "100000", *TINY,
            "--dataset-path", corpus, "--output-dir", out]
    a = launch(*args, "--num-gpus", "1", "--logs-dir", logs_a)
    assert a.returncode == 0 and STILL_RUNNING in a.stdout, show(a)
    torchrun = pid_record(logs_a)["pid"]
    (rank0,) = children(torchrun)
    before = snapshot(out)
    assert "initial_model" in before

    b = launch(*args, "--num-gpus", "1", "--logs-dir", logs_b)
    assert b.returncode == 1, show(b)
    assert "in use by another run" in b.stderr and f"PID {rank0}" in b.stderr, show(b)
    assert not (logs_b / "training.pid").exists()

    direct = launch.trainer(*args, "--logs-dir", logs_c)
    both = direct.stdout + direct.stderr
    assert direct.returncode != 0 and "in use by another run" in both, both[-3000:]

    assert snapshot(out) == before
    assert alive(torchrun) and alive(rank0) and pid_record(logs_a)["pid"] == torchrun


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_the_package_is_not_reported_as_started(launch, corpus, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = launch("--train", "--deepspeed", "--num-gpus", "2", *TINY, *folders(corpus, out, logs))
    assert res.returncode == 2, show(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and "pip install" in lines[-1], show(res)
    both = res.stdout + res.stderr
    assert "Traceback" not in both and "ChildFailedError" not in both, show(res)
    assert STILL_RUNNING not in both and "already finished" not in both
    # Refused before the start, or failed in the run: either way torchrun's report stays out of the console.
    console = logs / "training_console.log"
    assert not console.exists() or "ChildFailedError" not in console.read_text()
    assert not (logs / "training.pid").exists()


@pytest.fixture(scope="module")
def failed_start(tmp_path_factory, corpus):
    """A background start whose run fails while preparing (a tokenizer that is not there), after the
    launcher's checks passed: the launcher must see the failure and report the trainer's reason."""
    base = tmp_path_factory.mktemp("failed")
    launcher = Launcher(base)
    try:
        res = launcher("--train", "--tokenizer-path", base / "no-such-tokenizer", "--num-gpus", "1", *TINY,
                       *folders(corpus, base / "out", base / "logs"))
    finally:
        launcher.cleanup()
    return res, base / "logs"


def test_a_run_that_dies_before_its_first_step_is_not_reported_as_started(failed_start):
    res, logs = failed_start
    assert res.returncode == 1, show(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and "the run failed before its first step (exit 1): " in lines[-1], show(res)
    assert "no SentencePiece model at" in lines[-1], show(res)  # the trainer's own reason
    both = res.stdout + res.stderr
    assert "Traceback" not in both and "ChildFailedError" not in both, show(res)
    assert STILL_RUNNING not in both and "already finished" not in both
    assert "ChildFailedError" not in (logs / "training_console.log").read_text()
    assert not (logs / "training.pid").exists()


def test_the_reason_shown_is_the_trainers_line_whichever_rank_wrote_it_last(tmp_path, capsys):
    # With several processes every rank may log the same error; which line reaches the console last
    # is a race, so the launcher's choice is checked on both orders without starting a run.
    from koen_sllm.launcher import pidfile, start
    from koen_sllm.launcher.files import JobFiles

    files = JobFiles(tmp_path)
    launch = start.Launch(command=[], env={}, files=files, run_id="r", mode="train", output_dir=tmp_path / "out",
                          launcher="./run_h100_dual.sh")
    record = pidfile.RunProcess(pid=2**22 + 1, start_time=1, boot_id="", cmdline=[], run_id="r")
    rank0 = "[2026-12-06 07:29:34] ❌ TokenizerError: no SentencePiece model at /x; pass a folder"
    rank1 = "[rank1] ERROR ❌ TokenizerError: no SentencePiece model at /x; pass a folder"
    agent = "❌ 학습 프로세스 실패 / worker rank 1 ended with exit code 1 (torchrun's report: /d)"
    for seen in ([rank1, rank0, agent], [rank0, rank1, agent]):
        assert start._ended_early(launch, record, 1, seen) == 1
        err = capsys.readouterr().err
        assert "(exit 1): TokenizerError: no SentencePiece model at /x; pass a folder (log:" in err, err


def test_a_normal_finish_leaves_no_pid_file(launch, corpus, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = launch("--test", "--max-steps", "3", "--num-gpus", "1", *TINY, *folders(corpus, out, logs))
    assert res.returncode == 0, show(res)
    # The launcher returned while the run was still going: the run itself must clean up after it.
    assert STILL_RUNNING in res.stdout, show(res)
    reports: list[str] = []

    def ended() -> bool:
        status = launch("--status", "--logs-dir", logs, timeout=60)
        reports.append(status.stdout + status.stderr)
        assert status.returncode in (0, 3), show(status)
        return status.returncode == 3

    wait_for(ended, 120, "the run to finish")
    assert not (logs / "training.pid").exists()
    assert not any("stale" in r for r in reports), reports[-1]
    assert "Training complete" in (logs / "training_console.log").read_text()
