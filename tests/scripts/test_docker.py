"""docker/Dockerfile and .dockerignore, without Docker: the file read as text, each rule checked.

No image is built here (no Docker daemon, no registry). The checks are functions over the
file's text, so `test_each_check_catches_its_mistake` can show that every one of them fails on
a Dockerfile with that mistake. The last test lays out the build context the way `COPY . .`
would (through .dockerignore), read-only but for the volumes, and runs the image's
ENTRYPOINT + CMD there on CPU with python3 as the image has it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from koen_sllm.config import repo_root

ROOT = repo_root()
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

# What the image needs from the build context (COPY . .): pip install -e . reads pyproject.toml
# and README.md (the package's readme), the entrypoint and the trainer run from the checkout.
NEEDED = ["pyproject.toml", "README.md", "run_h100_dual.sh", "scripts/run_h100_dual.sh",
          "scripts/train_h100_dual.py", "koen_sllm/__init__.py", "koen_sllm/launcher/setup_env.sh",
          "koen_sllm/launcher/__main__.py", "configs/ds_config.json"]
KEPT_OUT = ["datasets", "outputs", "logs", ".venv", ".git", ".carry"]


# ---------------------------------------------------------------- reading the files


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(text: str) -> list[dict]:
    """The build stages in order: name, base, and their instructions."""
    out: list[dict] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"unreadable FROM {rest!r}"
            out.append({"base": m.group(1), "name": m.group(2), "body": []})
        elif out:
            out[-1]["body"].append((keyword, rest))
    return out


def global_args(text: str) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones FROM lines can use)."""
    args: dict[str, str] = {}
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
    return args


def expand(value: str, args: dict[str, str]) -> str:
    for _ in range(5):
        value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)
    return value


def stage_chain(all_stages: list[dict], stage: dict) -> list[dict]:
    """The stage and the stages it is built FROM, base first."""
    by_name = {s["name"]: s for s in all_stages if s["name"]}
    chain = [stage]
    while chain[0]["base"] in by_name:
        chain.insert(0, by_name[chain[0]["base"]])
    return chain


def effective(all_stages: list[dict], stage: dict, keyword: str) -> list[str]:
    return [rest for s in stage_chain(all_stages, stage) for k, rest in s["body"] if k == keyword]


def pip_installs(run: str) -> list[str]:
    """The package specs of every `pip install` in a RUN line, quotes removed, options dropped."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(word)
    specs = []
    for words in commands:
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                specs.append(" ".join(w for w in words[i + 2:] if w != "--no-cache-dir"))
    # A pip install hidden in a quoted `bash -c '...'` would escape the parse: count them all.
    assert len(specs) == len(re.findall(r"pip\s+install", run)), f"unparsed pip install in RUN {run!r}"
    return specs


def readme_install(readme: str, heading: str) -> str:
    """The `pip install -e SPEC` of one README section (the set-up, or DeepSpeed), as `-e SPEC`."""
    sections = re.split(r"(?m)^#{2,3} ", readme)
    section = next((s for s in sections if s.startswith(heading)), None)
    assert section is not None, f"README.md has no section {heading!r}"
    found = re.findall(r"pip install -e (\.(?:\[[\w,-]+\])?|\"\.\[[\w,-]+\]\"|'\.\[[\w,-]+\]')", section)
    assert len(found) == 1, f"README.md section {heading!r}: expected one `pip install -e ...`, found {found}"
    return "-e " + found[0].strip("'\"")


def json_list(value: str, what: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except ValueError:
        raise AssertionError(f"{what} must be the exec (JSON list) form, got {value!r}") from None
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), f"{what}: {value!r}"
    return parsed


def workdir(all_stages: list[dict]) -> str:
    dirs = effective(all_stages, all_stages[-1], "WORKDIR")
    assert dirs, "no WORKDIR"
    return dirs[-1]


def dockerignore_excludes(patterns_text: str, path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the build context:
    a pattern matches the path or one of its parent folders; `**` spans folders; `!` re-includes."""
    rules = []
    for line in patterns_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((re.compile(regex + r"\Z"), negate))
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for regex, negate in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------- the checks (each raises AssertionError)


