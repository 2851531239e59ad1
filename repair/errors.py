"""Exceptions that the CLI turns into one clear sentence and a documented exit code.

2: the input or the command is wrong (fix the command), found before any model is loaded where it can be; 3: the
machine refused a write (fix the runner: disk full, read-only, permissions, I/O errors); 1: a gate failed, or a
long run failed once its work had begun (``RunFailed``). A bug is a traceback (``--debug``) and exit 1.
"""


class RepairError(Exception):
    """A problem with the user's input: exit code 2, no traceback."""

    exit_code = 2


class CheckpointError(RepairError):
    """A checkpoint or adapter could not be read or does not fit its base."""


class SourceError(RepairError):
    """A model reference (path, hub id or embedded name) could not be resolved."""


class OutputError(RepairError):
    """The output could not be written (disk full, read-only file system, permission, I/O error): exit code 3.
    Nothing is left half-written; the same command succeeds where the disk allows it."""

    exit_code = 3


class RunFailed(RepairError):
    """A long run failed after its work began (the input had passed every check): exit code 1, one sentence that
    says what was kept, e.g. a sweep's measured points, so that the same command resumes."""

    exit_code = 1
