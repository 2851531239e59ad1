"""A fault injector for the write path: every filesystem mutation a run performs is counted, and the N-th raises.

Counted, one failure point each: opening a file for writing (``open``, ``io.open``, ``os.fdopen``, ``os.open``
with a write flag), every ``write`` to such a file (not only the first), ``tempfile.mkstemp``/``mkdtemp``,
``os.mkdir`` (``Path.mkdir``), ``os.chmod``, ``os.fsync``, ``os.rename``/``os.replace``, ``shutil.copyfile``,
safetensors' ``save_file`` (failing as safetensors does, with ``SafetensorError``) and the renameat2 exchange.
Removals are not counted: they only ever clean up, and their failures are ignored by design.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from repair.runtime.durable import TMP_MARKER

WRITE_MODES = set("wax+")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

# The kinds every run that publishes a folder must reach: a matrix that never reaches one proves nothing about it.
PUBLISHING_KINDS = {"open", "fdopen", "write", "os.open", "mkstemp", "mkdtemp", "mkdir", "chmod", "fsync", "rename",
                    "replace"}


class Faults:
    """Counts filesystem mutations and makes the ``fail_at``-th one raise ``OSError(code)``."""

    def __init__(self, fail_at: int | None = None, code: int = errno.ENOSPC, exchange: bool = True):
        self.fail_at, self.code, self.count, self.failed = fail_at, code, 0, None
        self.exchange = exchange  # False: renameat2 reports "unsupported", as on a file system without it
        self.kinds: Counter[str] = Counter()
        self._lock = threading.Lock()

    def tick(self, kind: str, target: object = "", safetensors_error: bool = False) -> None:
        with self._lock:
            self.count += 1
            self.kinds[kind] += 1
            if self.count != self.fail_at:
                return
            self.failed = f"{kind} {target}"
        if safetensors_error:  # how safetensors' writer reports an I/O error: not an OSError
            from safetensors import SafetensorError

            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(self.code)} (os error {self.code})")
        raise OSError(self.code, f"{os.strerror(self.code)} (injected)", str(target))


class _File:
    """A file open for writing whose every ``write`` is a failure point."""

    def __init__(self, f, faults: Faults, name: str):
        self._f, self._faults, self._name = f, faults, name

    def write(self, data):
        self._faults.tick("write", self._name)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

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
    """Route every mutation listed in the module's docstring through ``faults``."""
    import safetensors.torch

    import repair.runtime.durable as durable

    real = {"open": builtins.open, "fdopen": os.fdopen, "os.open": os.open, "exchange": durable._exchange}

    def fake_open(file, mode="r", *args, **kwargs):
        writing = bool(WRITE_MODES & set(mode))
        if writing and not isinstance(file, int):  # os.fdopen comes here with an int: counted by fake_fdopen
            faults.tick("open", file)
        f = real["open"](file, mode, *args, **kwargs)
        return _File(f, faults, str(file)) if writing else f

    def fake_fdopen(fd, mode="r", *args, **kwargs):
        f = real["fdopen"](fd, mode, *args, **kwargs)
        if not WRITE_MODES & set(mode):
            return f
        faults.tick("fdopen", fd)
        return f if isinstance(f, _File) else _File(f, faults, f"fd {fd}")

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            faults.tick("os.open", path)
        return real["os.open"](path, flags, *args, **kwargs)

    def fake_exchange(a, b):
        faults.tick("exchange", b)
        return real["exchange"](a, b) if faults.exchange else False

    def counted(obj, name, kind, safetensors_error=False):
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            target = args[0] if args else kwargs.get("dir", "")
            faults.tick(kind, target, safetensors_error)
            return fn(*args, **kwargs)
        return obj, name, wrapper

    patches = [(builtins, "open", fake_open), (io, "open", fake_open), (os, "fdopen", fake_fdopen),
               (os, "open", fake_os_open), (durable, "_exchange", fake_exchange),
               counted(tempfile, "mkstemp", "mkstemp"), counted(tempfile, "mkdtemp", "mkdtemp"),
               counted(os, "mkdir", "mkdir"), counted(os, "chmod", "chmod"), counted(os, "fsync", "fsync"),
               counted(os, "replace", "replace"), counted(os, "rename", "rename"),
               counted(shutil, "copyfile", "copyfile"),
               counted(safetensors.torch, "save_file", "save_file", safetensors_error=True)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield faults
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; a JSON report's creation time is dropped (the one field that differs by design)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".json" and isinstance(doc := json.loads(data), dict) and "created" in doc:
                doc.pop("created")
                data = json.dumps(doc, sort_keys=True).encode()
            out[str(p.relative_to(folder))] = data
    return out


def leftovers(folder: Path, deep: bool = False) -> list[str]:
    """Temporary names left in ``folder`` (with ``deep``, anywhere under it)."""
    found = folder.rglob("*") if deep else folder.iterdir()
    return sorted(str(p.relative_to(folder)) for p in found if TMP_MARKER in p.name)


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """For an assertion message: each file that differs, with its first differing line."""
    out = sorted(f"{k}: missing or extra" for k in got.keys() ^ want.keys())
    for k in sorted(got.keys() & want.keys()):
        if got[k] != want[k]:
            a, b = got[k].splitlines(), want[k].splitlines()
            a, b = a + [b""] * (len(b) - len(a)), b + [b""] * (len(a) - len(b))  # the same length
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            out.append(f"{k} line {i}: {a[i][:200]!r} != {b[i][:200]!r}")
    return out