def check_build_args(dockerfile: str, pyproject: str) -> None:
    """CUDA_VERSION and TORCH_VERSION pick the base image, and that torch is in the tested range."""
    args = global_args(dockerfile)
    for name in ("CUDA_VERSION", "TORCH_VERSION"):
        assert args.get(name), f"ARG {name}=<default> must be declared before the first FROM"
    assert re.fullmatch(r"\d+\.\d+", args["CUDA_VERSION"]), args["CUDA_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), args["TORCH_VERSION"]
    all_stages = stages(dockerfile)
    assert all_stages, "no FROM"
    base = all_stages[0]["base"]
    raw = expand(base, {k: v for k, v in args.items() if k not in ("CUDA_VERSION", "TORCH_VERSION")})
    assert "${CUDA_VERSION}" in raw and "${TORCH_VERSION}" in raw, \
        f"the first FROM ({base}) must depend on CUDA_VERSION and TORCH_VERSION, got {raw}"
    image = expand(base, args)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn9-(runtime|devel)", image)
    assert m, f"default base image {image!r} is not a pytorch/pytorch:<torch>-cuda<cuda>-cudnn9-<flavor> tag"
    spec = re.search(r'"torch\s*([^";]+)"', pyproject)
    assert spec, "pyproject.toml has no torch requirement"
    version = tuple(int(x) for x in m.group(1).split("."))
    for part in spec.group(1).split(","):
        op, bound = re.fullmatch(r"\s*([<>=!]=?)\s*([\d.]+)\s*", part).groups()
        bound_t = tuple(int(x) for x in bound.split("."))
        n = len(bound_t)
        ok = {">=": version[:n] >= bound_t, "<": version[:n] < bound_t, ">": version[:n] > bound_t,
              "<=": version[:n] <= bound_t, "==": version[:n] == bound_t, "!=": version[:n] != bound_t}[op]
        assert ok, f"base image torch {m.group(1)} is outside pyproject.toml's torch{spec.group(1)}"


def check_install_is_readmes(dockerfile: str, readme: str) -> None:
    """The image installs what README.md's set-up installs, and DeepSpeed only in its own target."""
    setup = readme_install(readme, "Two commands")
    deepspeed = readme_install(readme, "DeepSpeed")
    all_stages = stages(dockerfile)
    by_name = {s["name"]: s for s in all_stages}
    assert "deepspeed" in by_name, "no `FROM ... AS deepspeed` stage (docker build --target deepspeed)"
    own = {s["name"]: [spec for k, rest in s["body"] if k == "RUN" for spec in pip_installs(rest)]
           for s in all_stages}
    first = all_stages[0]
    assert own[first["name"]] == [setup], \
        f"stage {first['name']} must install exactly README.md's set-up ({setup!r}), found {own[first['name']]}"
    ds_chain = [s["name"] for s in stage_chain(all_stages, by_name["deepspeed"])]
    assert first["name"] in ds_chain, "the deepspeed stage must build on the first stage"
    assert own["deepspeed"] == [deepspeed], \
        f"stage deepspeed must install README.md's DeepSpeed step ({deepspeed!r}), found {own['deepspeed']}"
    default = all_stages[-1]
    chain = [s["name"] for s in stage_chain(all_stages, default)]
    assert first["name"] in chain and "deepspeed" not in chain, \
        f"the default (last) stage must be the image without DeepSpeed, built on {first['name']}: {chain}"
    for name, specs in own.items():
        assert set(specs) <= {setup, deepspeed}, f"stage {name} installs {specs}: not a README.md install step"


def check_entrypoint(dockerfile: str) -> None:
    """The launcher is the entrypoint, attached (--foreground), with a default CMD."""
    all_stages = stages(dockerfile)
    entry = effective(all_stages, all_stages[-1], "ENTRYPOINT")
    cmd = effective(all_stages, all_stages[-1], "CMD")
    assert entry and cmd, "ENTRYPOINT and CMD are needed"
    entry_l, cmd_l = json_list(entry[-1], "ENTRYPOINT"), json_list(cmd[-1], "CMD")
    assert entry_l[0] in (f"{workdir(all_stages)}/run_h100_dual.sh", "./run_h100_dual.sh"), \
        f"the entrypoint must be the launcher in WORKDIR, got {entry_l[0]}"
    assert "--foreground" in entry_l, "the entrypoint must keep the run attached: --foreground"
    assert cmd_l, "CMD must give the default launcher options"


def check_volumes(dockerfile: str) -> None:
    all_stages = stages(dockerfile)
    declared = [v for rest in effective(all_stages, all_stages[-1], "VOLUME") for v in json_list(rest, "VOLUME")]
    wd = workdir(all_stages)
    for name in ("datasets", "outputs", "logs"):
        assert f"{wd}/{name}" in declared, f"VOLUME {wd}/{name} missing (declared: {declared})"


def check_runs_as_user_without_secrets(dockerfile: str) -> None:
    all_stages = stages(dockerfile)
    for stage in all_stages:
        users = effective(all_stages, stage, "USER")
        assert users and users[-1].split(":")[0] not in ("root", "0"), \
            f"stage {stage['name']} ends as {users[-1] if users else 'root'}: a non-root USER is needed"
    for keyword, rest in instructions(dockerfile):
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"(?i)token|secret|passw|api_?key|credential", rest), f"{keyword} {rest}"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.ssh|\.netrc|\.aws|\.docker/config|\.huggingface|id_rsa", rest), f"{keyword} {rest}"


