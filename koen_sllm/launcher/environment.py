"""The Python environment a run uses, found (or prepared) by koen_sllm/launcher/setup_env.sh.

The launcher itself needs only the standard library; the run needs torch and
the rest. setup_env.sh decides which interpreter (the active virtualenv or
conda env, the checkout's .venv, or a python3 that already has everything) and
installs what is missing unless told not to. Its probe also reports the GPUs,
so the launcher never imports torch itself.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..config import repo_root


class EnvironmentFailed(Exception):
    """setup_env.sh said why on stderr already (one line, with the fix)."""


@dataclass
class PythonEnv:
    python: str
    pythonpath: str
    torch_version: str = ""
    cuda_version: str = ""
    gpu_count: int = 0
    gpus: list[str] = field(default_factory=list)


def prepare(no_install: bool) -> PythonEnv:
    """Run setup_env.sh's koen_setup_env for the packages training imports; its messages reach the terminal."""
    import tempfile

    setup = Path(__file__).resolve().parent / "setup_env.sh"
    env = dict(os.environ)
    if no_install:
        env["KOEN_NO_INSTALL"] = "1"
    # setup_env.sh talks to the terminal; its findings go to a file of their own.
    script = ('source "$0" && koen_setup_env "" train && '
              'printf "python %s\\npythonpath %s\\n%s\\n" "$KOEN_PYTHON" "${KOEN_PYTHONPATH:-}" "$KOEN_ENV_PROBE" >"$1"')
    with tempfile.NamedTemporaryFile("r", prefix="koen-env-", suffix=".txt") as found:
        res = subprocess.run(["bash", "-c", script, str(setup), found.name], env=env)
        if res.returncode != 0:
            raise EnvironmentFailed()
        return parse_probe(found.read())


def parse_probe(text: str) -> PythonEnv:
    found = PythonEnv(python="", pythonpath=str(repo_root()))
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        if key == "python":
            found.python = rest.strip()
        elif key == "pythonpath" and rest.strip():
            found.pythonpath = rest.strip()
        elif key == "cuda":
            count, _, version = rest.partition(" ")
            found.gpu_count, found.cuda_version = int(count), version.strip()
        elif key == "gpu":
            index, _, name = rest.partition(" ")
            found.gpus.append(f"GPU {index}: {name}")
        elif key == "ok":
            found.torch_version = rest.split()[-1] if rest.split() else ""
    override = os.environ.get("KOEN_TEST_GPU_COUNT")  # lets tests exercise the GPU-count rules without GPUs
    if override:
        found.gpu_count = int(override)
    if not found.python:
        raise EnvironmentFailed()
    return found


def child_env(penv: PythonEnv, **extra: str) -> dict[str, str]:
    """The environment of everything the launcher starts: the checkout's package first on the path."""
    env = dict(os.environ)
    env.pop("KOEN_CONSOLE_LOG", None)
    parts = [penv.pythonpath or str(repo_root())]
    if env.get("PYTHONPATH") and env["PYTHONPATH"] not in parts:
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env


# `python -m` would put the current directory first on sys.path, so a launcher started from inside
# another checkout would run that checkout's code; the module is run from this checkout instead.
_RUN_MODULE = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
               "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def module_command(python: str, module: str) -> list[str]:
    """``python -m module`` with this checkout's package, whatever the current directory holds."""
    return [python, "-c", _RUN_MODULE, str(repo_root()), module]


def trainer_script() -> Path:
    return repo_root() / "scripts" / "train_h100_dual.py"
