"""Per-matrix work on every core, in order, with a bounded number of matrices in flight.

Each worker runs single-threaded torch, so two matrices' decompositions run side by side rather
than one decomposition fighting over threads. Readers are thread-safe; results come back in input
order, so reports and written checkpoints do not depend on scheduling.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from repair.errors import RepairError
from repair.runtime.cores import background_job, large_matrix

logger = logging.getLogger(__name__)
T = TypeVar("T")
LARGE_BYTES = 64 * 2**20  # float32 bytes from which a matrix runs alone on all threads (ordered_map's ``large``)
_CUDA_LINALG = threading.Lock()
_cuda_linalg_loaded = False
R = TypeVar("R")


def default_workers() -> int:
    return max(1, torch.get_num_threads())


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an unavailable device is a usage error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RepairError(f"device: {device!r} is not a torch device (expected auto, cpu or cuda).") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RepairError("device cuda: no CUDA device is available; use --device cpu.")
    if dev.type == "cuda":
        _load_cuda_linalg(dev)
    return dev


def _load_cuda_linalg(dev: torch.device) -> None:
    """Load torch's CUDA linear algebra library once, under a lock: torch loads it on first use, and two
    threads doing so at once fail with "lazy wrapper should be called at most once" (pytorch#90613)."""
    global _cuda_linalg_loaded
    with _CUDA_LINALG:
        if not _cuda_linalg_loaded:
            torch.linalg.qr(torch.eye(2, device=dev))
            _cuda_linalg_loaded = True


@contextmanager
def torch_threads(n: int):
    """Temporarily set torch's intra-op threads and the BLAS pools (numpy's OpenBLAS) to ``n``."""
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def _one_thread() -> None:
    """Worker start: one intra-op thread here too (OpenMP keeps the count per thread, so the setting made on
    the calling thread does not reach new workers, whose BLAS calls would otherwise use every core and round
    differently depending on what runs beside them)."""
    torch.set_num_threads(1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int = 2,
                large: Callable[[T], bool] | None = None) -> Iterator[R]:
    """``fn(item)`` for each item on ``workers`` threads, yielded in input order.

    At most ``workers + depth`` items are in flight (submitted and not yet handed back), which bounds
    memory to a few matrices. Items for which ``large`` is true run alone, after those before them,
    with ``workers`` intra-op threads: their products are big enough to use every core, and a large
    item running last on one thread would leave the others idle.
    """
    if workers <= 1:
        with torch_threads(1):  # per-matrix work is many small operations: extra threads only spin
            yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="repair", initializer=_one_thread) as pool:
        pending: deque = deque()
        try:
            for item in items:
                if large is not None and large(item):
                    while pending:
                        yield pending.popleft().result()
                    with torch_threads(workers), large_matrix(workers):
                        yield fn(item)
                    continue
                if len(pending) >= workers + depth:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, item))
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def in_background(fn: Callable[[], object]) -> Callable[[], None]:
    """Start ``fn`` on a daemon thread; the returned ``join`` re-raises its exception, if any."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with background_job():  # large products meanwhile leave it a core (``cores``)
                fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by join()
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True, name="repair-background")
    thread.start()

    def join() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return join


def ordered_batches(fn: Callable[[list[T]], list[R]], items: Iterable[T], workers: int,
                    size: Callable[[T], int], budget: int) -> Iterator[R]:
    """``fn`` over consecutive batches of at most ``budget`` (by ``size``), flattened in input order.

    Batches let the solver handle several matrices of one shape at once; the budget bounds memory.
    """
    def batches() -> Iterator[list[T]]:
        batch: list[T] = []
        total = 0
        for item in items:
            n = size(item)
            if batch and total + n > budget:
                yield batch
                batch, total = [], 0
            batch.append(item)
            total += n
        if batch:
            yield batch

    def large(batch: list[T]) -> bool:
        return sum(map(size, batch)) >= LARGE_BYTES

    for results in ordered_map(fn, batches(), workers, depth=0, large=large):
        yield from results