def check_no_virtualenv(dockerfile: str) -> None:
    """The build runs the launcher's own environment check and fails if it made a .venv; run
    time never installs (KOEN_NO_INSTALL=1)."""
    runs = [rest for k, rest in instructions(dockerfile) if k == "RUN"]
    check = [r for r in runs if "setup_env.sh" in r and re.search(r"koen_setup_env\s+\"\"\s+train", r)]
    assert check, "a RUN step must source koen_sllm/launcher/setup_env.sh and run koen_setup_env \"\" train"
    assert "test ! -e .venv" in check[0], "that step must fail when a .venv was created"
    envs = " ".join(rest for k, rest in instructions(dockerfile) if k == "ENV")
    assert re.search(r"\bKOEN_NO_INSTALL=1\b", envs), "ENV KOEN_NO_INSTALL=1 missing"


def check_dockerignore(ignore: str, files: list[str]) -> None:
    for name in KEPT_OUT:
        assert dockerignore_excludes(ignore, f"{name}/anything"), f".dockerignore must exclude {name}/"
    inside = [f for f in files if f.split("/")[0] in KEPT_OUT and not dockerignore_excludes(ignore, f)]
    assert not inside, f"these would enter the build context: {inside[:5]}"
    dropped = [f for f in NEEDED if dockerignore_excludes(ignore, f)]
    assert not dropped, f".dockerignore drops files the image needs: {dropped}"


# ---------------------------------------------------------------- tests on the real files


def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_build_args_pick_a_pytorch_base_in_the_tested_range():
    check_build_args(dockerfile(), PYPROJECT.read_text(encoding="utf-8"))


def test_install_steps_are_the_readmes():
    check_install_is_readmes(dockerfile(), README.read_text(encoding="utf-8"))


def test_readme_setup_is_what_setup_env_installs():
    # The README's words and the launcher's code say the same: `pip install -e <repo>`, no extras.
    setup_env = (ROOT / "koen_sllm" / "launcher" / "setup_env.sh").read_text(encoding="utf-8")
    assert '-m pip install "${pip_args[@]}" -e "$target"' in setup_env
    assert 'local venv="$root/.venv" target="$root"' in setup_env
    main = (ROOT / "koen_sllm" / "launcher" / "environment.py").read_text(encoding="utf-8")
    assert re.search(r"koen_setup_env\s+\"\"\s+train", main), "the launcher calls koen_setup_env \"\" train"
    assert readme_install(README.read_text(encoding="utf-8"), "Two commands") == "-e ."


