"""scripts/setup_env.sh: which Python it picks, the one-line check, installing and refusing to install.

Missing packages are simulated with a stand-in python (a small wrapper around
the real one) whose PYTHONPATH holds a module that fails to import, and pip is
simulated by that wrapper, so nothing here touches the network.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from koen_sllm.config import repo_root

ROOT = repo_root()
SETUP = ROOT / "scripts" / "setup_env.sh"
REAL_PY = Path(sys.executable)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "KOEN_PYTHON", "KOEN_NO_INSTALL", "PYTHONPATH", "KOEN_PIP_ARGS")}
    env.update(extra)
    return env


def setup(extras: str = "", env: dict | None = None, setup_file: Path = SETUP) -> subprocess.CompletedProcess:
    script = f'source "$0" && koen_setup_env {extras} && echo "KOEN_PYTHON=$KOEN_PYTHON"'
    return subprocess.run(["bash", "-c", script, str(setup_file)], capture_output=True, text=True,
                          env=env, cwd="/", timeout=120)


def fake_env(tmp_path: Path, shadow: dict[str, str] | None = None) -> Path:
    """A virtualenv-like folder whose bin/python runs the real interpreter with
    PYTHONPATH=<shadow dir>; `-m pip ...` is recorded in pip.log and empties the shadow."""
    venv = tmp_path / "fake venv"
    (venv / "bin").mkdir(parents=True)
    shadow_dir = tmp_path / "shadow"
    shadow_dir.mkdir()
    for name, source in (shadow or {}).items():
        (shadow_dir / f"{name}.py").write_text(source)
    py = venv / "bin" / "python"
    py.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [[ "$1 $2" == "-m pip" ]]; then
          printf '%s\\n' "$@" > '{tmp_path}/pip.log'
          rm -f '{shadow_dir}'/*.py
          exit "${{FAKE_PIP_RC:-0}}"
        fi
        PYTHONPATH='{shadow_dir}' exec '{REAL_PY}' "$@"
        """))
    py.chmod(0o755)
    return venv


BROKEN = "raise ImportError('simulated: not installed')\n"


