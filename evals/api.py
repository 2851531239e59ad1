"""The public Python API of the harness: ``repair sweep`` and ``repair compare`` as functions, with their defaults."""

from __future__ import annotations

from pathlib import Path

from evals.comparison import CompareReport
from evals.results import SweepReport
from repair.api import detect_options


def sweep(base: str, tuned: str, out: str | Path, *, scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
          task: str | None = None, forgetting: str = "base-samples", limit: int | None = None,
          pick: str | None = None, write_picked: bool = False, batch_size: int = 8, allow_amplify: bool = False,
          dtype: str = "auto", device_map: str | None = None, **options) -> SweepReport:
    """Accuracy against forgetting for each λ, written to ``out``: ``repair sweep`` (options: ``DetectOptions``)."""
    from evals.sweeper import SweepOptions, run_sweep

    opts = SweepOptions(out=Path(out), scales=tuple(scales), task=task, forgetting=forgetting, limit=limit, pick=pick,
                        write_picked=write_picked, batch_size=batch_size, allow_amplify=allow_amplify,
                        detect=detect_options(options), dtype=dtype, device_map=device_map)
    return run_sweep(str(base), str(tuned), opts)


def compare(models: list[str], tasks: list[str], *, limit: int | None = None, base: str | None = None,
            forgetting: str | None = None, out: str | Path | None = None, batch_size: int = 8,
            device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> CompareReport:
    """Each model on each task (and forgetting) side by side: ``repair compare``."""
    from evals.comparison import run_compare
    from evals.models import Placement

    placement = Placement(device, dtype, device_map)
    placement.validate()
    return run_compare([str(m) for m in models], list(tasks), limit, base, forgetting,
                       Path(out) if out is not None else None, batch_size, placement)
