"""Checkpoint writing: sharded safetensors by byte budget, index json, atomic output folders.

Like mergekit's ``TensorWriter``: tensors are buffered until the shard budget is reached, each
shard is flushed as it fills, and the index is written at the end. Callers write into the temporary
folder of ``durable.atomic_output_dir``, which is renamed into place only once it is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from repair.errors import RepairError
from repair.runtime.durable import save_safetensors

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or float(m[1]) <= 0:
        raise RepairError(f"max_shard_size: expected a size such as 500MB or 5GB, got {text!r}.")
    return int(float(m[1]) * _UNITS[(m[2] or "B").lower()])


class TensorWriter:
    """Writes tensors into ``{prefix}-0000i-of-0000N.safetensors`` shards plus an index json.

    A checkpoint that fits one shard is written as ``{prefix}.safetensors`` with no index,
    as transformers does. ``metadata`` goes into every shard's header.
    """

    def __init__(self, folder: Path, prefix: str = "model", max_shard_size: int = 5 * 10**9,
                 metadata: dict[str, str] | None = None):
        self.folder, self.prefix, self.budget = Path(folder), prefix, max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered_bytes = 0
        self._shards: list[list[str]] = []
        self.total_size = 0

    def save(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered_bytes + size > self.budget:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous()
        self._buffered_bytes += size
        self.total_size += size

    def _shard_path(self, i: int) -> Path:
        return self.folder / f"{self.prefix}-{i + 1:05d}.safetensors.part"

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self._shard_path(len(self._shards))
        save_safetensors(self._buffer, path, self.metadata)
        sort_metadata_keys(path)
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered_bytes = {}, 0

    def finalize(self) -> list[Path]:
        """Flush the last shard, give shards their final names and write the index."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            final = [self.folder / f"{self.prefix}.safetensors"]
        else:
            final = [self.folder / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, path in enumerate(final):
            os.replace(self._shard_path(i), path)
        if n > 1:
            weight_map = {name: final[i].name for i, names in enumerate(self._shards) for name in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def check_output_dir(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an --out that is non-empty (without --overwrite) or that overlaps an input."""
    out_r = out.resolve()
    for p in inputs:
        p_r = p.resolve()
        if out_r == p_r or p_r in out_r.parents or out_r in p_r.parents:
            raise RepairError(f"out {out}: overlaps the input {p}; inputs are never modified.")
    if out.exists() and not out.is_dir():
        raise RepairError(f"out {out}: exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RepairError(f"out {out}: folder exists and is not empty; pass --overwrite to replace it.")


def sort_metadata_keys(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` with sorted keys, so equal inputs give equal bytes.

    safetensors serialises metadata from a Rust HashMap in random order (safetensors#584); the
    sorted object has exactly the same length, so it is swapped in place.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        top = json.loads(header, object_pairs_hook=lambda pairs: pairs)  # keeps the written order
        written = dict(next((v for k, v in top if k == "__metadata__"), []))
        if len(written) < 2:
            return
        old = json.dumps(written, separators=(",", ":"), ensure_ascii=False).encode()
        new = json.dumps(dict(sorted(written.items())), separators=(",", ":"), ensure_ascii=False).encode()
        at = header.find(old)
        if at < 0 or len(old) != len(new):
            logger.warning("%s: could not canonicalise the metadata order", path)
            return
        f.seek(8 + at)
        f.write(new)
