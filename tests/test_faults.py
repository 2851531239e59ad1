"""Fault injection: the N-th filesystem write, fsync or rename of a run fails with ENOSPC or EIO, for every N.

Each run either succeeds with exactly the output of an undisturbed run (a failed cache write is only a
warning) or fails with one sentence and exit code 2, leaving nothing at --out and no temporary folder;
a rerun without faults then gives byte-identical output (for sweeps: identical points), so the cache
was left consistent. The counts of injected failure points are printed (run with -s to see them).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from repair.cli import main
from repair.runtime.durable import TMP_MARKER

WRITE_MODES = set("wax+")


class Faults:
    """Counts filesystem mutations and makes the ``fail_at``-th one raise ``OSError(code)``."""

    def __init__(self, fail_at: int | None = None, code: int = errno.ENOSPC):
        self.fail_at, self.code, self.count, self.failed = fail_at, code, 0, None
        self._lock = threading.Lock()

    def tick(self, what: str, safetensors_error: bool = False) -> None:
        with self._lock:
            self.count += 1
            if self.count == self.fail_at:
                self.failed = what
                if safetensors_error:  # how safetensors' writer reports an I/O error: not an OSError
                    from safetensors import SafetensorError

                    raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(self.code)} "
                                          f"(os error {self.code})")
                raise OSError(self.code, f"{os.strerror(self.code)} (injected)", what)


class _File:
    """A writable file whose first write goes through ``Faults`` (one failure point per file written)."""

    def __init__(self, f, faults: Faults, name: str):
        self._f, self._faults, self._name, self._written = f, faults, name, False

    def write(self, data):
        if not self._written:
            self._written = True
            self._faults.tick(f"write {self._name}")
        return self._f.write(data)

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


@contextmanager
def injected(faults: Faults):
    """Route open-for-writing, fsync, rename/replace, file copies and safetensors writes through ``faults``."""
    import safetensors.torch

    import repair.runtime.durable

    real_open, real_fsync, real_replace, real_rename = builtins.open, os.fsync, os.replace, os.rename
    real_copy, real_save, real_exchange = shutil.copyfile, safetensors.torch.save_file, repair.runtime.durable._exchange

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _File(f, faults, str(file)) if WRITE_MODES & set(mode) else f

    def counted(fn, what, safetensors_error: bool = False):
        def wrapper(*args, **kwargs):
            faults.tick(f"{what} {args[0] if args else ''}", safetensors_error)
            return fn(*args, **kwargs)
        return wrapper

    patches = [(builtins, "open", fake_open), (io, "open", fake_open), (os, "fsync", counted(real_fsync, "fsync")),
               (os, "replace", counted(real_replace, "replace")), (os, "rename", counted(real_rename, "rename")),
               (shutil, "copyfile", counted(real_copy, "copyfile")),
               (safetensors.torch, "save_file", counted(real_save, "save_file", safetensors_error=True)),
               (repair.runtime.durable, "_exchange", counted(real_exchange, "exchange"))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield faults
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the report's creation time is dropped (the one field that differs by design)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "repair_report.json":
                doc = json.loads(data)
                doc.pop("created", None)
                data = json.dumps(doc, sort_keys=True).encode()
            out[str(p.relative_to(folder))] = data
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARKER in p.name)


def check_run(res, out: Path, expected: dict[str, bytes] | None, faults: Faults) -> str:
    """'ok' (output as undisturbed) or 'refused' (one sentence, exit 3, nothing at --out); else an assertion."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (faults.failed, res.exception)
    assert leftovers(out.parent) == [], faults.failed
    if res.exit_code == 0:
        if expected is not None:
            assert tree_bytes(out) == expected, faults.failed
        return "ok"
    lines = [line for line in res.output.strip().splitlines() if line.startswith("Error:")]
    assert res.exit_code == 3 and len(lines) == 1 and "Traceback" not in res.output, (faults.failed, res.output)
    assert "injected" in lines[0] or "No space" in lines[0] or "Input/output" in lines[0], (faults.failed, lines)
    assert not out.exists(), faults.failed
    return "refused"


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_write_of_a_patch_can_fail(llama_base, llama_adapter, tmp_path, isolated_cache, capsys):
    args = ["patch", str(llama_base), str(llama_adapter), "--scale", "0.5", "--threads", "1", "--out"]
    baseline = tmp_path / "baseline"
    with injected(Faults()) as counter:
        res = CliRunner().invoke(main, [*args, str(baseline)])
    assert res.exit_code == 0, res.output
    expected, total = tree_bytes(baseline), counter.count
    assert total >= 20  # output shards, config copies, report, fsyncs, renames and cache entries
    outcomes: dict[str, int] = {}
    for n in range(1, total + 1):
        shutil.rmtree(isolated_cache, ignore_errors=True) if n % 3 == 0 else None  # cold and warm caches alike
        out = tmp_path / f"out-{n}"
        faults = Faults(n, errno.ENOSPC if n % 2 else errno.EIO)
        with injected(faults):
            res = CliRunner().invoke(main, [*args, str(out)])
        kind = check_run(res, out, expected, faults)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        rerun = tmp_path / f"rerun-{n}"
        res = CliRunner().invoke(main, [*args, str(rerun)])
        assert res.exit_code == 0 and tree_bytes(rerun) == expected, (faults.failed, res.output)
        shutil.rmtree(rerun)
        shutil.rmtree(out, ignore_errors=True)
    with capsys.disabled():
        print(f"\nrepair patch: {total} injected failure points, all held ({outcomes})")
    assert outcomes.get("refused", 0) > 0


def _points(report: dict) -> list[tuple]:
    return [(p["label"], p["scale"], p["accuracy"], p["forgetting_nll"], p["intruders"])
            for p in [report["base"], report["tuned"], *report["points"]]]


def test_every_write_of_a_sweep_can_fail_and_a_resumed_run_gives_the_same_points(
        llama_base, llama_adapter, mc_task, corpus_file, tmp_path, isolated_cache, capsys):
    args = ["sweep", str(llama_base), str(llama_adapter), "--scales", "0", "--task", str(mc_task), "--limit", "4",
            "--forgetting", str(corpus_file), "--control", "none", "--threads", "1", "--out"]  # controls: test_controls
    with injected(Faults()) as counter:
        res = CliRunner().invoke(main, [*args, str(tmp_path / "baseline")])
    assert res.exit_code == 0, res.output
    expected, total = _points(json.loads((tmp_path / "baseline" / "sweep.json").read_text())), counter.count
    outcomes: dict[str, int] = {}
    for n in range(1, total + 1):
        out = tmp_path / f"out-{n}"
        faults = Faults(n, errno.ENOSPC if n % 2 else errno.EIO)
        with injected(faults):
            res = CliRunner().invoke(main, [*args, str(out)])
        assert res.exception is None or isinstance(res.exception, SystemExit), (faults.failed, res.exception)
        assert not [p for p in out.rglob("*") if TMP_MARKER in p.name], faults.failed
        if res.exit_code == 0:
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        else:
            lines = [line for line in res.output.strip().splitlines() if line.startswith("Error:")]
            assert res.exit_code == 3 and len(lines) == 1, (faults.failed, res.output)
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            res = CliRunner().invoke(main, [*args, str(out)])  # resumes from the points that were written
            assert res.exit_code == 0, (faults.failed, res.output)
        assert _points(json.loads((out / "sweep.json").read_text())) == expected, faults.failed
        shutil.rmtree(out)
    with capsys.disabled():
        print(f"\nrepair sweep: {total} injected failure points, all held ({outcomes})")
    assert outcomes.get("refused", 0) > 0