def test_entrypoint_is_the_launcher_in_the_foreground():
    check_entrypoint(dockerfile())


def test_entrypoint_and_cmd_are_options_the_launcher_accepts():
    all_stages = stages(dockerfile())
    entry = json_list(effective(all_stages, all_stages[-1], "ENTRYPOINT")[-1], "ENTRYPOINT")
    cmd = json_list(effective(all_stages, all_stages[-1], "CMD")[-1], "CMD")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOEN_")}
    env.update(KOEN_NO_INSTALL="1")
    res = subprocess.run(["bash", str(ROOT / "run_h100_dual.sh"), *entry[1:], *cmd, "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_volumes_for_data_checkpoints_and_logs():
    check_volumes(dockerfile())


def test_non_root_user_and_no_secrets():
    check_runs_as_user_without_secrets(dockerfile())


def test_no_virtualenv_in_the_image():
    check_no_virtualenv(dockerfile())


def git_files() -> list[str]:
    res = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    return res.stdout.splitlines() if res.returncode == 0 else []


def test_dockerignore_keeps_data_runs_and_environments_out():
    files = git_files() + [f"{name}/x" for name in KEPT_OUT] + ["datasets/mixed_pretraining.jsonl",
                                                               "outputs/checkpoint-500/model.safetensors"]
    check_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"), files)
    ignore = DOCKERIGNORE.read_text(encoding="utf-8")
    for path in ("koen_sllm/__pycache__/config.cpython-311.pyc", "koen-sllm-cuda12.8.sqsh", "koen_sllm.egg-info/PKG-INFO"):
        assert dockerignore_excludes(ignore, path), path


# ---------------------------------------------------------------- every check can fail


def _sub(pattern: str, repl: str, count: int = 1):
    def mutate(text: str) -> str:
        new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
        assert n, f"mutation pattern {pattern!r} no longer matches the Dockerfile"
        return new
    return mutate


MUTATIONS = {
    "no CUDA_VERSION arg": (check_build_args, _sub(r"^ARG CUDA_VERSION=.*$", "ARG CUDA_RELEASE=12.8")),
    "torch outside the range": (check_build_args, _sub(r"^ARG TORCH_VERSION=.*$", "ARG TORCH_VERSION=2.14.0")),
    "base fixed": (check_build_args, _sub(r"^ARG BASE_IMAGE=.*$", "ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime")),
    "install not the README's": (check_install_is_readmes, _sub(r"pip install --no-cache-dir -e \.$", "pip install --no-cache-dir .")),
    "an extra package": (check_install_is_readmes, _sub(r"pip install --no-cache-dir -e \.$", "pip install --no-cache-dir -e . flash-attn")),
    "deepspeed in the default image": (check_install_is_readmes, _sub(r"^FROM base AS train$", "FROM deepspeed AS train")),
    "no deepspeed target": (check_install_is_readmes, _sub(r"AS deepspeed$", "AS ds")),
    "entrypoint in the background": (check_entrypoint, _sub(r', "--foreground"\]', "]")),
    "entrypoint not the launcher": (check_entrypoint, _sub(r'^ENTRYPOINT \["[^"]+"', 'ENTRYPOINT ["python3"')),
    "shell-form entrypoint": (check_entrypoint, _sub(r"^ENTRYPOINT .*$", "ENTRYPOINT ./run_h100_dual.sh --foreground")),
    "no outputs volume": (check_volumes, _sub(r', "/opt/koen-sllm/outputs"', "")),
    "runs as root": (check_runs_as_user_without_secrets, _sub(r"^USER koen$", "USER root", count=0)),
    "a token": (check_runs_as_user_without_secrets, _sub(r"^ENV HOME=", "ENV HF_TOKEN=hf_x HOME=")),
    "no environment check": (check_no_virtualenv, _sub(r" \\\n && test ! -e \.venv", "")),
    "installs at run time": (check_no_virtualenv, _sub(r"KOEN_NO_INSTALL=1$", "KOEN_NO_INSTALL=0")),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_check_catches_its_mistake(name):
    check, mutate = MUTATIONS[name]
    text = mutate(dockerfile())
    extra = {check_build_args: (PYPROJECT.read_text(encoding="utf-8"),),
             check_install_is_readmes: (README.read_text(encoding="utf-8"),)}.get(check, ())
    with pytest.raises(AssertionError):
        check(text, *extra)


@pytest.mark.parametrize("drop", ["datasets", "outputs", "logs", ".venv"])
def test_dockerignore_check_catches_a_missing_line(drop):
    ignore = re.sub(rf"(?m)^{re.escape(drop)}$\n", "", DOCKERIGNORE.read_text(encoding="utf-8"))
    with pytest.raises(AssertionError):
        check_dockerignore(ignore, git_files() + [f"{drop}/x"])


def test_dockerignore_check_catches_a_needed_file_left_out():
    with pytest.raises(AssertionError):
        check_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8") + "*.md\n", git_files())


def test_readme_check_follows_the_readme():
    readme = README.read_text(encoding="utf-8").replace('pip install -e ".[deepspeed]"', 'pip install -e ".[deepspeed,fp8]"')
    with pytest.raises(AssertionError):
        check_install_is_readmes(dockerfile(), readme)


# ---------------------------------------------------------------- the image's start, on CPU


def build_context(dest: Path) -> None:
    """Copies the checkout as `COPY . .` would: everything .dockerignore does not exclude."""
    ignore = DOCKERIGNORE.read_text(encoding="utf-8")
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        keep = []
        for d in dirs:
            if not dockerignore_excludes(ignore, (rel / d).as_posix()):
                keep.append(d)
        dirs[:] = keep
        for f in files:
            path = (rel / f).as_posix()
            if not dockerignore_excludes(ignore, path) and not (Path(folder) / f).is_symlink():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / f, dest / path)


def image_env(dockerfile_text: str, home: Path) -> dict[str, str]:
    """The ENV lines of the Dockerfile, python3 on PATH with what training imports, nothing activated."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME") and not k.startswith("KOEN_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    for keyword, rest in instructions(dockerfile_text):
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
    env.update(HOME=str(home), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@pytest.mark.slow
def test_image_start_on_cpu_uses_python3_as_is_and_writes_only_the_volumes(tmp_path):
    pytest.importorskip("torch")
    text = dockerfile()
    all_stages = stages(text)
    wd = workdir(all_stages)
    app = tmp_path / wd.lstrip("/")
    build_context(app)
    for name in ("datasets", "outputs", "logs"):
        (app / name).mkdir()
    home = tmp_path / "home"
    home.mkdir()
    writable = {app / "datasets", app / "outputs", app / "logs"}
    frozen = []
    for folder, dirs, _ in os.walk(app):
        dirs[:] = [d for d in dirs if Path(folder) / d not in writable]
        frozen.append(Path(folder))
    before = sorted(p.relative_to(app).as_posix() for p in app.rglob("*") if not any(w in p.parents for w in writable))
    for folder in frozen:
        folder.chmod(folder.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        entry = json_list(effective(all_stages, all_stages[-1], "ENTRYPOINT")[-1], "ENTRYPOINT")
        cmd = json_list(effective(all_stages, all_stages[-1], "CMD")[-1], "CMD")
        program = str(app / entry[0][len(wd) + 1:]) if entry[0].startswith(wd + "/") else entry[0]
        res = subprocess.run([program, *entry[1:], *cmd], capture_output=True, text=True, cwd=app,
                             env=image_env(text, home), timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert "그대로 사용 / used as is" in out, out[-4000:]
        assert not (app / ".venv").exists()
        assert (app / "outputs" / "test" / "checkpoint-10").is_dir(), out[-2000:]
        assert (app / "logs" / "test" / "training_console.log").is_file()
        after = sorted(p.relative_to(app).as_posix() for p in app.rglob("*")
                       if not any(w in p.parents for w in writable) and p not in writable)
        assert [p for p in after if p not in before and "__pycache__" not in p] == []
    finally:
        for folder in frozen:
            folder.chmod(folder.stat().st_mode | stat.S_IWUSR)
