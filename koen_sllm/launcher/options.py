"""The launcher's options: the trainer's parser plus the launcher's own group, one source of truth.

Every trainer option is a launcher option (``./run_h100_dual.sh --train
--global-batch-size 16`` works); the launcher adds what only it does (GPU
count, background/foreground, --status/--stop, installing). Parsing, defaults
and validation are config.py's; this module turns argparse's errors into the
launcher's one bilingual line and resolves the run's folders.

Standard library only: it runs before any Python environment is set up.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RunConfig, build_parser, explicit_options, parse_args

DEFAULT_NUM_GPUS = 2
# Destinations that belong to the launcher alone: never passed to the trainer.
LAUNCHER_DESTS = ("num_gpus", "foreground", "status", "stop", "no_install")
# What --status/--stop may be combined with.
CONTROL_DESTS = {"status", "stop", "logs_dir", "output_dir", "verbose", "no_install"}

# The launcher's documented options with their Korean description, in the order --help and
# docs/launcher.md show them. The English text is argparse's own help for the same option,
# so the two cannot drift apart (tests/scripts/test_launcher.py checks docs/launcher.md against it).
KOREAN_HELP = {
    "--test": "테스트 모드: 10스텝 빠른 검증 (기본값)",
    "--train": "실제 학습 모드",
    "--max-steps": "최대 스텝",
    "--model-size": "모델 크기",
    "--dataset-path": "데이터셋 파일 또는 폴더",
    "--output-dir": "체크포인트 저장 위치",
    "--logs-dir": "로그, PID 파일, metrics.jsonl",
    "--batch-size": "GPU(프로세스)당 배치",
    "--grad-accum": "그래디언트 누적",
    "--global-batch-size": "스텝당 전체 배치 (시퀀스)",
    "--learning-rate": "학습률",
    "--max-seq-length": "최대 시퀀스 길이",
    "--save-steps": "저장 간격",
    "--resume": "이어서 학습",
    "--fp16": "FP16 mixed precision (GPU 전용)",
    "--fp32": "FP32 precision",
    "--fp8": "FP8 행렬곱 (H100 이상, bf16 전용; torchao 필요)",
    "--no-compile": "torch.compile 끄기",
    "--num-gpus": "사용할 GPU 수",
    "--deepspeed": "DeepSpeed ZeRO",
    "--foreground": "포그라운드 실행",
    "--no-save-initial": "초기 모델 저장 안 함",
    "--dry-run": "명령어와 확정된 설정만 출력",
    "--verbose": "상세 로그",
    "--status": "실행 상태",
    "--stop": "체크포인트 저장 후 중단",
    "--no-install": "패키지 자동 설치 안 함",
}


class LaunchError(Exception):
    """One bilingual line for the user, and the exit code (2: a bad option, nothing started)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def build_launcher_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "run_h100_dual.sh"
    p.allow_abbrev = False  # --batch 8 must not quietly mean --batch-size 8
    p.description = "Korean/English sLLM training launcher (one host, DDP over 1-8 GPUs; CPU processes without a GPU)."
    g = p.add_argument_group("launcher")
    g.add_argument("--num-gpus", type=int, default=None,
                   help=f"GPUs (processes) to use (default: {DEFAULT_NUM_GPUS}, capped to the GPUs present; "
                        "CPU processes without a GPU)")
    g.add_argument("--foreground", action="store_true", help="stay attached (default: background with nohup)")
    action = g.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="running?, step, loss, tok/s, ETA")
    action.add_argument("--stop", action="store_true", help="stop (the workers save a checkpoint first)")
    g.add_argument("--no-install", action="store_true", help="never pip install (same as KOEN_NO_INSTALL=1)")
    return p


@dataclass
class LaunchOptions:
    argv: list[str]  # the words typed, the -- separator removed
    ns: argparse.Namespace
    explicit: set[str]
    typed: dict[str, str] = field(default_factory=dict)  # destination -> the option word typed

    @property
    def action(self) -> str:
        return "status" if self.ns.status else "stop" if self.ns.stop else "run"

    @property
    def mode(self) -> str:
        return self.ns.mode


