"""torchrun with one line per failure on the console and the long report in the detail log.

    python -m koen_sllm.launcher.torchrun --standalone --nproc_per_node 2 scripts/train_h100_dual.py ...

The same launcher as ``python -m torch.distributed.run`` (same arguments, same
agent); what changes is what a failure looks like. The worker already printed
its one-line reason; torchrun would follow it with a ~30-line ChildFailedError
report and traceback. Here that report goes to KOEN_DETAIL_LOG (rank 0's
detail log) and the console gets one line; the exit code is the failed
worker's own (2 for a bad option, 1 for a run-time failure) instead of
torchrun's blanket 1. At exit it removes the PID file that names this process
(KOEN_PID_FILE), so a finished run leaves no stale file behind.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path


def _quiet_agent_logs(detail: Path | None) -> None:
    """torch's elastic agent logs its failure reports at ERROR level to stderr: into the detail log instead."""
    logger = logging.getLogger("torch.distributed.elastic")
    if detail is None:
        return
    try:
        handler = logging.FileHandler(detail, encoding="utf-8")
    except OSError:
        return
    handler.setFormatter(logging.Formatter("[%(asctime)s][torchrun][%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).propagate = True
            for h in list(logging.getLogger(name).handlers):
                logging.getLogger(name).removeHandler(h)
    logger.handlers = [handler]
    logger.propagate = False


def _remove_own_pid_file() -> None:
    path = os.environ.get("KOEN_PID_FILE")
    if not path:
        return
    from .pidfile import read_pid_file

    state = read_pid_file(Path(path))
    if state.proc is not None and state.proc.pid == os.getpid():
        Path(path).unlink(missing_ok=True)
        Path(path).with_name("training.stopping").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    detail = Path(os.environ["KOEN_DETAIL_LOG"]) if os.environ.get("KOEN_DETAIL_LOG") else None
    try:
        args = parse_args(argv)
        _quiet_agent_logs(detail)
        run(args)
        return 0
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if detail is not None:
            try:
                with open(detail, "a", encoding="utf-8") as fh:
                    fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}][torchrun] worker failure report:\n{exc}\n")
                    fh.write("".join(traceback.format_exception(exc)))
            except OSError:
                pass
        where = f" (torchrun's report: {detail})" if detail is not None else ""
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        print(f"❌ 학습 프로세스 실패 / worker rank {rank} ended with {how}{where}", file=sys.stderr, flush=True)
        return code if 0 < code < 126 else 1
    except SignalException as exc:  # torchrun itself was signalled: it has stopped its workers
        print(f"⏹  torchrun: {exc.sigval.name} received; the workers were stopped", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    finally:
        _remove_own_pid_file()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
