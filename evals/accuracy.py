"""Downstream accuracy with lm-eval on an in-memory model (``HFLM(pretrained=model, tokenizer=tok)``)."""

from __future__ import annotations

import difflib
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from repair.errors import RepairError

logger = logging.getLogger(__name__)

# Metrics read from lm-eval's results, first present wins.
METRIC_PREFERENCE = ("acc", "acc_norm", "exact_match", "f1", "mcc")
_TASK_KEY = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float | None


def task_manager_for(spec: str):
    """``(TaskManager, task name)``: a local YAML path registers its folder; anything else is a task name."""
    from .taskgen import materialize_task, shipped_task_names

    if spec in shipped_task_names():  # the project's own offline tasks, by name
        spec = str(materialize_task(spec))
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RepairError(f"--task {spec}: no such task YAML file.")
        m = _TASK_KEY.search(path.read_text())
        if m is None:
            raise RepairError(f"--task {spec}: the YAML has no 'task:' name.")
        return task_manager(str(path.resolve().parent)), m[1]
    return task_manager(None), spec


@functools.lru_cache(maxsize=16)
def task_manager(include_path: str | None):
    """One lm-eval ``TaskManager`` per task folder and process: building one indexes every lm-eval task (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def _pick_metric(task: str, results: dict) -> TaskScore:
    for metric in METRIC_PREFERENCE:
        key = f"{metric},none"
        if key in results:
            stderr = results.get(f"{metric}_stderr,none")
            return TaskScore(task, metric, float(results[key]),
                             float(stderr) if isinstance(stderr, int | float) else None)
    raise RepairError(f"--task {task}: lm-eval reported none of the metrics {', '.join(METRIC_PREFERENCE)}.")


_LOADABLE: set[tuple[str, str]] = set()  # tasks lm-eval has loaded once in this process


def check_task(spec: str, what: str = "--task"):
    """``(TaskManager, name)`` of a task lm-eval can load, checked once per process (before anything runs);
    evaluations then run without a catch-all."""
    tm, name = task_manager_for(spec)
    if (spec, name) not in _LOADABLE:
        load_tasks(tm, name, f"{what} {spec}")
        _LOADABLE.add((spec, name))
    return tm, name


def load_tasks(tm, name: str, what: str) -> dict:
    """lm-eval's task dict for ``name``; input problems (unknown name, bad YAML, data missing offline) are one
    sentence naming ``what``. Errors while evaluating (out of memory, bugs) are not caught anywhere here."""
    import yaml

    if name not in tm.all_tasks:
        close = difflib.get_close_matches(name, tm.all_tasks, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no registered task has a similar name"
        raise RepairError(f"{what}: lm-eval has no task {name!r} ({hint}; or give the path of a task YAML).")
    try:
        return tm.load_task_or_group([name])
    except (KeyError, ValueError, TypeError, OSError, ImportError, yaml.YAMLError) as e:
        raise RepairError(f"{what}: lm-eval could not load it ({type(e).__name__}: {e}).") from e


def make_lm(model, tok, batch_size: int = 8):
    """An lm-eval ``HFLM`` around an in-memory model; weights edited in place are seen by later calls."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)  # runs where the model's weights are


def evaluate(lm, spec: str, limit: int | None = None) -> TaskScore:
    """Run one lm-eval task (registered name or local YAML) through ``simple_evaluate``."""
    from lm_eval import simple_evaluate

    tm, name = check_task(spec)
    out = simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, log_samples=False)
    if out is None or name not in out["results"]:
        raise RepairError(f"--task {spec}: lm-eval returned no results for {name!r}.")
    return _pick_metric(name, out["results"][name])
