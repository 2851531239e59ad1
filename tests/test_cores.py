"""Cores shared between a large matrix's products and background work (repair/runtime/cores.py)."""

from __future__ import annotations

import threading

import torch

from repair.runtime import cores
from repair.runtime.pipeline import in_background, ordered_map


def test_large_matrix_leaves_a_core_to_each_background_job():
    old = torch.get_num_threads()
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)

    with cores.large_matrix(3):
        assert torch.get_num_threads() == 3
        join = in_background(job)
        assert started.wait(10)
        cores.share()
        assert torch.get_num_threads() == 2  # one background job: one thread fewer
        release.set()
        join()
        cores.share()
        assert torch.get_num_threads() == 3  # the job is done: every thread again
    assert torch.get_num_threads() == old


def test_share_touches_only_the_thread_running_a_large_matrix():
    old = torch.get_num_threads()
    with cores.background_job():
        cores.share()  # no large matrix on this thread: nothing changes
        assert torch.get_num_threads() == old
        with cores.large_matrix(1):
            cores.share()
            assert torch.get_num_threads() == 1  # never below one
    assert torch.get_num_threads() == old


def test_ordered_map_runs_large_items_with_the_share():
    seen = []

    def fn(x: int) -> int:
        cores.share()
        seen.append(torch.get_num_threads())
        return x * x

    with cores.background_job():
        out = list(ordered_map(fn, [1, 2, 3], workers=2, large=lambda x: x == 2))
    assert out == [1, 4, 9]
    assert seen[1] == 1  # the large item: two threads less the background job's
