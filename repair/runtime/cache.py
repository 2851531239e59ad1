"""The cache folder, its layout in one place: what it holds, how large each part is, and clearing it.

    spectra/<hash>.safetensors   base spectra, keyed by tensor content (repair.spectral.store)
    adapters/<hash>.json         adapter configs as peft resolved them (repair.adapters.settings)
    file-hashes.json             sha256 of large input files, by path, size and mtime (repair.io.checkpoint)
    models/<name>/               embedded models, and GGUF inputs (gguf-<sha256>), converted to safetensors (repair.io.sources)
    tasks/<name>/, corpora/      materialised lm-eval tasks and forgetting corpora (repair.train.taskgen, evals)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import BaseModel

SPECTRA, ADAPTERS, HASH_MEMO, MODELS, TASKS, CORPORA = (
    "spectra", "adapters", "file-hashes.json", "models", "tasks", "corpora")
COMPUTED = (SPECTRA, ADAPTERS, HASH_MEMO)  # recomputed on demand: safe to delete


def cache_dir() -> Path:
    """The tool's cache: ``$INTRUDER_REPAIR_CACHE``, else ``$XDG_CACHE_HOME/intruder-repair``."""
    if env := os.environ.get("INTRUDER_REPAIR_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intruder-repair"


def cache_path(part: str, *names: str) -> Path:
    """A path in the cache: ``cache_path(SPECTRA)``, ``cache_path(MODELS, "smollm2-135m")``."""
    return cache_dir().joinpath(part, *names)


class CachePart(BaseModel):
    name: str
    entries: int
    bytes: int


class CacheReport(BaseModel):
    folder: str
    parts: list[CachePart]

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def describe(self, with_models: bool) -> str:
        parts = [p for p in self.parts if with_models or p.name != MODELS]
        size = sum(p.bytes for p in parts) / 2**20
        return f"{sum(p.entries for p in parts)} entries ({size:.1f} MiB: {', '.join(p.name for p in parts)})"

    def render(self) -> str:
        lines = [f"Cache: {self.folder}", f"{'part':<18}{'entries':>9}{'MiB':>10}"]
        lines += [f"{p.name:<18}{p.entries:>9}{p.bytes / 2**20:>10.1f}" for p in self.parts]
        lines.append(f"{'total':<18}{sum(p.entries for p in self.parts):>9}{self.total_bytes / 2**20:>10.1f}")
        return "\n".join(lines)


def _size(path: Path) -> tuple[int, int]:
    """(entries, bytes) of a file or a folder's top-level entries."""
    if path.is_file():
        return 1, path.stat().st_size
    if not path.is_dir():
        return 0, 0
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]  # temporaries are hidden, not entries
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return len(entries), size


def cache_report(folder: Path | None = None) -> CacheReport:
    folder = folder or cache_dir()
    parts = [CachePart(name=name, entries=n, bytes=b)
             for name in (*COMPUTED, MODELS) for n, b in [_size(folder / name)]]
    return CacheReport(folder=str(folder), parts=parts)


def clear_cache(with_models: bool = False, folder: Path | None = None) -> int:
    """Delete the computed parts (and converted models if asked); returns the bytes freed."""
    folder = folder or cache_dir()
    freed = 0
    for name in (*COMPUTED, *([MODELS] if with_models else [])):
        path = folder / name
        freed += _size(path)[1]
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return freed
