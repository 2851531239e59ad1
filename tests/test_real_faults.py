"""Faults from the kernel, not the injector: a full tmpfs (ENOSPC), a read-only bind mount (EROFS), and a cache
on a full disk. Needs root and mount(8), as CI has; elsewhere each test skips and says why."""

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from repair.cli import main
from repair.runtime.durable import TMP_MARKER


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is refused here ({res.stderr.strip() or res.returncode}); "
                    "CI runs as root, where it is allowed")


@pytest.fixture
def mounts(tmp_path):
    """``tmpfs(size)`` and ``read_only()`` mount points under tmp_path, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    made: list[Path] = []

    def tmpfs(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(made)}"
        point.mkdir()
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
        made.append(point)
        return point

    def read_only() -> Path:
        src, point = tmp_path / "ro-src", tmp_path / "ro"
        src.mkdir()
        point.mkdir()
        _mount("--bind", str(src), str(point))
        made.append(point)
        _mount("-o", "remount,bind,ro", str(point))
        return point

    yield tmpfs, read_only
    for point in reversed(made):
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path) -> None:
    """Take every free block of the file system under ``folder`` (unbuffered: the kernel's ENOSPC, at once)."""
    fd = os.open(folder / f"filler-{uuid.uuid4().hex}", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def refused(res, out: Path, words: str) -> None:
    """One sentence naming the cause, exit 3 (the machine refused the write), nothing at --out, no temporaries."""
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 3 and len(errors) == 1 and words in errors[0], res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError | TypeError)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if TMP_MARKER in p.name]


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_patch_onto_a_full_disk(llama_base, llama_adapter, mounts, fmt):
    tmpfs, _ = mounts
    out = tmpfs("64k") / "out"  # the merged tiny model is ~350 kB: the kernel says ENOSPC part way
    if fmt == "adapter":
        fill(out.parent)
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--format", fmt,
                                    "--out", str(out)])
    refused(res, out, "No space left on device")


def test_patch_onto_a_read_only_disk(llama_base, llama_adapter, mounts):
    _, read_only = mounts
    out = read_only() / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--out", str(out)])
    refused(res, out, "Read-only file system")


def test_sweep_onto_a_full_disk_keeps_nothing_half_written(llama_base, llama_adapter, mc_task, corpus_file, mounts):
    tmpfs, _ = mounts
    out = tmpfs("16k") / "sweep"
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--scales", "0", "--task",
                                    str(mc_task), "--limit", "4", "--forgetting", str(corpus_file), "--control", "none",
                                    "--out", str(out)])
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 3 and len(errors) == 1 and "No space left on device" in errors[0], res.output
    assert "Traceback" not in res.output
    assert not [p for p in out.parent.rglob("*") if TMP_MARKER in p.name]


def test_a_full_cache_is_a_warning_and_a_run_without_it(llama_base, llama_adapter, mounts, monkeypatch, tmp_path):
    tmpfs, _ = mounts
    cache = tmpfs("32k")
    fill(cache)
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(cache / "cache"))
    with_cache, without = tmp_path / "full.json", tmp_path / "none.json"
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(llama_adapter), "--json", str(with_cache)])
    assert res.exit_code == 0, res.output
    ok = CliRunner().invoke(main, ["detect", str(llama_base), str(llama_adapter), "--no-cache", "--json", str(without)])
    assert ok.exit_code == 0, ok.output
    def intruders(path: Path) -> dict:
        return {m["name"]: m["intruders"] for m in json.loads(path.read_text())["matrices"]}

    assert intruders(with_cache) == intruders(without) and any(intruders(without).values())
    assert not [p for p in cache.rglob("*") if TMP_MARKER in p.name]
