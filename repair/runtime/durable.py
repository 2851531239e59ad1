"""Durable, atomic writes: a file or a folder appears complete under its name, or not at all.

Everything is written under a temporary name in the destination's own folder, flushed to disk
(fsync of the file and of the folder), given the modes the umask asks for, and renamed into place;
the parent folder is synced after the rename, so a power loss right after "done" cannot leave an
empty file behind the new name. Replacing an output folder swaps it with a single rename
(``renameat2(RENAME_EXCHANGE)`` on Linux), so something complete is at ``--out`` at every moment.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from repair.errors import RepairError

logger = logging.getLogger(__name__)

TMP_MARKER = ".intruder-repair-tmp-"  # in every temporary name: a leftover is recognisable as one
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, with its I/O failures raised as the ``OSError`` they are: safetensors
    reports a full disk, a read-only one or EIO as ``SafetensorError("... (os error 28)")``, which no
    ``except OSError`` catches."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        if (m := _OS_ERROR.search(str(e))) is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, path: Path) -> None:
    """Make a complete temporary file durable, give it the umask's mode (not mkstemp's 0600) and rename it
    to ``path`` in the same folder."""
    fsync_file(tmp)
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` durably and atomically, with the umask's usual mode (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        publish_file(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_tree(folder: Path) -> None:
    """Set the umask's modes on a folder made with mkdtemp, and fsync every file and folder in it."""
    for p in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        _set_mode(p, umask_mode(p.is_dir()))
        (fsync_dir if p.is_dir() else fsync_file)(p)
    _set_mode(folder, umask_mode(True))
    fsync_dir(folder)


def _set_mode(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` where it has another (most files were created with it already)."""
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths with one atomic rename; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete ``tmp`` to ``out``; replace an existing ``out`` only with ``overwrite``.

    If the folder cannot be synced after the rename, the rename is undone (the old output, if any, is
    back at ``out``) and the error raised: a failure never leaves an output that may not survive a crash.
    """
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise RepairError(f"out {out}: something was written there during the run; nothing was replaced "
                              "(pass --overwrite to replace it).")
        shutil.rmtree(_swap(tmp, out), ignore_errors=True)  # the old output, swapped out
        return
    os.rename(tmp, out)  # onto nothing, or onto an empty folder (fails if one was filled meanwhile)
    try:
        fsync_dir(out.parent)
    except OSError:
        os.rename(out, tmp)
        raise


def _swap(tmp: Path, out: Path) -> Path:
    """Put ``tmp`` (new) in place of ``out`` (old) and sync; return where the old output now is. Once the new
    output is in place and synced nothing can fail: removing the old one is the caller's cleanup."""
    if _exchange(tmp, out):
        try:
            fsync_dir(out.parent)
        except OSError:
            _exchange(tmp, out)  # the old output back in place; the caller removes the new one
            raise
        return tmp
    aside = out.with_name(f".{out.name}{TMP_MARKER}old-{os.getpid()}")  # no atomic swap here: a moment apart
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError:
        if out.exists():
            os.replace(out, tmp)
        os.replace(aside, out)
        raise
    return aside


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``out``, on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    try:
        yield tmp
        sync_tree(tmp)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