def _words(argv: Sequence[str]) -> list[str]:
    """The words with the first bare ``--`` dropped: trainer options may follow it (the older form)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        argv = argv[:i] + argv[i + 1:]
    return argv


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}  # noqa: SLF001 - argparse has no public map


def parse(argv: Sequence[str]) -> LaunchOptions:
    """Parse and validate every option; LaunchError(code 2) with one bilingual line when one is bad."""
    words = _words(argv)
    parser = build_launcher_parser()
    try:
        ns, _ = _parse_known(parser, words)
    except ConfigError as exc:
        raise LaunchError(translate_argparse_error(str(exc))) from None
    explicit = explicit_options(words, build_launcher_parser())
    typed = _typed(parser, words)
    opts = LaunchOptions(words, ns, explicit, typed)
    if opts.action != "run":
        extra = [typed[d] for d in typed if d not in CONTROL_DESTS]
        if extra:
            raise LaunchError(f"--{opts.action} 옵션은 학습 옵션과 함께 쓸 수 없습니다 / --{opts.action} cannot be "
                              f"combined with {extra[0]}")
        return opts
    try:  # the trainer's own validation, on the trainer's words
        parse_args(trainer_words(opts))
    except ConfigError as exc:
        raise LaunchError(f"옵션 값이 잘못되었습니다 / {exc}") from None
    if ns.num_gpus is not None and not 0 < ns.num_gpus <= 1024:
        raise LaunchError(f"--num-gpus 에는 1-1024 의 정수가 필요합니다 / --num-gpus needs a whole number from 1 "
                          f"to 1024, got {ns.num_gpus}")
    return opts


def _parse_known(parser, words):
    ns, rest = parser.parse_known_args(words)
    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    return ns, rest


def _typed(parser, words) -> dict[str, str]:
    strings = _option_strings(parser)
    out: dict[str, str] = {}
    for w in words:
        action = strings.get(w.split("=", 1)[0])
        if action is not None:
            out.setdefault(action.dest, w.split("=", 1)[0])
    return out


def trainer_words(opts: LaunchOptions) -> list[str]:
    """The typed words minus the launcher's own options (and their values)."""
    strings = _option_strings(build_launcher_parser())
    out, skip = [], False
    for w in opts.argv:
        if skip:
            skip = False
            continue
        action = strings.get(w.split("=", 1)[0])
        if action is not None and action.dest in LAUNCHER_DESTS:
            skip = action.nargs != 0 and "=" not in w
            continue
        out.append(w)
    return out


_ARGPARSE_PATTERNS = [
    (r"unrecognized arguments: (\S+)", lambda m: f"알 수 없는 옵션 / unknown option '{m[1]}': see --help"),
    (r"argument (\S+?)(?:/\S+)?: expected one argument", lambda m: f"{m[1]} 에 값이 필요합니다 / {m[1]} needs a value"),
    (r"argument (\S+?)(?:/\S+)?: invalid int value: '(.*)'",
     lambda m: f"{m[1]} 에는 정수가 필요합니다 / {m[1]} needs a whole number, got '{m[2]}'"),
    (r"argument (\S+?)(?:/\S+)?: invalid float value: '(.*)'",
     lambda m: f"{m[1]} 에는 숫자가 필요합니다 / {m[1]} needs a number, got '{m[2]}'"),
    (r"argument (\S+?)(?:/\S+)?: invalid choice: '(.*?)' \(choose from (.*)\)",
     lambda m: f"알 수 없는 값 / unknown {m[1]} '{m[2]}': choose one of {m[3].replace(chr(39), '')}"),
    (r"argument (\S+?)(?:/\S+)?: not allowed with argument (\S+)",
     lambda m: f"{m[2]} 와 {m[1]} 옵션은 함께 쓸 수 없습니다 / {m[2]} and {m[1]} cannot be combined"),
    (r"argument (\S+?)(?:/\S+)?: ignored explicit argument '(.*)'",
     lambda m: f"{m[1]} 옵션은 값을 받지 않습니다 / {m[1]} takes no value, got '{m[2]}'"),
]


