"""scripts/train.sbatch without SLURM: stub scontrol/srun on PATH, check the per-node command."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
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


# ---------------------------------------------------------------- container mode (Pyxis/Enroot)

SETUP_PYXIS = ROOT / "scripts" / "setup_pyxis.sh"
SINGLENODE = ROOT / "scripts" / "train_pyxis_singlenode.sh"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SRUN_PREFIX = ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]


def launched_line(stdout: str) -> str:
    lines = stdout.splitlines()
    return lines[lines.index("launched with:") + 1]


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "images dir" / "koen sllm.sqsh"
    path.parent.mkdir()
    path.write_bytes(b"hsqs")
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data set"
    folder.mkdir()
    (folder / "mixed_pretraining.jsonl").write_text('{"text": "안녕하세요"}\n')
    return folder


def test_container_dry_run_for_two_nodes(stubs, tmp_path, image, data):
    out = tmp_path / "run out"
    args = ("--batch-size", "8", "--dataset-path", str(data), "--output-dir", str(out))
    plain = run_sbatch(sbatch_env(stubs), *args)
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image)), *args)
    assert plain.returncode == 0 and res.returncode == 0, plain.stderr + res.stderr
    cmd = per_node_command(res.stdout)
    # The same torchrun command as without a container, run by the image's python3.
    assert cmd[0] == "python3" and cmd[1:] == per_node_command(plain.stdout)[1:]
    launched = shlex.split(launched_line(res.stdout))
    mounts = f"{ROOT}:{ROOT},{data}:{data},{out}:{out}"
    assert launched == [*SRUN_PREFIX, f"--container-image={image}", f"--container-mounts={mounts}",
                        f"--container-workdir={ROOT}", "--no-container-entrypoint", *cmd]
    assert ":ro" not in mounts  # checkpoints and logs are written through these mounts
    assert f"'--container-image={image}'" in launched_line(res.stdout)  # the space is quoted
    assert f"container: {image}" in res.stdout and f"mounts: {mounts}" in res.stdout
    assert "NCCL_SOCKET_IFNAME=^docker0,lo" in res.stdout
    assert not out.exists() and not (stubs.parent / "srun.args").exists()  # a dry run writes nothing


def test_container_mode_keeps_nccl_socket_ifname_when_given(stubs, image):
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image), NCCL_SOCKET_IFNAME="ib0"))
    assert res.returncode == 0, res.stderr
    assert "NCCL_SOCKET_IFNAME=ib0" in res.stdout


def test_without_container_nccl_socket_ifname_stays_ncclss_choice(stubs):
    res = run_sbatch(sbatch_env(stubs))
    assert "NCCL_SOCKET_IFNAME=<NCCL default>" in res.stdout and "--container" not in res.stdout


@pytest.mark.parametrize("dry_run", ["1", "0"])
def test_missing_image_file_is_one_line(stubs, tmp_path, dry_run):
    missing = tmp_path / "no such" / "koen.sqsh"
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(missing), KOEN_SBATCH_DRY_RUN=dry_run))
    assert res.returncode == 2
    line = one_error_line(res)
    assert "KOEN_CONTAINER_IMAGE" in line and "scripts/setup_pyxis.sh" in line and f"'{missing}'" in line
    assert not (stubs.parent / "srun.args").exists()


def test_registry_image_is_passed_to_pyxis_as_given(stubs):
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3"))
    assert res.returncode == 0, res.stderr
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in shlex.split(launched_line(res.stdout))


def test_path_that_container_mounts_cannot_express_is_one_line(stubs, tmp_path, image):
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image)), "--output-dir", str(tmp_path / "a,b"))
    assert res.returncode == 2
    assert "cannot express" in one_error_line(res)


def test_extra_mounts_and_srun_options(stubs, image):
    env = sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image), KOEN_CONTAINER_MOUNTS="/fsx:/fsx:ro",
                     KOEN_CONTAINER_ARGS="--no-container-mount-home --container-remap-root")
    launched = shlex.split(launched_line(run_sbatch(env).stdout))
    assert f"--container-mounts={ROOT}:{ROOT},/fsx:/fsx:ro" in launched
    i = launched.index("--no-container-entrypoint")
    assert launched[i + 1:i + 3] == ["--no-container-mount-home", "--container-remap-root"]


def test_recorded_paths_of_a_resumed_run_are_mounted(stubs, tmp_path, image, data):
    out = tmp_path / "run out"
    out.mkdir()
    old_logs = tmp_path / "old logs"
    (out / "run.json").write_text(json.dumps({"config": {"data": {"dataset_path": str(data), "tokenizer_path": None},
                                                         "train": {"logs_dir": str(old_logs)}}}))
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image)), "--output-dir", str(out))
    assert res.returncode == 0, res.stderr
    mounts = next(w for w in shlex.split(launched_line(res.stdout)) if w.startswith("--container-mounts="))
    assert mounts == f"--container-mounts={ROOT}:{ROOT},{data}:{data},{out}:{out},{old_logs}:{old_logs}"


def test_missing_input_path_is_one_line(stubs, tmp_path, image):
    res = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image)), "--dataset-path", str(tmp_path / "no data"))
    assert res.returncode == 2
    line = one_error_line(res)
    assert f"{tmp_path / 'no data'}" in line and "does not exist" in line


def test_container_launch_creates_the_recorded_logs_folder(stubs, tmp_path, image):
    out, old_logs = tmp_path / "run out", tmp_path / "old logs"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {"data": {"dataset_path": str(tmp_path / "gone")},
                                                         "train": {"logs_dir": str(old_logs)}}}))
    env = sbatch_env(stubs, KOEN_SBATCH_DRY_RUN="0", KOEN_CONTAINER_IMAGE=str(image))
    res = run_sbatch(env, "--output-dir", str(out))
    assert res.returncode == 0, res.stderr
    assert old_logs.is_dir()  # mounted, so it must exist; the data that is gone is not mounted
    assert f"--container-mounts={ROOT}:{ROOT},{out}:{out},{old_logs}:{old_logs}" in \
        (tmp_path / "srun.args").read_text().splitlines()


def fake_checkout(tmp_path: Path) -> Path:
    """The files train.sbatch needs in container mode, in a folder of its own."""
    root = tmp_path / "check out"
    for rel in ("scripts/train.sbatch", "scripts/train_h100_dual.py", "koen_sllm/launcher/sbatch_lib.sh",
                "koen_sllm/launcher/setup_env.sh"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    return root


def test_a_symlinked_folder_in_the_checkout_is_mounted_where_it_points(stubs, tmp_path, image):
    root = fake_checkout(tmp_path)
    elsewhere = tmp_path / "fast disk" / "datasets"
    elsewhere.mkdir(parents=True)
    (root / "datasets").symlink_to(elsewhere)
    (root / "outputs").mkdir()
    env = sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image), KOEN_SLLM_ROOT=str(root))
    res = subprocess.run(["bash", str(root / "scripts" / "train.sbatch"), "--dataset-path", "datasets"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"mounts: {root}:{root},{elsewhere}:{elsewhere}\n" in res.stdout


def test_container_launch_execs_srun_with_the_printed_command(stubs, tmp_path, image, data):
    out, logs = tmp_path / "run out", tmp_path / "run logs"
    env = sbatch_env(stubs, KOEN_SBATCH_DRY_RUN="0", KOEN_CONTAINER_IMAGE=str(image))
    res = run_sbatch(env, "--dataset-path", str(data), "--output-dir", str(out), "--logs-dir", str(logs))
    assert res.returncode == 0, res.stderr
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert ["srun", *srun_args] == shlex.split(launched_line(res.stdout))
    assert out.is_dir() and logs.is_dir()  # pyxis mounts need their sources to exist
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_env["NCCL_SOCKET_IFNAME"] == "^docker0,lo" and srun_env["MASTER_ADDR"] == "gpu-a01"
    assert srun_env["KOEN_CONSOLE_LOG"] == str(logs / "training_console.log")


@pytest.mark.parametrize("script", [SBATCH, SETUP_PYXIS, SINGLENODE, ROOT / "koen_sllm" / "launcher" / "sbatch_lib.sh"],
                         ids=lambda p: p.name)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed here")
    res = subprocess.run(["shellcheck", "-x", str(script.relative_to(ROOT))], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- scripts/train_pyxis_singlenode.sh


def test_singlenode_dry_run(stubs, image, data):
    env = sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image), GPUS_PER_NODE="4")
    res = subprocess.run(["bash", str(SINGLENODE), "gpu-a01", "--batch-size", "8", "--dataset-path", str(data)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    launched = shlex.split(launched_line(res.stdout))
    assert launched[:10] == ["srun", "--job-name=koen-sllm", "--nodes", "1", "--ntasks", "1", "--gpus-per-node", "4",
                             "--kill-on-bad-exit=1", "--nodelist"] and launched[10] == "gpu-a01"
    assert launched[11:15] == [f"--container-image={image}", f"--container-mounts={ROOT}:{ROOT},{data}:{data}",
                               f"--container-workdir={ROOT}", "--no-container-entrypoint"]
    assert launched[15:] == ["python3", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                             str(TRAINER), "--train", "--batch-size", "8", "--dataset-path", str(data), "--resume", "auto"]
    # The trainer options are the ones the batch script passes.
    batch = run_sbatch(sbatch_env(stubs, KOEN_CONTAINER_IMAGE=str(image)), "--batch-size", "8", "--dataset-path", str(data))
    cmd = per_node_command(batch.stdout)
    assert cmd[cmd.index(str(TRAINER)):] == launched[launched.index(str(TRAINER)):]
    assert not (stubs.parent / "srun.args").exists()


def test_singlenode_launch_execs_srun_with_the_printed_command(stubs, tmp_path, image):
    out, logs = tmp_path / "run out", tmp_path / "run logs"
    env = sbatch_env(stubs, KOEN_SBATCH_DRY_RUN="0", KOEN_CONTAINER_IMAGE=str(image))
    res = subprocess.run(["bash", str(SINGLENODE), "--test", "--output-dir", str(out), "--logs-dir", str(logs)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert ["srun", *srun_args] == shlex.split(launched_line(res.stdout))
    assert out.is_dir() and logs.is_dir()
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_env["KOEN_CONSOLE_LOG"] == str(logs / "training_console.log")
    assert srun_env["NCCL_SOCKET_IFNAME"] == "^docker0,lo"


def test_singlenode_default_image_follows_cuda_version(stubs, tmp_path):
    root = fake_checkout(tmp_path)
    (root / "docker").mkdir()
    shutil.copy2(DOCKERFILE, root / "docker" / "Dockerfile")
    env = sbatch_env(stubs, KOEN_SLLM_ROOT=str(root))
    default = root / f"koen-sllm-cuda{dockerfile_arg('CUDA_VERSION')}.sqsh"
    res = subprocess.run(["bash", str(SINGLENODE)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and f"KOEN_CONTAINER_IMAGE '{default}' does not exist" in one_error_line(res)
    (root / "koen-sllm-cuda12.9.sqsh").write_bytes(b"hsqs")
    env["CUDA_VERSION"] = "12.9"
    res = subprocess.run(["bash", str(SINGLENODE)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"--container-image={root}/koen-sllm-cuda12.9.sqsh" in shlex.split(launched_line(res.stdout))


# ---------------------------------------------------------------- scripts/setup_pyxis.sh


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)


def tool_path(tmp_path: Path, *stubs: tuple[str, str]) -> str:
    """A PATH with only what setup_pyxis.sh needs besides docker/enroot, plus the given stubs."""
    bindir = tmp_path / "tools"
    bindir.mkdir()
    for tool in ("bash", "sed", "grep", "realpath", "head", "dirname", "mv", "rm"):
        (bindir / tool).symlink_to(shutil.which(tool))
    for name, body in stubs:
        (bindir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bindir / name).chmod(0o755)
    return str(bindir)


def run_setup(tmp_path: Path, *args: str, path: str | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VERSION", "TORCH_VERSION", "BASE_FLAVOR")}
    env["PATH"] = path or tool_path(tmp_path)
    env.update(env_extra)
    return subprocess.run(["bash", str(SETUP_PYXIS), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_setup_pyxis_dry_run_prints_build_import_and_rename(tmp_path):
    res = run_setup(tmp_path, "--dry-run")
    assert res.returncode == 0, res.stderr
    cuda, torch_v = dockerfile_arg("CUDA_VERSION"), dockerfile_arg("TORCH_VERSION")
    tag, out = f"koen-sllm:{torch_v}-cuda{cuda}", ROOT / f"koen-sllm-cuda{cuda}.sqsh"
    lines = res.stdout.splitlines()
    assert [shlex.split(line) for line in lines[1:]] == [
        ["docker", "build", "-f", str(DOCKERFILE), "--build-arg", f"CUDA_VERSION={cuda}",
         "--build-arg", f"TORCH_VERSION={torch_v}", "--build-arg", "BASE_FLAVOR=runtime", "-t", tag, str(ROOT)],
        ["enroot", "import", "--output", f"{out}.partial", f"dockerd://{tag}"],
        ["mv", "-f", "--", f"{out}.partial", str(out)],
    ]


def test_setup_pyxis_cuda_switch_target_and_quoted_output(tmp_path):
    out = tmp_path / "shared images" / "koen.sqsh"
    res = run_setup(tmp_path, "--dry-run", "--target", "deepspeed", "--output", str(out), CUDA_VERSION="13.0")
    assert res.returncode == 0, res.stderr
    build, imp, _ = (shlex.split(line) for line in res.stdout.splitlines()[1:])
    assert "CUDA_VERSION=13.0" in build and build[build.index("--target") + 1] == "deepspeed"
    assert build[build.index("-t") + 1] == f"koen-sllm-deepspeed:{dockerfile_arg('TORCH_VERSION')}-cuda13.0"
    assert imp[3] == f"{out}.partial" and f"'{out}.partial'" in res.stdout


@pytest.mark.parametrize("args, env, code, needle", [
    ((), {}, 1, "docker not found"),
    (("--dry-run",), {"CUDA_VERSION": "12"}, 2, "CUDA_VERSION must look like 12.8"),
    (("--dry-run", "--target", "gpu"), {}, 2, "not a stage of docker/Dockerfile"),
    (("--push",), {}, 2, "unknown option '--push'"),
])
def test_setup_pyxis_errors_are_one_line(tmp_path, args, env, code, needle):
    res = run_setup(tmp_path, *args, **env)
    assert res.returncode == code
    assert needle in one_error_line(res)


def test_setup_pyxis_builds_imports_and_renames(tmp_path):
    log = tmp_path / "calls.log"
    path = tool_path(tmp_path,
                     ("docker", f'printf "docker %s\\n" "$*" >> "{log}"\n'),
                     ("enroot", f'printf "enroot %s\\n" "$*" >> "{log}"\n[[ "$2" == --output ]] && printf sqsh > "$3"\n'))
    out = tmp_path / "out dir" / "koen.sqsh"
    out.parent.mkdir()
    res = run_setup(tmp_path, "--output", str(out), path=path)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["docker", "build"], ["enroot", "import"]]
    assert out.read_text() == "sqsh" and not Path(f"{out}.partial").exists()
    assert "KOEN_CONTAINER_IMAGE=" in res.stdout


def test_setup_pyxis_failed_build_leaves_no_image(tmp_path):
    path = tool_path(tmp_path, ("docker", "exit 1\n"), ("enroot", "exit 0\n"))
    out = tmp_path / "koen.sqsh"
    res = run_setup(tmp_path, "--output", str(out), path=path)
    assert res.returncode == 1 and "docker build failed" in one_error_line(res)
    assert not out.exists()
