#!/usr/bin/env python3
"""Run a command and record the host memory its whole process tree used at the peak.

    python benchmarks/host_memory.py --json mem.json -- torchrun ... scripts/train_h100_dual.py ...
    python benchmarks/host_memory.py --json mem.json --floor-gib 6 -- <command>

Every --interval seconds it sums the resident memory (RSS, pinned buffers included) of the
command and all its descendants, and reads how much memory the machine still has available
(the smaller of /proc/meminfo's MemAvailable and the cgroup's limit minus its usage). With
--floor-gib, a tree that leaves less than that available is stopped (SIGTERM, then SIGKILL)
before the kernel's out-of-memory killer picks a victim, and the report says so: a model that
does not fit is a measurement here, not a crash of the machine. Linux only (reads /proc). Writes
{"peak_rss_gib", "min_available_gib", "stopped_for_memory", "returncode", "seconds"} and exits
with the command's exit code. A benchmark helper: nothing here asserts a number.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

GIB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and every process below it (a snapshot of /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"
            with open(f"/proc/{pid}/statm") as f:
                rss[pid] = int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue  # gone between listing and reading
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total


def _cgroup_headroom() -> Optional[int]:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available_bytes() -> int:
    """What the machine (or its container's memory limit, if smaller) can still give."""
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    headroom = _cgroup_headroom()
    values = [v for v in (avail, headroom) if v is not None]
    return min(values) if values else 0


def run(cmd: list[str], interval: float, floor_gib: Optional[float]) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own group, so the whole tree can be stopped
    peak, low, stopped = 0, available_bytes(), False
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        avail = available_bytes()
        low = min(low, avail)
        if floor_gib is not None and avail < floor_gib * GIB and not stopped:
            stopped = True
            print(f"host_memory: {avail / GIB:.1f} GiB left (floor {floor_gib:g} GiB) with the run at "
                  f"{peak / GIB:.1f} GiB; stopping it", file=sys.stderr, flush=True)
            _stop(proc)
            break
        time.sleep(interval)
    code = proc.wait()
    return {"peak_rss_gib": round(peak / GIB, 2), "min_available_gib": round(low / GIB, 2),
            "stopped_for_memory": stopped, "returncode": code, "seconds": round(time.monotonic() - start, 1)}


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where the report goes")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--floor-gib", type=float, help="stop the run when less than this much host memory is left")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command: put it after --")
    report = run(cmd, args.interval, args.floor_gib)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"host_memory: peak {report['peak_rss_gib']:.2f} GiB resident, {report['min_available_gib']:.1f} GiB "
          f"available at the lowest{'; stopped for memory' if report['stopped_for_memory'] else ''}", flush=True)
    return report["returncode"] if report["returncode"] >= 0 else 128 - report["returncode"]


if __name__ == "__main__":
    sys.exit(main())
