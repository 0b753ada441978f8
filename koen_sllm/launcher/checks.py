"""The launcher's checks, in the order a run needs them, each ending in one bilingual line when it fails.

Before the environment (cheap, nothing installed yet): the paths named on the
command line exist, training has data, and no live run owns the logs or output
folder. After it: the GPU count, then the trainer's own resolution of every
setting (resolve.py), which refuses a resume that would change the run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .. import run_lock
from ..config import RunConfig
from ..data import DataError
from ..data.locate import find_dataset_files, find_prepared_only
from . import pidfile
from .environment import PythonEnv, child_env, module_command
from .files import JobFiles
from .options import DEFAULT_NUM_GPUS, LaunchError, LaunchOptions, recorded, trainer_words

# Options whose value is a path: passed on as absolute paths, relative to where the launcher ran.
PATH_OPTIONS = ("--dataset-path", "--tokenizer-path", "--deepspeed", "--resume")
FOLDER_OPTIONS = ("--output-dir", "--logs-dir")


def find_data(path: Path) -> tuple[int, Optional[Path]]:
    """(corpus files, prepared folder used alone), found as the trainer finds them (data/locate.py)."""
    try:
        files = find_dataset_files(path)
        return len(files), (None if files else find_prepared_only(path))
    except DataError as exc:
        raise LaunchError(f"학습 데이터를 고를 수 없습니다 / {exc}") from None


def _absolute(value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def checkpoints_in(output_dir: Path, limit: int = 8) -> str:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            tail = p.name[len("checkpoint-"):] if p.name.startswith("checkpoint-") else ""
            if p.is_dir() and tail.isdigit():
                found.append((int(tail), p.name))
    names = [n for _, n in sorted(found, reverse=True)][:limit]
    if (output_dir / "initial_model").is_dir():
        names.append("initial_model")
    return ", ".join(names) if names else "none"


def before_environment(opts: LaunchOptions, output_dir: Path, files: JobFiles) -> dict:
    ns = opts.ns
    previous = recorded(output_dir, opts.mode).get("dataset_path")
    data = _absolute(ns.dataset_path or previous) if ns.dataset_path or previous else RunConfig().dataset_path
    if ns.dataset_path and not data.exists():
        raise LaunchError(f"데이터셋 경로가 없습니다 / --dataset-path '{data}' does not exist")
    count, prepared = find_data(data)
    if opts.mode == "train" and count == 0 and prepared is None:
        raise LaunchError(f"학습 데이터가 없습니다 / no .jsonl/.txt training data or prepared folder in '{data}': run "
                          "scripts/run_preprocessing.sh --recipe1, or pass --dataset-path")
    if ns.deepspeed and not _absolute(ns.deepspeed).is_file():
        raise LaunchError(f"DeepSpeed 설정 파일이 없습니다 / --deepspeed config '{_absolute(ns.deepspeed)}' not found")
    if ns.resume not in (None, "auto", "none") and _resume_path(ns.resume, output_dir) is None:
        raise LaunchError(f"체크포인트가 없습니다 / --resume '{_absolute(ns.resume)}' does not exist; checkpoints in "
                          f"{output_dir}: {checkpoints_in(output_dir)}; pass one of them, auto or none")
    still_free(output_dir, files)
    return {"path": data, "files": count, "prepared": prepared}


def still_free(output_dir: Path, files: JobFiles) -> None:
    """No live run in this logs folder, and nobody holding the output or logs folder (exit 1)."""
    state = pidfile.read_pid_file(files.pid)
    if state.state == "live":
        cmd = " ".join(state.proc.cmdline)[:80]
        raise LaunchError(f"이미 학습이 실행 중입니다 / a run is already going: PID {state.proc.pid} ({cmd}) in "
                          f"{files.pid}; see --status, or stop it with --stop", code=1)
    for folder, what, option in ((output_dir, "output folder", "--output-dir"), (files.logs_dir, "logs folder",
                                                                                 "--logs-dir")):
        holder = run_lock.lock_holder(folder)
        if holder is not None:
            raise LaunchError(str(run_lock.FolderBusy(folder, holder, what, option)).removeprefix("❌ "), code=1)


def _resume_path(value: str, output_dir: Path):
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists() and (output_dir / p).exists():
        return output_dir / p  # a bare name such as checkpoint-500 means the one in --output-dir
    p = _absolute(value)
    return p if p.exists() else None


def processes(opts: LaunchOptions, penv: PythonEnv) -> tuple[int, str]:
    """(process count, "gpu"/"cpu") with the GPU-count rules: an explicit count above the GPUs present
    is an error; the default is capped with a warning."""
    asked = opts.ns.num_gpus
    if penv.gpu_count > 0:
        print(f"✅ PyTorch {penv.torch_version}, CUDA {penv.cuda_version} 확인 완료 / PyTorch and CUDA ok")
        if asked is not None and asked > penv.gpu_count:
            raise LaunchError(f"--num-gpus {asked}: GPU가 {penv.gpu_count}개뿐입니다 / only {penv.gpu_count} GPU(s) "
                              f"present; use --num-gpus {penv.gpu_count} or less")
        print(f"✅ GPU 확인 완료: {penv.gpu_count}개 사용 가능 / {penv.gpu_count} GPU(s) available")
        for line in penv.gpus:
            print(f"  {line}")
        nproc = asked or DEFAULT_NUM_GPUS
        if nproc > penv.gpu_count:
            print(f"⚠️  GPU가 {penv.gpu_count}개뿐이라 {penv.gpu_count}개로 실행합니다 / only {penv.gpu_count} GPU(s): "
                  f"using {penv.gpu_count} (default is {DEFAULT_NUM_GPUS})")
            nproc = penv.gpu_count
        return nproc, "gpu"
    nproc = asked or DEFAULT_NUM_GPUS
    print(f"✅ PyTorch {penv.torch_version} 확인 완료 / PyTorch ok (CPU build or no CUDA device)")
    print(f"⚠️  GPU 없음: CPU 프로세스 {nproc}개(gloo)로 실행합니다 — 검증용이며 실제 학습용이 아닙니다")
    print(f"⚠️  no CUDA GPU: running {nproc} CPU processes (gloo) — for checking the pipeline, not for real training")
    return nproc, "cpu"


def report_data(data: dict) -> None:
    if data.get("prepared"):
        print(f"✅ 준비된 데이터셋 확인 완료 / dataset: prepared data in {data['prepared']} (token files, no corpus)")
    elif data["files"]:
        print(f"✅ 데이터셋 확인 완료: {data['files']}개 파일 / dataset: {data['files']} file(s) in {data['path']}")
    else:
        print(f"⚠️  데이터셋 없음: 테스트 모드는 더미 데이터를 씁니다 / no data in {data['path']}: test mode uses a "
              "generated dummy corpus")
        print("   실제 데이터 / real data: scripts/run_preprocessing.sh --recipe1")


def report_disk(output_dir: Path, mode: str) -> None:
    """A hint only: the trainer checks the space it needs itself, on every rank, before it saves anything."""
    where = output_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free_gib = shutil.disk_usage(where).free // 2**30
    except OSError:
        return
    need = 20 if mode == "train" else 1
    if free_gib >= need:
        print(f"✅ 디스크 여유 공간 / free disk: {free_gib} GiB ({where})")
    else:
        print(f"⚠️  디스크 여유 공간 부족 / low free disk: {free_gib} GiB in {where} (checkpoints need several GiB "
              "each): free space or use --output-dir elsewhere")


def trainer_arguments(opts: LaunchOptions, output_dir: Path, logs_dir: Path) -> list[str]:
    """The trainer's words: the typed ones with paths made absolute, the mode and both folders explicit."""
    words, out, i = trainer_words(opts), [], 0
    while i < len(words):
        word = words[i]
        name, eq, inline = word.partition("=")
        if name in FOLDER_OPTIONS:
            i += 1 if eq else 2
            continue
        if name == "--dry-run":  # the launcher's dry run shows the command; the run itself is real
            i += 1
            continue
        if name in PATH_OPTIONS:
            value = inline if eq else (words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--")
                                       else None)
            step = 1 if eq or value is None else 2
            if name == "--resume" and not value:
                value = "auto"  # a bare --resume, said in full in the command shown
            if value is not None and not (name == "--resume" and value in ("auto", "none")) and value != "":
                value = str(_resume_path(value, output_dir) or _absolute(value)) if name == "--resume" \
                    else str(_absolute(value))
            out += [name] if value is None else [name, value]
            i += step
            continue
        out.append(word)
        i += 1
    if "--test" not in out and "--train" not in out:
        out.insert(0, "--test")
    return out + ["--output-dir", str(output_dir), "--logs-dir", str(logs_dir)]


def resolve(penv: PythonEnv, words: list[str], nproc: int, dry_run: bool = False) -> dict:
    """The trainer's resolution of every setting for ``nproc`` processes (resolve.py)."""
    env = child_env(penv, WORLD_SIZE=str(nproc), RANK="0")
    if dry_run:
        env["KOEN_RESOLVE_DRY_RUN"] = "1"
    res = subprocess.run([*module_command(penv.python, "koen_sllm.launcher.resolve"), *words], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        line = next((ln for ln in reversed(lines) if ln.startswith("❌")), lines[-1] if lines else "")
        raise LaunchError(line.removeprefix("❌ ") or f"설정 확인 실패 / resolving the settings failed "
                                                      f"(exit {res.returncode})", code=res.returncode if
                          res.returncode in (1, 2) else 1)
    return json.loads(res.stdout.strip().splitlines()[-1])


def git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or "none"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none"
    return rev + ("+dirty" if dirty else "")