def translate_argparse_error(message: str) -> str:
    for pattern, render in _ARGPARSE_PATTERNS:
        m = re.search(pattern, message)
        if m:
            return render(m)
    return f"옵션 오류 / {message}: see --help"


# ---------------------------------------------------------------- folders


def folders(opts: LaunchOptions) -> tuple[Path, Path]:
    """(outputs, logs) as absolute paths: typed ones against the caller's directory, defaults per mode
    (config.RunConfig: a test run has folders of its own)."""
    cfg = RunConfig()
    cfg.train.mode = opts.mode
    cfg.ckpt.output_dir, cfg.train.logs_dir = opts.ns.output_dir, opts.ns.logs_dir
    if not opts.ns.logs_dir:  # a resumed run keeps writing where it wrote before
        cfg.train.logs_dir = recorded(cfg.output_dir, opts.mode).get("logs_dir")
    return cfg.output_dir, cfg.logs_dir


def recorded(output_dir: Path, mode: str) -> dict:
    """The train section of the output folder's recorded training run (run_record.py), {} if none
    applies. An unreadable record is the trainer's to report, with its fix."""
    from ..run_record import read_record

    if mode != "train":
        return {}
    try:
        record = read_record(output_dir) or {}
    except ConfigError:
        return {}
    config = record.get("config") or {}
    if (config.get("train") or {}).get("mode") != "train":
        return {}
    return {**(config.get("train") or {}), **(config.get("data") or {})}


def control_folders(opts: LaunchOptions) -> list[Path]:
    """The logs folders --status/--stop look at: the typed one, else the training and the test run's."""
    if opts.ns.logs_dir:
        return [folders(opts)[1]]
    return [_mode_logs("train"), _mode_logs("test")]


def _mode_logs(mode: str) -> Path:
    cfg = RunConfig()
    cfg.train.mode = mode
    return cfg.logs_dir


# ---------------------------------------------------------------- help


def help_text() -> str:
    parser = build_launcher_parser()
    actions = _option_strings(parser)
    lines = ["한국어 sLLM 학습 실행기 / Korean sLLM training launcher",
             "Usage: ./run_h100_dual.sh [options]", ""]
    for opt, korean in KOREAN_HELP.items():
        a = actions[opt]
        metavar = "" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}" if a.nargs is None else \
            f" [{a.metavar or a.dest.upper()}]"
        lines.append(f"  {opt + metavar:<26}{korean} / {_english(a)}")
    lines += ["  -h, --help                도움말 / this help",
              "  -- ARGS                   (이전 형식) 나머지는 학습 스크립트로 / older form: the rest goes to the trainer",
              "",
              "학습 스크립트의 모든 옵션도 그대로 받습니다 / every trainer option is accepted as well:"]
    shown = set(KOREAN_HELP)
    for a in parser._actions:  # noqa: SLF001
        if not a.option_strings or a.help == argparse.SUPPRESS or a.dest == "help":
            continue
        if any(s in shown for s in a.option_strings):
            continue
        lines.append(f"  {', '.join(a.option_strings):<26}{_english(a)}")
    lines += ["", "Exit codes: 0 ok, 1 a run-time failure, 2 a bad option (nothing started), 3 --status: not running.",
              "Environment: KOEN_START_TIMEOUT (wait for the first step, default 900 s), KOEN_STOP_TIMEOUT "
              "(--stop wait, default 600 s),", "KOEN_NO_INSTALL, KOEN_PIP_ARGS. More: docs/launcher.md"]
    return "\n".join(lines) + "\n"


def _english(a: argparse.Action) -> str:
    text = (a.help or "").replace("%%", "%")
    return text or a.dest.replace("_", " ")


def print_help() -> None:
    sys.stdout.write(help_text())


def wants_help(argv: Sequence[str]) -> bool:
    words = list(argv)
    if "--" in words:
        words = words[:words.index("--")]
    return "-h" in words or "--help" in words


def options_table() -> list[tuple[str, str, str]]:
    """(option, Korean, English) for every documented launcher option: docs/launcher.md's table."""
    actions = _option_strings(build_launcher_parser())
    return [(opt, korean, _english(actions[opt])) for opt, korean in KOREAN_HELP.items()]
