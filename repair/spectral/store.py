"""The cache of base spectra: safetensors files keyed by the base tensor's content hash.

    <key>.safetensors       complete spectrum (exact path): Σ0 and the smaller side's full basis
    <key>-top.safetensors   truncated spectrum (certified path): the top p triplets, p recorded

Every adapter, sweep and figure of one base reuses them. A truncated entry with fewer directions
than a run needs is recomputed with more and replaced. Writes are atomic (temporary file, then
rename); an unreadable entry is recomputed, and a failure to store one only logs a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from repair.runtime.cache import SPECTRA, cache_path
from repair.runtime.durable import TMP_MARKER, publish_file, save_safetensors
from repair.spectral.spectra import SPECTRA_VERSION, BaseSpectrum, compute_spectrum, tensor_key
from repair.spectral.truncated import TruncatedSpectrum, compute_truncated

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TOP = "-top"


class SpectraCache:
    """A folder of spectra. ``folder=None`` disables caching."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.computed: set[str] = set()  # entries decomposed by this process
        self.loaded: set[str] = set()  # entries read back from disk

    @property
    def stats(self) -> dict[str, int]:
        """How many spectra this process computed, and how many it reused from earlier runs."""
        return {"computed": len(self.computed), "reused": len(self.loaded - self.computed)}

    @classmethod
    def default(cls) -> SpectraCache:
        return cls(cache_path(SPECTRA))

    def path(self, entry: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{entry}{SUFFIX}"

    def __contains__(self, entry: str) -> bool:
        return self.folder is not None and self.path(entry).is_file()

    def _read(self, entry: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        if self.folder is None or not self.path(entry).is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path(entry)), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        except (SafetensorError, OSError, ValueError, KeyError) as e:  # truncated or foreign: recomputed
            logger.warning("%s: unreadable cache entry (%s); recomputing it", self.path(entry), e)
            return None

    def _write(self, entry: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Store atomically (write a temporary file, then rename); I/O errors only log a warning."""
        if self.folder is None:
            return
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{entry}{TMP_MARKER}", suffix=SUFFIX)
            os.close(fd)
            save_safetensors(tensors, tmp, {**meta, "version": SPECTRA_VERSION})
            publish_file(Path(tmp), self.path(entry))
        except OSError as e:
            logger.warning("%s: could not store a base spectrum (%s); continuing without caching", self.folder, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _lookup(self, entry: str, build: Callable):
        """``build(tensors, meta)`` of the stored entry, or None when absent, damaged or foreign."""
        found = self._read(entry)
        if found is None:
            return None
        try:
            value = build(*found)
        except (KeyError, ValueError) as e:
            logger.warning("%s: unreadable cache entry (%s); recomputing it", self.path(entry), e)
            return None
        self.loaded.add(entry)
        return value

    def get(self, key: str) -> BaseSpectrum | None:
        """The stored complete spectrum in the stored tensor's orientation, or None."""
        return self._lookup(key, lambda t, meta: BaseSpectrum(
            t["S"], t["Z"], meta["side"], tuple(int(x) for x in meta["shape"].split(","))))

    def put(self, key: str, spec: BaseSpectrum) -> None:
        meta = {"side": spec.side, "shape": f"{spec.shape[0]},{spec.shape[1]}"}
        self._write(key, {"S": spec.S.contiguous(), "Z": spec.Z.contiguous()}, meta)

    def compute(self, key: str, stored: torch.Tensor) -> BaseSpectrum:
        """Decompose a stored tensor completely and store the result under ``key``."""
        spec = compute_spectrum(stored)
        self.computed.add(key)
        self.put(key, spec)
        return spec

    def spectrum(self, stored: torch.Tensor, transposed: bool = False, key: str | None = None) -> BaseSpectrum:
        """The complete spectrum of a stored base tensor, from the cache or computed (and stored) now.

        ``transposed`` gives it in (out, in) orientation for tensors stored as (in, out).
        """
        key = key or tensor_key(stored)
        spec = self.get(key) or self.compute(key, stored)
        return spec.transposed() if transposed else spec

    def get_truncated(self, key: str, p: int) -> TruncatedSpectrum | None:
        """The stored truncated spectrum if it keeps at least ``p`` directions (or all there are)."""
        spec = self._lookup(key + TOP, TruncatedSpectrum.from_tensors)
        return spec if spec is not None and spec.serves(p) else None

    def has_truncated(self, key: str, p: int) -> bool:
        return key + TOP in self and self.get_truncated(key, p) is not None

    def compute_truncated(self, key: str, stored: torch.Tensor, p: int, device="cpu") -> TruncatedSpectrum:
        spec = compute_truncated(stored, p, device)
        self.computed.add(key + TOP)
        self._write(key + TOP, *spec.tensors())
        return spec

    def truncated(self, stored: torch.Tensor, p: int, transposed: bool = False, key: str | None = None,
                  device="cpu") -> TruncatedSpectrum:
        """The top-``p`` spectrum of a stored base tensor (on ``device``), cached or computed now."""
        key = key or tensor_key(stored)
        spec = self.get_truncated(key, p) or self.compute_truncated(key, stored, p, device)
        spec = spec.head(p).to(device)
        return spec.transposed() if transposed else spec
