"""Exceptions that the CLI turns into one clear sentence and a documented exit code.

2: the input or the command is wrong (fix the command); 3: the machine refused a write (fix the runner:
disk full, read-only, permissions, I/O errors). A bug is neither: a traceback (``--debug``) and exit 1.
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
