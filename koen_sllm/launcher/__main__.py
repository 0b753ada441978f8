"""The launcher behind ./run_h100_dual.sh: options, checks, environment, banner, start, --status, --stop.

    python3 -m koen_sllm.launcher --train --batch-size 8     (what run_h100_dual.sh runs)

Order matters: every option is checked before anything is installed or
written; the output and logs folders are checked for a live owner before
anything is rotated; the settings shown are the ones the trainer resolves.
Exit codes: 0 ok, 1 a run-time failure, 2 a bad option (nothing started),
3 --status: not running.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from . import banner, checks, control, environment, options, start
from .files import JobFiles, log_line, rotate_logs, shjoin


def _err(message: str) -> None:
    print(f"❌ {message}", file=sys.stderr, flush=True)


def _launcher_command(opts: options.LaunchOptions, logs_dir: Path) -> str:
    cmd = "./run_h100_dual.sh"
    if opts.ns.logs_dir:
        cmd += f" --logs-dir {shjoin([str(logs_dir)])}"
    return cmd


def main(argv: list[str]) -> int:
    if options.wants_help(argv):
        options.print_help()
        return 0
    try:
        opts = options.parse(argv)
    except options.LaunchError as exc:
        _err(str(exc))
        return exc.code
    if opts.action != "run":
        dirs = [JobFiles(d) for d in options.control_folders(opts)]
        if opts.action == "status":
            return control.status(dirs)
        return control.stop(dirs, "./run_h100_dual.sh" + (f" --logs-dir {shjoin([str(dirs[0].logs_dir)])}"
                                                           if opts.ns.logs_dir else ""))
    try:
        return _run(opts)
    except options.LaunchError as exc:
        _err(str(exc))
        return exc.code


def _run(opts: options.LaunchOptions) -> int:
    output_dir, logs_dir = options.folders(opts)
    files = JobFiles(logs_dir)
    data = checks.before_environment(opts, output_dir, files)  # exit 1/2 before anything is installed
    print(banner.TITLE)
    print("🔍 학습 환경 확인 중... / checking the training environment...", flush=True)
    no_install = opts.ns.no_install or opts.ns.dry_run or os.environ.get("KOEN_NO_INSTALL", "0") not in ("", "0")
    try:
        penv = environment.prepare(no_install)
    except environment.EnvironmentFailed:
        return 1
    nproc, device = checks.processes(opts, penv)
    checks.report_data(data)
    checks.report_disk(output_dir, opts.mode)
    print("✅ 모든 요구사항 충족 / all requirements met\n")

    words = checks.trainer_arguments(opts, output_dir, logs_dir)
    resolved = checks.resolve(penv, words, nproc, dry_run=opts.ns.dry_run)
    trainer = environment.trainer_script()
    command = [*environment.module_command(penv.python, "koen_sllm.launcher.torchrun"), "--standalone", "--nproc_per_node", str(nproc),
               str(trainer), *words]
    cfg = resolved["config"]
    passed = shjoin(options.trainer_words(opts)) if opts.ns.verbose else ""
    print(banner.run_information(cfg, nproc=nproc, device=device, notes=resolved["notes"],
                                 foreground=opts.ns.foreground, passed=passed))
    if opts.ns.verbose:
        print(f"🧾 명령 / command: {shjoin(command)}\n")
    if opts.ns.dry_run:
        import json

        print("🧪 Dry run: 아무것도 실행하지 않습니다 / nothing is started")
        print(f"📋 실행할 명령 / command:\n{shjoin(command)}\n")
        print("📋 확정된 설정 / resolved configuration:")
        print(json.dumps(cfg, indent=2, ensure_ascii=False))
        return 0

    checks.still_free(output_dir, files)  # the environment step may have taken minutes
    logs_dir.mkdir(parents=True, exist_ok=True)
    control.remove_stale(files)
    rotated = rotate_logs(logs_dir)
    if rotated:
        print(f"🗂  이전 로그 {rotated}개를 .1 로 보관 / kept {rotated} earlier log file(s) as *.1 (up to .5)")
    files.stopping.unlink(missing_ok=True)
    run_id = start.run_id_now()
    log_line(files.console, f"run_h100_dual.sh {shjoin(opts.argv)}")
    log_line(files.console, f"mode {opts.mode} | {nproc} process(es) on {device} | torch {penv.torch_version} | "
                            f"git {checks.git_revision()} | host {os.uname().nodename} | run {run_id}")
    log_line(files.console, f"command: {shjoin(command)}")
    launch = start.Launch(command=command, env=environment.child_env(penv), files=files, run_id=run_id,
                          mode=opts.mode, output_dir=output_dir, launcher=_launcher_command(opts, logs_dir))
    print("🎯 학습 시작! / starting the run")
    if opts.ns.foreground:
        return start.foreground(launch)
    return start.background(launch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
