"""Run ``repair`` and SIGKILL the process at a chosen moment of its writing: deterministic crash points.

``python tests/crash.py KIND N ARGS...`` runs ``repair ARGS...`` and kills itself at the N-th event of KIND:
``torn-shard`` (a safetensors file written, then cut to half its size: a torn write), ``fsync``, ``rename``,
``replace`` (just before the call) or ``publish`` (just before the rename or the renameat2 exchange that puts
an output folder in place). A SIGKILL is the same to the kernel wherever it comes from; sending it
from inside makes the moment exact on any machine, fast or slow. A run with fewer than N events exits 99.
"""

from __future__ import annotations

import os
import signal
import sys


def arm(kind: str, n: int) -> None:
    count = 0

    def hit() -> bool:
        nonlocal count
        count += 1
        return count == n

    if kind == "torn-shard":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            if hit():
                os.truncate(filename, os.path.getsize(filename) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = save_file
        return
    if kind == "publish":
        import repair.runtime.durable as durable

        for owner, name in ((os, "rename"), (durable, "_exchange")):
            setattr(owner, name, _before(getattr(owner, name), hit))
        return
    setattr(os, kind, _before(getattr(os, kind), hit))


def _before(real, hit):
    def before(*args, **kwargs):
        if hit():
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return before


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from repair.cli import main

    try:
        main(sys.argv[3:], prog_name="repair")
    except SystemExit as done:
        sys.exit(99 if done.code in (0, None) else done.code)  # it finished: the crash point was never reached
