"""Cores shared between a large matrix's products and work running in the background.

A large matrix runs alone on every intra-op thread (``pipeline.ordered_map``). Work started with
``pipeline.in_background`` (peft's import while the base spectra are computed, hashing inputs for
provenance) is one more busy thread: beside products that use every core it slows them more than
its own share, because each product waits for whichever of its threads the OS preempted. So while
background work runs, a large matrix's products use one thread fewer per background job (at least
one); the solvers call ``share()`` before each product, which adjusts torch's thread count only
on the thread running the large matrix, and only when the share changes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_busy = 0  # background jobs running now
_local = threading.local()  # .target: the threads this thread's large matrix was given; .now: set now


@contextmanager
def background_job() -> Iterator[None]:
    """Count the calling (background) thread as busy while the block runs."""
    global _busy
    with _lock:
        _busy += 1
    try:
        yield
    finally:
        with _lock:
            _busy -= 1


@contextmanager
def large_matrix(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads, less those background jobs take (see ``share``)."""
    old = torch.get_num_threads()
    _local.target, _local.now = threads, None
    try:
        share()
        yield
    finally:
        _local.target = _local.now = None
        torch.set_num_threads(old)


def share() -> None:
    """Set this thread's intra-op threads to its large matrix's share of the cores; nothing elsewhere."""
    target = getattr(_local, "target", None)
    if target is None:
        return
    n = max(1, target - _busy)
    if n != _local.now:
        torch.set_num_threads(n)
        _local.now = n
