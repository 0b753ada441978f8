"""koen_sllm/launcher/setup_env.sh: which Python it picks, the one-line check, installing and refusing to install.

Missing packages are simulated with a stand-in python (a small wrapper around
the real one) whose PYTHONPATH holds a module that fails to import, and pip and
venv are simulated by that wrapper, so nothing here touches the network. The
same wrapper named python3 on PATH stands for a machine's own Python.
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
SETUP = ROOT / "koen_sllm" / "launcher" / "setup_env.sh"
REAL_PY = Path(sys.executable)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "KOEN_PYTHON", "KOEN_NO_INSTALL", "PYTHONPATH", "KOEN_PIP_ARGS")}
    env.update(extra)
    return env


def setup(extras: str = "", env: dict | None = None, setup_file: Path = SETUP,
          scope: str = "") -> subprocess.CompletedProcess:
    script = ('source "$0" && koen_setup_env "$1" "$2" && echo "KOEN_PYTHON=$KOEN_PYTHON" '
              '&& echo "KOEN_PYTHONPATH=$KOEN_PYTHONPATH"')
    return subprocess.run(["bash", "-c", script, str(setup_file), extras, scope], capture_output=True, text=True,
                          env=env, cwd="/", timeout=120)


def stand_in_python(py: Path, shadow_dir: Path, log: Path) -> None:
    """Writes py: the real interpreter with shadow_dir after the caller's PYTHONPATH
    (so the checkout that setup_env.sh puts first still wins, as it does over
    site-packages). `-m pip ...` is recorded in log and empties the shadow;
    `-m venv DIR` is recorded too and copies this stand-in to DIR/bin/python."""
    py.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "$1 $2" in
          "-m pip")
            printf '%s\\n' "$@" >> '{log}'
            rm -f '{shadow_dir}'/*.py
            exit "${{FAKE_PIP_RC:-0}}" ;;
          "-m venv")
            printf '%s\\n' "$@" >> '{log}'
            mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
            exit ;;
        esac
        PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}"'{shadow_dir}' exec '{REAL_PY}' "$@"
        """))
    py.chmod(0o755)


def make_shadow(tmp_path: Path, shadow: dict[str, str] | None) -> Path:
    shadow_dir = tmp_path / "shadow"
    shadow_dir.mkdir()
    for name, source in (shadow or {}).items():
        (shadow_dir / f"{name}.py").write_text(source)
    return shadow_dir


def fake_env(tmp_path: Path, shadow: dict[str, str] | None = None) -> Path:
    """A virtualenv-like folder whose bin/python is a stand-in (see stand_in_python) logging to pip.log."""
    venv = tmp_path / "fake venv"
    (venv / "bin").mkdir(parents=True)
    stand_in_python(venv / "bin" / "python", make_shadow(tmp_path, shadow), tmp_path / "pip.log")
    return venv


BROKEN = "raise ImportError('simulated: not installed')\n"