def test_active_venv_passes_with_one_line():
    if sys.prefix == sys.base_prefix:
        pytest.skip("pytest is not running inside a virtualenv")
    res = setup("dev", env=clean_env(VIRTUAL_ENV=sys.prefix, KOEN_NO_INSTALL="1"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("✅") and "torch" in lines[0]
    assert lines[1] == f"KOEN_PYTHON={Path(sys.prefix) / 'bin' / 'python'}"
    assert res.stderr == ""


def test_conda_prefix_is_used_when_no_venv_is_active(tmp_path):
    venv = fake_env(tmp_path)
    res = setup(env=clean_env(CONDA_PREFIX=str(venv), KOEN_NO_INSTALL="1"))
    assert res.returncode == 0, res.stderr
    assert f"KOEN_PYTHON={venv}/bin/python" in res.stdout


def test_missing_package_with_no_install_names_it_and_the_command(tmp_path):
    venv = fake_env(tmp_path, {"sentencepiece": BROKEN})
    res = setup("dev", env=clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1"))
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "sentencepiece" in lines[0] and "torch" not in lines[0].split("install:")[0]
    assert f"install: '{venv}/bin/python' -m pip install -e '{ROOT}[dev]'" in lines[0]
    assert not (tmp_path / "pip.log").exists()
    assert "KOEN_PYTHON=" not in res.stdout


def test_missing_package_is_installed_into_the_chosen_env(tmp_path):
    venv = fake_env(tmp_path, {"safetensors": BROKEN, "tqdm": BROKEN})
    res = setup("dev", env=clean_env(VIRTUAL_ENV=str(venv), KOEN_PIP_ARGS="--index-url http://mirror.invalid/simple"))
    assert res.returncode == 0, res.stderr
    missing = next(line for line in res.stderr.splitlines() if "missing:" in line)
    assert "safetensors" in missing and "tqdm" in missing and "torch" not in missing
    pip_args = (tmp_path / "pip.log").read_text().splitlines()
    assert pip_args == ["-m", "pip", "install", "--index-url", "http://mirror.invalid/simple", "-e", f"{ROOT}[dev]"]
    assert f"KOEN_PYTHON={venv}/bin/python" in res.stdout


def test_failed_install_is_one_clear_error(tmp_path):
    venv = fake_env(tmp_path, {"numpy": BROKEN})
    res = setup(env=clean_env(VIRTUAL_ENV=str(venv), FAKE_PIP_RC="1"))
    assert res.returncode == 1
    assert "install failed" in res.stderr.splitlines()[-1]


def test_package_from_another_checkout_counts_as_missing(tmp_path):
    venv = fake_env(tmp_path)
    other = tmp_path / "shadow" / "koen_sllm"
    other.mkdir()
    (other / "__init__.py").write_text("")
    res = setup(env=clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1"))
    assert res.returncode == 1
    assert f"koen_sllm(imports-from:{tmp_path / 'shadow'})" in res.stderr


def test_torch_outside_the_supported_range_counts_as_missing(tmp_path):
    venv = fake_env(tmp_path)
    # A pyproject whose torch range excludes the installed one, in a copy of the checkout layout.
    repo = _mini_repo(tmp_path)
    (repo / "pyproject.toml").write_text('[project]\ndependencies = [\n  "torch>=99.0",  # a comment\n  "numpy",\n]\n')
    env = clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1")
    env["PYTHONPATH"] = str(repo)
    (venv / "bin" / "python").write_text(
        f"#!/usr/bin/env bash\nPYTHONPATH='{repo}' exec '{REAL_PY}' \"$@\"\n")
    res = setup(env=env, setup_file=repo / "scripts" / "setup_env.sh")
    assert res.returncode == 1
    assert "torch>=99.0(found:" in res.stderr


def _mini_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "checkout with space"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, repo / "scripts" / "setup_env.sh")
    (repo / "pyproject.toml").write_text('[project]\ndependencies = ["numpy"]\n')
    (repo / "koen_sllm").mkdir()
    (repo / "koen_sllm" / "__init__.py").write_text("")
    return repo


def _stub_python3(tmp_path: Path, body: str) -> Path:
    bindir = tmp_path / "stub bin"
    bindir.mkdir()
    stub = bindir / "python3"
    stub.write_text("#!/usr/bin/env bash\n" + body)
    stub.chmod(0o755)
    return bindir


def test_repo_venv_is_created_when_no_env_is_active(tmp_path):
    repo = _mini_repo(tmp_path)
    # python3 -m venv DIR -> DIR/bin/python wraps the real interpreter with the mini repo importable.
    bindir = _stub_python3(tmp_path, textwrap.dedent(f"""\
        [[ "$1 $2" == "-m venv" ]] || exit 9
        mkdir -p "$3/bin"
        printf '#!/usr/bin/env bash\\nPYTHONPATH=%q exec %q "$@"\\n' '{repo}' '{REAL_PY}' > "$3/bin/python"
        chmod +x "$3/bin/python"
        """))
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    res = setup(env=env, setup_file=repo / "scripts" / "setup_env.sh")
    assert res.returncode == 0, res.stderr
    assert "creating" in res.stderr
    assert f"KOEN_PYTHON={repo}/.venv/bin/python" in res.stdout
    # Second time: the venv exists, nothing is created.
    res = setup(env=env, setup_file=repo / "scripts" / "setup_env.sh")
    assert res.returncode == 0 and "creating" not in res.stderr


def test_missing_venv_module_gives_the_apt_hint(tmp_path):
    repo = _mini_repo(tmp_path)
    bindir = _stub_python3(tmp_path, 'echo "Error: ensurepip is not available" >&2; exit 1\n')
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    res = setup(env=env, setup_file=repo / "scripts" / "setup_env.sh")
    assert res.returncode == 1
    assert "sudo apt install python3-venv" in res.stderr.splitlines()[-1]
    assert not (repo / ".venv").exists()


def test_no_install_does_not_create_a_venv(tmp_path):
    repo = _mini_repo(tmp_path)
    bindir = _stub_python3(tmp_path, "exit 9\n")
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", KOEN_NO_INSTALL="1")
    res = setup(env=env, setup_file=repo / "scripts" / "setup_env.sh")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "no Python environment" in lines[0] and "python3 -m venv" in lines[0]
    assert not (repo / ".venv").exists()


def test_unknown_extra_is_an_error():
    if sys.prefix == sys.base_prefix:
        pytest.skip("pytest is not running inside a virtualenv")
    res = setup("nosuchextra", env=clean_env(VIRTUAL_ENV=sys.prefix))
    assert res.returncode == 1 and "unknown extra 'nosuchextra'" in res.stderr
