"""`repair patch` killed with SIGKILL mid-write leaves nothing new at --out, and a rerun gives the same bytes.

The kill comes at exact moments (tests/crash.py): after the first or a middle shard is torn in half, before
an fsync, before the rename (or, under --overwrite, the exchange) that publishes the folder. A kill timed from outside depended on how fast the
machine writes; these do not, so the test neither skips nor fails on a fast disk.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults import tree_bytes

from repair.cli import main
from repair.runtime.durable import TMP_MARKER

CRASH = Path(__file__).with_name("crash.py")
SHARD = "40KB"  # the tiny llama's 0.6 MB of weights in about 15 shards


def _patch(base, adapter, out, scale="0", *extra) -> list[str]:
    return ["patch", str(base), str(adapter), "--scale", scale, "--out", str(out), "--max-shard-size", SHARD,
            "--threads", "1", "--no-cache", *extra]  # no cache: every write is the output's


def _crash(args: list[str], crash: tuple[str, int]) -> subprocess.CompletedProcess:
    """The run killed at ``crash``: a process of its own (the test's own runs are in-process, which is quicker)."""
    cmd = [sys.executable, str(CRASH), *map(str, crash), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _run(args: list[str]) -> int:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.exit_code


@pytest.fixture(scope="module")
def expected(llama_base, llama_adapter, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The output of undisturbed runs at λ=0 and at λ=0.5, by λ."""
    folder = tmp_path_factory.mktemp("undisturbed")
    out = {}
    for scale in ("0", "0.5"):
        _run(_patch(llama_base, llama_adapter, folder / scale, scale))
        out[scale] = tree_bytes(folder / scale)
    assert sum(name.endswith(".safetensors") for name in out["0"]) >= 6
    return out


CRASHES = [("torn-shard", 1), ("torn-shard", 5), ("fsync", 12), ("publish", 1)]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("crash", CRASHES, ids=[f"{k}-{n}" for k, n in CRASHES])
def test_sigkill_mid_write_leaves_no_output(llama_base, llama_adapter, expected, tmp_path, crash, overwrite):
    out = tmp_path / "out"
    extra = ["--overwrite"] if overwrite else []
    if overwrite:  # an earlier output at λ=0.5 is there: it must survive the crash whole
        _run(_patch(llama_base, llama_adapter, out, "0.5"))
    killed = _crash(_patch(llama_base, llama_adapter, out, "0", *extra), crash)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    if overwrite:
        assert tree_bytes(out) == expected["0.5"]
    else:
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers and all(TMP_MARKER in n and n.startswith(".") for n in leftovers)  # hidden, named to spot
    _run(_patch(llama_base, llama_adapter, out, "0", *extra))
    assert tree_bytes(out) == expected["0"]
