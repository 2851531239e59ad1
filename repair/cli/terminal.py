"""The terminal during long commands: the tool's own progress and warnings; other libraries' logs, warnings and
progress bars (lm-eval, transformers, datasets, tqdm) go to a log file unless ``-v``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

OWN_LOGGERS = ("repair", "evals")


class _Own(logging.Filter):
    """Progress lines at INFO, the tool's own warnings and errors; nothing from other libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "repair.progress":
            return True
        return record.name.split(".")[0] in OWN_LOGGERS and record.levelno >= logging.WARNING


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "repair.progress":
            return record.getMessage()
        return f"{record.levelname.lower()}: {record.getMessage()}"


def verbosity() -> int:
    import click

    ctx = click.get_current_context(silent=True)
    return ctx.find_root().params.get("verbose", 0) if ctx is not None else 0


@contextmanager
def library_output_to(log: Path, verbose: int = 0) -> Iterator[None]:
    """While the block runs, route everything but the tool's own lines to ``log`` (appended).

    Both the Python streams and file descriptor 2 are redirected, so handlers and bars bound to stderr before
    the block, and native code, land in the log too. With ``verbose`` everything stays on the terminal, and the
    progress lines are shown as well.
    """
    root, progress = logging.getLogger(), logging.getLogger("repair.progress")
    if verbose:
        level = progress.level
        progress.setLevel(logging.INFO)
        try:
            yield
        finally:
            progress.setLevel(level)
        return
    saved = (root.handlers[:], root.level, progress.level, progress.propagate, sys.stderr)
    with _open_log(log) as fh:
        fd = _redirect_fd2(fh)
        console = _console(fd)
        to_file = logging.StreamHandler(fh)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        own = logging.StreamHandler(console)
        own.addFilter(_Own())
        own.setFormatter(_Plain())
        root.handlers = [to_file, own]
        root.setLevel(logging.INFO)
        progress.setLevel(logging.INFO)
        progress.propagate = True
        logging.captureWarnings(True)  # warnings.warn from libraries: into the log through py.warnings
        sys.stderr = fh
        try:
            yield
        finally:
            sys.stderr = saved[4]
            logging.captureWarnings(False)
            root.handlers, root.level = saved[0], saved[1]
            progress.setLevel(saved[2])
            progress.propagate = saved[3]
            fh.flush()  # a buffered write the disk refuses fails here, not at close
            if fh.failed is not None:
                console.write(f"warning: the run's log {log} is incomplete: the disk refused a write "
                              f"({fh.failed.strerror or fh.failed}).\n")
            if console is not saved[4]:
                console.close()
            _restore_fd2(fd)


class _LogStream:
    """The log file as other libraries' stderr: a write the disk refuses (full, read-only) is dropped and
    remembered, never raised into lm-eval's or tqdm's code; the run's own outputs report such a disk."""

    def __init__(self, fh):
        self._fh, self.failed = fh, None

    def write(self, text: str) -> int:
        try:
            return self._fh.write(text)
        except OSError as e:
            self.failed = self.failed or e
            return len(text)

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as e:
            self.failed = self.failed or e

    def close(self) -> None:
        self.flush()
        with suppress(OSError):
            self._fh.close()

    def fileno(self) -> int:
        return self._fh.fileno()

    def isatty(self) -> bool:
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def _open_log(log: Path) -> _LogStream:
    from repair.errors import OutputError

    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        return _LogStream(open(log, "a", encoding="utf-8"))
    except OSError as e:
        raise OutputError(f"out {log.parent}: the run's log {log.name} could not be written "
                          f"({e.strerror or e}); nothing was run.") from e


def _console(saved_fd: int | None):
    """Where the tool's own lines go: the terminal's stderr as it was before descriptor 2 moved (a test's
    captured ``sys.stderr`` that is no descriptor stays as it is)."""
    try:
        real = sys.stderr.fileno() == 2
    except (OSError, AttributeError, ValueError):  # io.UnsupportedOperation is an OSError
        real = False
    if not real or saved_fd is None:
        return sys.stderr
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _redirect_fd2(fh) -> int | None:
    """Point file descriptor 2 at the log; None where there is no descriptor 2 to move (an embedded caller)."""
    try:
        sys.__stderr__.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        return None
    fh.flush()
    try:
        os.dup2(fh.fileno(), 2)
    except OSError:
        os.close(saved)
        return None
    return saved


def _restore_fd2(saved: int | None) -> None:
    if saved is None:
        return
    with suppress(OSError, ValueError, AttributeError):
        sys.__stderr__.flush()
    os.dup2(saved, 2)
    os.close(saved)


def quietly(verbose: int, fn, *args):
    """``fn(*args)`` with other libraries' output kept aside (a first run's model fetch and conversion bars);
    returns ``(result, that output)`` for the caller to put in its log once it may write one."""
    import shutil
    import tempfile

    from repair.errors import OutputError

    try:
        tmp = Path(tempfile.mkdtemp(prefix="intruder-repair-"))
    except OSError as e:
        raise OutputError(f"TMPDIR {tempfile.gettempdir()}: no temporary folder could be made there "
                          f"({e.strerror or e}); free space there or point TMPDIR elsewhere.") from e
    try:
        log = tmp / "early.log"
        with library_output_to(log, verbose):
            result = fn(*args)
        return result, log.read_text() if log.is_file() else ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def start_log(log: Path, text: str) -> None:
    """Begin ``log`` with what was kept aside before the run could write anything."""
    if text:
        with _open_log(log) as fh:
            fh.write(text)