def test_active_venv_passes_with_one_line():
    if sys.prefix == sys.base_prefix:
        pytest.skip("pytest is not running inside a virtualenv")
    res = setup("dev", env=clean_env(VIRTUAL_ENV=sys.prefix, KOEN_NO_INSTALL="1"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("✅") and "torch" in lines[0]
    assert lines[1] == f"KOEN_PYTHON={Path(sys.prefix) / 'bin' / 'python'}"
    assert lines[2] == f"KOEN_PYTHONPATH={ROOT}"
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


@pytest.mark.parametrize("no_install", ["1", ""])
def test_package_from_another_checkout_is_not_reinstalled(tmp_path, no_install):
    venv = fake_env(tmp_path)
    other = tmp_path / "shadow" / "koen_sllm"
    other.mkdir()
    (other / "__init__.py").write_text("")
    res = setup(env=clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL=no_install))
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "pip.log").exists()
    assert f"KOEN_PYTHONPATH={ROOT}" in res.stdout.splitlines()
    where = "import koen_sllm; print(koen_sllm.__file__)"
    py = str(venv / "bin" / "python")
    # The stand-in alone imports the other checkout; with KOEN_PYTHONPATH, this one.
    alone = subprocess.run([py, "-c", where], capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert alone.stdout.strip() == str(other / "__init__.py")
    run = subprocess.run([py, "-c", where], capture_output=True, text=True, cwd=tmp_path,
                         env=clean_env(PYTHONPATH=str(ROOT)))
    assert run.stdout.strip() == str(ROOT / "koen_sllm" / "__init__.py")


def test_train_scope_ignores_what_only_export_needs(tmp_path):
    venv = fake_env(tmp_path, {"datasets": BROKEN})
    env = clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1")
    res = setup(env=env, scope="train")
    assert res.returncode == 0, res.stderr
    assert f"KOEN_PYTHON={venv}/bin/python" in res.stdout
    res = setup(env=env)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "datasets" in lines[0] and "transformers" not in lines[0].split("install:")[0]
    # The install a missing package asks for is the full one in either scope.
    assert f"install: '{venv}/bin/python' -m pip install -e '{ROOT}'" in lines[0]
    assert not (tmp_path / "pip.log").exists()


def test_train_scope_checks_ranges_from_dependencies(tmp_path):
    venv = fake_env(tmp_path)
    repo = _mini_repo(tmp_path, '[project]\ndependencies = ["numpy>=99", "tqdm>=99"]\n'
                                '[tool.koen-sllm]\ntrain-requires = ["numpy"]\n')
    res = setup(env=clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1"),
                setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh", scope="train")
    assert res.returncode == 1
    assert "numpy>=99(found:" in res.stderr and "tqdm" not in res.stderr.split("install:")[0]


def test_train_scope_needs_the_table_and_other_scopes_are_refused(tmp_path):
    venv = fake_env(tmp_path)
    repo = _mini_repo(tmp_path)
    env = clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1")
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh", scope="train")
    assert res.returncode == 1 and "train-requires" in res.stderr and "[tool.koen-sllm]" in res.stderr
    res = setup(env=env, scope="trian")
    assert res.returncode == 1 and "unknown scope 'trian'" in res.stderr


def test_torch_outside_the_supported_range_counts_as_missing(tmp_path):
    venv = fake_env(tmp_path)
    # A pyproject whose torch range excludes the installed one, in a copy of the checkout layout.
    repo = _mini_repo(tmp_path)
    (repo / "pyproject.toml").write_text('[project]\ndependencies = [\n  "torch>=99.0",  # a comment\n  "numpy",\n]\n')
    env = clean_env(VIRTUAL_ENV=str(venv), KOEN_NO_INSTALL="1")
    env["PYTHONPATH"] = str(repo)
    (venv / "bin" / "python").write_text(
        f"#!/usr/bin/env bash\nPYTHONPATH='{repo}' exec '{REAL_PY}' \"$@\"\n")
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh")
    assert res.returncode == 1
    assert "torch>=99.0(found:" in res.stderr


def _mini_repo(tmp_path: Path, pyproject: str = '[project]\ndependencies = ["numpy"]\n') -> Path:
    repo = tmp_path / "checkout with space"
    (repo / "koen_sllm" / "launcher").mkdir(parents=True)
    shutil.copy(SETUP, repo / "koen_sllm" / "launcher" / "setup_env.sh")
    (repo / "pyproject.toml").write_text(pyproject)
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
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh")
    assert res.returncode == 0, res.stderr
    assert "creating" in res.stderr
    assert f"KOEN_PYTHON={repo}/.venv/bin/python" in res.stdout
    # Second time: the venv exists, nothing is created.
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh")
    assert res.returncode == 0 and "creating" not in res.stderr


def test_missing_venv_module_gives_the_apt_hint(tmp_path):
    repo = _mini_repo(tmp_path)
    bindir = _stub_python3(tmp_path, 'echo "Error: ensurepip is not available" >&2; exit 1\n')
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh")
    assert res.returncode == 1
    assert "sudo apt install python3-venv" in res.stderr.splitlines()[-1]
    assert not (repo / ".venv").exists()


def test_no_install_does_not_create_a_venv(tmp_path):
    repo = _mini_repo(tmp_path)
    bindir = _stub_python3(tmp_path, "exit 9\n")
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", KOEN_NO_INSTALL="1")
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "no Python environment" in lines[0] and "python3 -m venv" in lines[0]
    assert not (repo / ".venv").exists()


def test_unknown_extra_is_an_error():
    if sys.prefix == sys.base_prefix:
        pytest.skip("pytest is not running inside a virtualenv")
    res = setup("nosuchextra", env=clean_env(VIRTUAL_ENV=sys.prefix))
    assert res.returncode == 1 and "unknown extra 'nosuchextra'" in res.stderr


# A checkout whose training needs torch and numpy; datasets is for export only.
TRAIN_PYPROJECT = """\
[project]
requires-python = ">=3.10"
dependencies = [
    "torch>=2.0",
    "numpy>=1.20",
    "datasets",
]

[tool.koen-sllm]
train-requires = ["torch", "numpy"]
"""


def _machine_python3(tmp_path: Path, shadow: dict[str, str]) -> Path:
    """A folder holding python3: a stand-in for a container's own Python, outside any venv."""
    bindir = tmp_path / "stub bin"
    bindir.mkdir()
    stand_in_python(bindir / "python3", make_shadow(tmp_path, shadow), tmp_path / "calls.log")
    return bindir


@pytest.mark.parametrize("no_install", ["1", ""])
def test_python3_that_passes_the_check_is_used_as_is(tmp_path, no_install):
    repo = _mini_repo(tmp_path, TRAIN_PYPROJECT)
    bindir = _machine_python3(tmp_path, {"datasets": BROKEN})
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", KOEN_NO_INSTALL=no_install)
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh", scope="train")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0].startswith("✅") and "used as is" in lines[0]
    assert lines[1:] == [f"KOEN_PYTHON={bindir}/python3", f"KOEN_PYTHONPATH={repo}"]
    assert not (repo / ".venv").exists()
    assert not (tmp_path / "calls.log").exists()  # no venv, no pip


def test_python3_without_torch_and_no_install_names_torch_and_the_fix(tmp_path):
    repo = _mini_repo(tmp_path, TRAIN_PYPROJECT)
    bindir = _machine_python3(tmp_path, {"torch": BROKEN})
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", KOEN_NO_INSTALL="1")
    res = setup(env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh", scope="train")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("❌") and f"python3 ({bindir}/python3) lacks torch" in lines[0]
    assert f"python3 -m venv '{repo}/.venv' && '{repo}/.venv/bin/python' -m pip install -e '{repo}'" in lines[0]
    assert not (repo / ".venv").exists()
    assert not (tmp_path / "calls.log").exists()
    assert "KOEN_PYTHON=" not in res.stdout


def test_python3_without_torch_gets_a_venv_with_the_install(tmp_path):
    repo = _mini_repo(tmp_path, TRAIN_PYPROJECT)
    bindir = _machine_python3(tmp_path, {"torch": BROKEN})
    env = clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    res = setup("", env=env, setup_file=repo / "koen_sllm" / "launcher" / "setup_env.sh", scope="train")
    assert res.returncode == 0, res.stderr
    assert "lacks torch" in res.stderr and "creating" in res.stderr
    assert f"KOEN_PYTHON={repo}/.venv/bin/python" in res.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["-m", "venv", f"{repo}/.venv", "-m", "pip", "install", "-e", str(repo)]
