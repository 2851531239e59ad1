"""Shared helpers for the benchmarks: timed subprocesses with their peak RSS, and summary statistics."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# Linux carries a process's peak RSS into a child across fork and exec (getrusage(2): ru_maxrss is kept over
# execve; a child forked from this process starts from this process's size), so a benchmark that has just built
# a large checkpoint would report its own peak for every child. Each command therefore runs as the grandchild
# of a small, freshly exec'd launcher, which reports that grandchild's own peak on the pipe it is given.
LAUNCHER = ("import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.close(fd)\n"
            "    os.execvp(sys.argv[2], sys.argv[2:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "os.write(fd, str(usage.ru_maxrss).encode())\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a whole process; return (wall seconds, peak RSS in MiB) of that process alone."""
    read, write = os.pipe()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(write), *cmd],
                            env={**os.environ, **OFFLINE, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, pass_fds=(write,))
    os.close(write)
    err = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - start
    with os.fdopen(read) as f:
        peak_kib = f.read()
    if proc.returncode != 0 or not peak_kib:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, int(peak_kib) / 1024


def repair(*args: str) -> list[str]:
    return [sys.executable, "-m", "repair.cli", *args]


def summary(values: list[float]) -> str:
    d = 3 if max(values) < 10 else 1
    return f"{statistics.median(values):8.{d}f} (min {min(values):.{d}f}, max {max(values):.{d}f})"


def ratio(peer: list[float], ours: list[float]) -> str:
    """peer / ours per repeat (runs were interleaved), as median (min, max)."""
    r = [p / o for p, o in zip(peer, ours, strict=True)]
    return f"{statistics.median(r):6.1f}x (min {min(r):.1f}x, max {max(r):.1f}x)"
