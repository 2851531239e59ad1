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


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a whole process; return (wall seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def repair(*args: str) -> list[str]:
    return [sys.executable, "-m", "repair.cli", *args]


def summary(values: list[float]) -> str:
    d = 3 if max(values) < 10 else 1
    return f"{statistics.median(values):8.{d}f} (min {min(values):.{d}f}, max {max(values):.{d}f})"


def ratio(peer: list[float], ours: list[float]) -> str:
    """peer / ours per repeat (runs were interleaved), as median (min, max)."""
    r = [p / o for p, o in zip(peer, ours, strict=True)]
    return f"{statistics.median(r):6.1f}x (min {min(r):.1f}x, max {max(r):.1f}x)"
