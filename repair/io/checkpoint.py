"""Checkpoint I/O: lazy, memory-bounded reading of safetensors checkpoints.

Like mergekit's ``LazyTensorLoader``, a reader keeps at most one shard open and loads one
tensor at a time, so a model is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from repair.errors import CheckpointError
from repair.runtime.cache import HASH_MEMO, cache_path

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


MEMO_MIN_BYTES = 64 << 20  # files this large have their hash remembered


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
    return cache_path(HASH_MEMO)


def _hash_memo() -> dict:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_hash(key: str, stamp: str, digest: str) -> None:
    from repair.runtime.durable import write_text_atomic

    memo = _hash_memo()
    memo[key] = {"stamp": stamp, "sha256": digest}
    try:
        write_text_atomic(_memo_path(), json.dumps(memo, indent=1, sort_keys=True))
    except OSError as e:
        logger.debug("could not remember the hash of %s (%s)", key, e)


def allowed_roots(folder: Path) -> list[Path]:
    """Where a checkpoint folder's files may live: the folder itself and, for a snapshot in the Hugging
    Face cache (``models--org--name/snapshots/<rev>``), that repository's blob store, which its symlinks name."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (blobs := real.parent.parent / "blobs").is_dir():
        roots.append(blobs.resolve())
    return roots


def confined(folder: Path, entry: str | Path, what: str) -> Path:
    """``folder / entry``, if both the name and its target (symlinks followed) stay inside ``allowed_roots``.

    A checkpoint from a stranger must not make the tool read (and a patch then copy into a release)
    files from elsewhere on the machine; anything else is refused, naming the entry.
    """
    if not isinstance(entry, str | Path):
        raise CheckpointError(f"{what}: expected file names, got {entry!r}.")
    path = folder / entry
    inside = Path(os.path.normpath(folder.absolute() / entry))
    if Path(entry).is_absolute() or not inside.is_relative_to(Path(os.path.normpath(folder.absolute()))):
        raise CheckpointError(f"{what}: {str(entry)!r} points outside the checkpoint folder {folder}; refused.")
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in allowed_roots(folder)):
        raise CheckpointError(f"{what}: {str(entry)!r} is a link to {target}, outside the checkpoint folder "
                              f"{folder}; refused.")
    return path


def _weight_map_from_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        items = weight_map.items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (expected JSON with a 'weight_map').") from e
    return {name: confined(index.parent, fname, str(index)) for name, fname in items}


def _safetensors_files(folder: Path, prefix: str) -> list[Path]:
    found = sorted(p for p in folder.glob(f"{prefix}*.safetensors") if p.is_file())
    return [confined(folder, p.name, str(folder)) for p in found]


def _pickle_files(folder: Path, prefix: str, allow_pickle: bool) -> list[Path]:
    pickles = sorted(p for p in folder.glob(f"*{prefix}*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    pickles = [confined(folder, p.name, str(folder)) for p in pickles]
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
    except torch.OutOfMemoryError:
        raise
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
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
                return _weight_map_from_index(confined(self.path, indexes[0].name, str(self.path)))
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

    def get_expert(self, name: str, index: int) -> torch.Tensor:
        """Slice ``index`` of a 3-D tensor (one expert of a fused tensor), reading only that slice."""
        path = self._files.get(name)
        if path is None:
            raise CheckpointError(f"{self.path}: has no tensor named {name!r}.")
        try:
            with self._lock:
                handle = self._open(path)
                if isinstance(handle, _PickleHandle):
                    return handle.get_tensor(name)[index].clone()
                return handle.get_slice(name)[index]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {name!r}, expert {index}, could not be read ({e}).") from e


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
