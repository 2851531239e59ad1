"""Exceptions that the CLI turns into one clear sentence and a non-zero exit."""


class RepairError(Exception):
    """A problem with the user's input: exit code 2, no traceback."""

    exit_code = 2


class CheckpointError(RepairError):
    """A checkpoint or adapter could not be read or does not fit its base."""


class SourceError(RepairError):
    """A model reference (path, hub id or embedded name) could not be resolved."""
