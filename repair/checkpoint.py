"""Checkpoint I/O: lazy, memory-bounded reading of safetensors checkpoints.

Like mergekit's ``LazyTensorLoader``, a reader keeps at most one shard open and loads one
tensor at a time, so a model is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


MEMO_MIN_BYTES = 64 << 20  # files this large have their hash remembered
HASH_MEMO = "file-hashes.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    For large files the result is remembered in the cache folder under the file's path, size,
    modification time and inode (as git's index does), so provenance does not re-read a model
    that has not changed.
    """
    path = Path(path)
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    memo = _hash_memo() if st.st_size >= MEMO_MIN_BYTES else None
    key = str(path.resolve())
    if memo is not None and memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    if memo is not None:
        _store_hash(key, stamp, h.hexdigest())
    return h.hexdigest()


def _memo_path() -> Path:
    from .sources import cache_dir

    return cache_dir() / HASH_MEMO


def _hash_memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_hash(key: str, stamp: str, digest: str) -> None:
    from .report import write_text_atomic

    memo = _hash_memo()
    memo[key] = {"stamp": stamp, "sha256": digest}
    try:
        write_text_atomic(_memo_path(), json.dumps(memo, indent=1, sort_keys=True))
    except OSError as e:
        logger.debug("could not remember the hash of %s (%s)", key, e)


def _weight_map_from_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (expected JSON with a 'weight_map').") from e
    return {name: index.parent / fname for name, fname in weight_map.items()}


def _safetensors_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"{prefix}*.safetensors") if p.is_file())


def _pickle_files(folder: Path, prefix: str, allow_pickle: bool) -> list[Path]:
    pickles = sorted(p for p in folder.glob(f"*{prefix}*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise CheckpointError(f"{folder}: no *.safetensors checkpoint found.")
    if not allow_pickle:
        raise CheckpointError(
            f"{folder}: holds only pickle checkpoints ({', '.join(p.name for p in pickles[:3])}); loading "
            "pickle can run arbitrary code, so it is refused unless you pass --allow-pickle."
        )
    logger.warning("%s: loading pickle checkpoints because --allow-pickle was given", folder)
    return pickles


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only refuses arbitrary objects; mmap keeps memory bounded
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e}).") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


RELEASE_BYTES = 16 << 20  # unmap the shard after reading a tensor at least this large


class CheckpointReader:
    """Reads tensors by name from a safetensors file, a folder, or a sharded folder with an index.

    ``prefix`` selects the file family inside a folder (``"model"`` for full checkpoints,
    ``"adapter_model"`` for PEFT adapters); an empty prefix takes every ``*.safetensors``.
    """

    def __init__(self, path: Path | str, prefix: str = "", allow_pickle: bool = False):
        self.path = Path(path)
        self._lock = threading.RLock()  # one open shard, shared by worker threads
        self._open_path: Path | None = None
        self._handle = None
        self._files: dict[str, Path] = self._discover(prefix, allow_pickle)

    def _discover(self, prefix: str, allow_pickle: bool) -> dict[str, Path]:
        if self.path.is_file():
            files = [self.path]
        else:
            indexes = sorted(self.path.glob(f"{prefix}*.safetensors.index.json"))
            if indexes:
                return _weight_map_from_index(indexes[0])
            files = _safetensors_files(self.path, prefix) or _pickle_files(self.path, prefix, allow_pickle)
        mapping: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():
                if name in mapping:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {mapping[name]}.")
                mapping[name] = f
        return mapping

    def _open(self, path: Path):
        if self._open_path != path:
            self._handle = None  # release the previous shard before mapping the next
            try:
                if path.suffix in PICKLE_SUFFIXES:
                    self._handle = _PickleHandle(_load_pickle(path))
                else:
                    self._handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
            self._open_path = path
        return self._handle

    @property
    def files(self) -> list[Path]:
        """The distinct files behind this checkpoint, in a stable order."""
        return sorted(set(self._files.values()))

    def names(self) -> list[str]:
        """Tensor names, grouped by shard so iteration opens each shard once."""
        return sorted(self._files, key=lambda n: (str(self._files[n]), n))

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._open(self._files[name]).get_slice(name).get_shape())

    def float32_bytes(self, name: str) -> int:
        """Size of a tensor once read as float32, for batching by memory."""
        return 4 * math.prod(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a copy). After a large one the shard is unmapped, so the pages it touched stop
        counting towards this process's memory: reading a model tensor by tensor stays bounded."""
        path = self._files.get(name)
        if path is None:
            raise CheckpointError(f"{self.path}: has no tensor named {name!r}.")
        try:
            with self._lock:
                tensor = self._open(path).get_tensor(name)
                if tensor.nbytes >= RELEASE_BYTES and not isinstance(self._handle, _PickleHandle):
                    self._handle, self._open_path = None, None  # the next read maps it again (a header parse)
                return tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} could not be read ({e}).") from e


class _PickleHandle:
    """The subset of safetensors' ``safe_open`` API over an already-loaded state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def get_slice(self, name: str) -> SimpleNamespace:
        shape = list(self._state[name].shape)
        return SimpleNamespace(get_shape=lambda: shape)
