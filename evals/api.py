"""The public Python API of the harness: ``repair sweep``, ``repair fit``, ``repair release``, ``repair compare``
and ``repair continual`` as functions, with their defaults."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.measure.accuracy import EvalSettings
from evals.measure.fit_report import FitReport
from evals.measure.results import SweepReport
from evals.release.model import ReleaseReport
from evals.runners.comparison import CompareReport
from evals.runners.continual import ContinualReport
from repair.api import detect_options


def sweep(base: str, tuned: str, out: str | Path, *, scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
          tasks: Sequence[str] = (), forgetting: str = "base-samples", limit: int | None = None,
          pick: str | None = None, write_picked: bool = False, overwrite: bool = False,
          control: str = "matched", per_matrix: int | None = None, batch_size: int | str = 8,
          allow_amplify: bool = False, dtype: str = "auto", device_map: str | None = None, format: str = "merged",
          num_fewshot: int | None = None, apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
          gen_kwargs: str | None = None, seed: int | None = None, log_samples: bool = False,
          **options) -> SweepReport:
    """Accuracy against forgetting for each λ, written to ``out``: ``repair sweep`` (options: ``DetectOptions``).
    ``tasks`` are lm-eval task names or local YAML paths; a single string is one task."""
    from evals.runners.sweeper import SweepOptions, run_sweep

    settings = EvalSettings(num_fewshot, apply_chat_template, fewshot_as_multiturn, gen_kwargs, seed, log_samples)
    opts = SweepOptions(out=Path(out), scales=tuple(scales), tasks=_tasks(tasks), forgetting=forgetting,
                        limit=limit, pick=pick, write_picked=write_picked, overwrite=overwrite, control=control,
                        per_matrix=per_matrix, batch_size=batch_size,
                        allow_amplify=allow_amplify, detect=detect_options(options), dtype=dtype,
                        device_map=device_map, eval=settings, format=format)
    return run_sweep(str(base), str(tuned), opts)


def fit(base: str, tuned: str, out: str | Path, *, tasks: Sequence[str], max_acc_drop: float,
        directions: str = "delta", format: str = "merged", forgetting: str = "base-samples",
        limit: int | None = None, calibration: str | Path | None = None, calibration_corpus: str = "base-samples",
        penalties: tuple[float, ...] = (30.0, 10.0, 3.0, 1.0), steps: int = 4,
        uniform_scales: tuple[float, ...] = (0.0, 0.5), whole_scales: tuple[float, ...] = (0.25, 0.5, 0.75),
        seed: int = 0, batch_size: int | str = 8, dtype: str = "auto", device_map: str | None = None,
        overwrite: bool = False,
        allow_amplify: bool = False, num_fewshot: int | None = None, apply_chat_template: bool = False,
        fewshot_as_multiturn: bool | None = None, gen_kwargs: str | None = None, eval_seed: int | None = None,
        log_samples: bool = False, **options) -> FitReport:
    """Per-direction λ_i fitted on calibration data, measured beside one λ and the whole update, the pick written
    to ``out/fitted``: ``repair fit`` (options: ``DetectOptions``; ``eval_seed`` is lm-eval's ``--seed``)."""
    from evals.runners.fitter import FitOptions, run_fit

    settings = EvalSettings(num_fewshot, apply_chat_template, fewshot_as_multiturn, gen_kwargs, eval_seed, log_samples)
    opts = FitOptions(out=Path(out), tasks=_tasks(tasks), max_acc_drop=max_acc_drop, directions=directions,
                      format=format, forgetting=forgetting, limit=limit,
                      calibration=None if calibration is None else Path(calibration),
                      calibration_corpus=calibration_corpus, penalties=tuple(penalties), steps=steps,
                      uniform_scales=tuple(uniform_scales), whole_scales=tuple(whole_scales), seed=seed,
                      detect=detect_options(options), batch_size=batch_size, dtype=dtype, device_map=device_map,
                      overwrite=overwrite,
                      allow_amplify=allow_amplify, eval=settings)
    return run_fit(str(base), str(tuned), opts)


def compare(models: list[str], tasks: Sequence[str], *, limit: int | None = None, base: str | None = None,
            forgetting: str | None = None, out: str | Path | None = None, batch_size: int | str = 8,
            device: str = "auto", dtype: str = "auto", device_map: str | None = None, num_fewshot: int | None = None,
            apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
            gen_kwargs: str | None = None, seed: int | None = None, log_samples: bool = False) -> CompareReport:
    """Each model on each task (and forgetting) side by side: ``repair compare``. A sweep folder in ``models``
    stands for its base, tuned and picked checkpoints."""
    from evals.measure.models import Placement
    from evals.runners.comparison import run_compare

    placement = Placement(device, dtype, device_map)
    placement.validate()
    settings = EvalSettings(num_fewshot, apply_chat_template, fewshot_as_multiturn, gen_kwargs, seed, log_samples)
    return run_compare([str(m) for m in models], list(_tasks(tasks)), limit, base, forgetting,
                       Path(out) if out is not None else None, batch_size, placement, settings)


def continual_learning(recipe: str | Path, out: str | Path, *, limit: int | None = None,
                       forgetting: str = "base-samples:64", batch_size: int | str = 8, overwrite: bool = False,
                       overrides: Sequence[str] = (), num_fewshot: int | None = None, apply_chat_template: bool = False,
                       fewshot_as_multiturn: bool | None = None, gen_kwargs: str | None = None, seed: int | None = None,
                       log_samples: bool = False, **options) -> ContinualReport:
    """A recipe's stages trained one after another, measured after each: ``repair continual`` (``overrides``:
    its ``--set KEY=VALUE``; options: ``DetectOptions``)."""
    from evals.runners.continual import run_continual
    from repair.train.recipe import load_recipe

    settings = EvalSettings(num_fewshot, apply_chat_template, fewshot_as_multiturn, gen_kwargs, seed, log_samples)
    return run_continual(load_recipe(recipe, tuple(overrides)), Path(out), limit=limit, forgetting_spec=forgetting,
                         batch_size=batch_size, opts=detect_options(options), overwrite=overwrite, settings=settings)


def _tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    return (tasks,) if isinstance(tasks, str) else tuple(tasks)


def release(base: str, tuned: str, out: str | Path, *, tasks: Sequence[str], max_acc_drop: float,
            scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), forgetting: str = "base-samples",
            limit: int | None = None, control: str = "none", format: str | None = None,
            fail_above: int | None = None, overwrite: bool = False, per_matrix: int | None = None,
            batch_size: int | str = 8, allow_amplify: bool = False, dtype: str = "auto",
            device_map: str | None = None, num_fewshot: int | None = None, apply_chat_template: bool = False,
            fewshot_as_multiturn: bool | None = None, gen_kwargs: str | None = None, seed: int | None = None,
            log_samples: bool = False, method: str = "uniform", directions: str = "delta",
            calibration: str | Path | None = None, **options) -> ReleaseReport:
    """``repair release``: detect, sweep λ, pick the least forgetting within ``max_acc_drop`` and write ``out``
    (adapter or merged checkpoint, model card, report.html, release.json, logs/). ``report.ready`` is False
    when the ``fail_above`` gate failed. ``method="fit"`` releases ``repair fit``'s pick instead of a swept λ
    (``directions``, ``calibration`` as there; options: ``DetectOptions``)."""
    from evals.release.runner import ReleaseOptions, run_release

    settings = EvalSettings(num_fewshot, apply_chat_template, fewshot_as_multiturn, gen_kwargs, seed, log_samples)
    opts = ReleaseOptions(out=Path(out), tasks=_tasks(tasks), max_acc_drop=max_acc_drop, scales=tuple(scales),
                          forgetting=forgetting, limit=limit, control=control, format=format,
                          fail_above=fail_above, overwrite=overwrite, per_matrix=per_matrix, batch_size=batch_size,
                          allow_amplify=allow_amplify, dtype=dtype, device_map=device_map,
                          detect=detect_options(options), eval=settings, method=method, directions=directions,
                          calibration=None if calibration is None else Path(calibration))
    return run_release(str(base), str(tuned), opts)
