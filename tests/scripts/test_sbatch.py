"""scripts/train.sbatch without SLURM: stub scontrol/srun on PATH, check the per-node command."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from koen_sllm.config import repo_root

ROOT = repo_root()
SBATCH = ROOT / "scripts" / "train.sbatch"
TRAINER = ROOT / "scripts" / "train_h100_dual.py"


@pytest.fixture
def stubs(tmp_path):
    """A PATH folder with scontrol (expands the node list) and srun (records its argv and env)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 9\n'
        '[[ "$3" == "gpu-a[01-02]" ]] && { echo gpu-a01; echo gpu-a02; exit 0; }\necho "$3"\n')
    (bindir / "srun").write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{tmp_path}/srun.args"\n'
        f'env > "{tmp_path}/srun.env"\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir


def sbatch_env(stubs: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "KOEN_")) and k not in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")}
    env["PATH"] = f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(KOEN_SBATCH_DRY_RUN="1", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_ID="4242")
    env.update(extra)
    return env


def run_sbatch(env: dict, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def per_node_command(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return shlex.split(lines[lines.index("per-node command:") + 1])


def test_dry_run_prints_the_per_node_torchrun_command(stubs):
    res = run_sbatch(sbatch_env(stubs), "--batch-size", "8", "--output-dir", "/data/run 1")
    assert res.returncode == 0, res.stderr
    cmd = per_node_command(res.stdout)
    assert cmd[1:] == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-a01:29500", "--rdzv_id", "4242",
        str(TRAINER), "--train", "--batch-size", "8", "--output-dir", "/data/run 1", "--resume", "auto",
    ]
    assert Path(cmd[0]).name.startswith("python")
    launched = shlex.split(res.stdout.splitlines()[res.stdout.splitlines().index("launched with:") + 1])
    assert launched[:8] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert launched[8:] == cmd
    assert "2 node(s) x 8 GPU(s) = 16 processes" in res.stdout and "nodes: gpu-a01 gpu-a02" in res.stdout
    assert not (stubs.parent / "srun.args").exists()  # a dry run launches nothing


def test_explicit_mode_and_resume_are_kept(stubs):
    res = run_sbatch(sbatch_env(stubs), "--test", "--resume", "none")
    cmd = per_node_command(res.stdout)
    assert cmd[-3:] == ["--test", "--resume", "none"] and "--train" not in cmd


def test_environment_overrides(stubs):
    env = sbatch_env(stubs, GPUS_PER_NODE="4", MASTER_PORT="31000", NCCL_DEBUG="INFO", NCCL_SOCKET_IFNAME="ib0",
                     SLURM_NNODES="3", SLURM_JOB_NODELIST="node7")
    res = run_sbatch(env, "--train")
    assert res.returncode == 0, res.stderr
    cmd = per_node_command(res.stdout)
    assert cmd[cmd.index("--nnodes") + 1] == "3" and cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "node7:31000"
    assert "NCCL_DEBUG=INFO NCCL_IB_DISABLE=0 NCCL_SOCKET_IFNAME=ib0" in res.stdout


def test_gpus_per_node_follows_slurm_allocation(stubs):
    res = run_sbatch(sbatch_env(stubs, SLURM_GPUS_ON_NODE="2"))
    cmd = per_node_command(res.stdout)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"


@pytest.mark.parametrize("drop, needle", [("SLURM_NNODES", "SLURM_NNODES is not set"),
                                          ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST is not set")])
def test_missing_slurm_variables_are_one_line_errors(stubs, drop, needle):
    env = sbatch_env(stubs)
    env.pop(drop)
    res = run_sbatch(env)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]


def test_bad_gpus_per_node_is_rejected(stubs):
    res = run_sbatch(sbatch_env(stubs, GPUS_PER_NODE="eight"))
    assert res.returncode == 2 and "GPUS_PER_NODE needs a positive integer, got 'eight'" in res.stderr


def test_real_launch_execs_srun_with_the_printed_command(stubs, tmp_path):
    logs = tmp_path / "slurm logs"
    logs.mkdir()
    (logs / "training_console.log").write_text("earlier run\n")
    env = sbatch_env(stubs, KOEN_SBATCH_DRY_RUN="0", NCCL_IB_DISABLE="1")
    res = run_sbatch(env, "--train", "--logs-dir", str(logs))
    assert res.returncode == 0, res.stderr
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    printed = shlex.split(res.stdout.splitlines()[res.stdout.splitlines().index("launched with:") + 1])
    assert ["srun", *srun_args] == printed
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_env["MASTER_ADDR"] == "gpu-a01" and srun_env["MASTER_PORT"] == "29500"
    assert srun_env["NCCL_IB_DISABLE"] == "1" and srun_env["NCCL_DEBUG"] == "WARN"
    assert srun_env["KOEN_CONSOLE_LOG"] == str(logs / "training_console.log")
    assert (logs / "training_console.log.1").read_text() == "earlier run\n"  # rotated, not overwritten
    assert re.search(r"^\[[\d: -]+\] \[launcher\] SLURM job 4242: srun ", (logs / "training_console.log").read_text())


def test_header_defaults():
    text = SBATCH.read_text()
    for directive in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1", "--job-name=koen-sllm",
                      "--output=logs/"):
        assert re.search(rf"^#SBATCH {re.escape(directive)}", text, re.M), directive
