"""The tool's own progress: one line per stage and per measured point, on the ``repair.progress`` logger.

Library code calls :func:`stage` and :class:`Points`; the CLI shows the ``repair.progress`` lines on the
terminal (``repair.cli.terminal``) while other libraries' logs and bars go to a log file. Library users
see them by configuring logging (``logging.getLogger("repair.progress").setLevel(logging.INFO)``).
"""

from __future__ import annotations

import logging

progress_logger = logging.getLogger("repair.progress")


def stage(message: str) -> None:
    """One line for a stage of a long run (loading, detecting, writing)."""
    progress_logger.info("%s", message)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Points:
    """Counts measured points and prints one line per point when it is done, with an estimate of what is left
    (the mean time of the points measured so far, times the points still to measure)."""

    def __init__(self, total: int):
        self.total, self.done, self.measured_seconds, self.measured = total, 0, 0.0, 0

    def finished(self, label: str, result: str, seconds: float | None) -> None:
        """``seconds`` None: the point came from a finished earlier run."""
        self.done += 1
        if seconds is not None:
            self.measured += 1
            self.measured_seconds += seconds
        left = self.total - self.done
        eta = ""
        if left and self.measured:
            eta = f", about {duration(left * self.measured_seconds / self.measured)} left"
        took = "from the earlier run" if seconds is None else duration(seconds)
        stage(f"  [{self.done}/{self.total}] {label:<10} {result}  ({took}{eta})")

