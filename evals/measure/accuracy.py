"""Downstream accuracy with lm-eval on an in-memory model (``HFLM(pretrained=model, tokenizer=tok)``)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from repair.errors import RepairError

logger = logging.getLogger(__name__)

# Metrics read from lm-eval's results, first present wins.
METRIC_PREFERENCE = ("acc", "acc_norm", "exact_match", "f1", "mcc")
_TASK_KEY = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


@dataclass(frozen=True)
class EvalSettings:
    """lm-eval's evaluation flags, with lm-eval's meanings, passed to ``simple_evaluate`` as its CLI passes them.

    A flag left at ``None`` takes the value lm-eval's CLI gives it (``fewshot_as_multiturn``: on with
    ``apply_chat_template``, as ``lm_eval --apply_chat_template`` does, else None).
    """

    num_fewshot: int | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None
    gen_kwargs: str | None = None
    seed: int | None = None  # lm-eval's --seed with one value: the random, numpy, torch and few-shot seeds
    log_samples: bool = False  # keep lm-eval's per-sample records (written beside the results JSON)

    def kwargs(self) -> dict[str, object]:
        # lm-eval's CLI: multi-turn few-shot is on with the chat template unless turned off, None without it
        multiturn = self.fewshot_as_multiturn
        out: dict[str, object] = {"fewshot_as_multiturn": (True if self.apply_chat_template else None)
                                  if multiturn is None else multiturn}
        if self.num_fewshot is not None:
            out["num_fewshot"] = self.num_fewshot
        if self.gen_kwargs is not None:
            out["gen_kwargs"] = parse_gen_kwargs(self.gen_kwargs)
        if self.apply_chat_template:
            out["apply_chat_template"] = True
        if self.seed is not None:
            out |= {f"{k}_seed": self.seed for k in ("random", "numpy_random", "torch_random", "fewshot_random")}
        out |= {"log_samples": self.log_samples}
        accepted = _simple_evaluate_parameters()
        return {k: v for k, v in out.items() if k in accepted or v is not None}  # unset and unknown: not passed

    def validate(self) -> None:
        """Usage errors: negative few-shot counts, multi-turn few-shot without the chat template, and flags the
        installed lm-eval does not take (named with its version)."""
        import lm_eval

        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise RepairError(f"num_fewshot: expected an integer >= 0, got {self.num_fewshot}.")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise RepairError("fewshot_as_multiturn: needs --apply-chat-template, as in lm-eval.")
        if self.gen_kwargs is not None:
            try:
                parse_gen_kwargs(self.gen_kwargs)
            except ValueError as e:
                raise RepairError(f"gen_kwargs: expected key=value pairs or a JSON object, as lm-eval's "
                                  f"--gen_kwargs takes ({e}).") from e
        for name in sorted(set(self.kwargs()) - _simple_evaluate_parameters()):
            flag = "--seed" if name.endswith("_seed") else f"--{name.replace('_', '-')}"
            raise RepairError(f"{flag}: the installed lm-eval {lm_eval.__version__} does not support it; "
                              "upgrade lm-eval or drop the flag.")

    def record(self) -> dict[str, object]:
        """The settings as the reports record them."""
        return dataclasses.asdict(self)


def _simple_evaluate_parameters() -> set[str]:
    import inspect

    import lm_eval

    return set(inspect.signature(lm_eval.simple_evaluate).parameters)


def parse_gen_kwargs(text: str) -> dict | str:
    """``--gen-kwargs`` as lm-eval's CLI parses ``--gen_kwargs`` (a JSON object, or ``k=v`` pairs split at
    top-level commas with literal values, e.g. ``until=["\\n\\n","Q:"]``), with lm-eval's own parser; an lm-eval
    without it gets the string, which ``simple_evaluate`` parses itself."""
    try:
        from lm_eval._cli.utils import key_val_to_dict, try_parse_json
    except ImportError:
        return text
    parsed = try_parse_json(text)
    return parsed if isinstance(parsed, dict) else key_val_to_dict(text)


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str
    value: float
    stderr: float | None


def task_yaml(spec: str) -> Path | None:
    """The task YAML a spec names: a shipped task (materialised with its data path), a ``.yaml`` path, or None
    for a registered lm-eval task name."""
    from repair.train.taskgen import materialize_task, shipped_task_names

    if spec in shipped_task_names():  # the project's own offline tasks, by name
        return materialize_task(spec)
    return Path(spec) if Path(spec).suffix in (".yaml", ".yml") else None


def task_location(spec: str, what: str = "--task") -> tuple[str | None, str]:
    """``(folder to include, task name)``: a local YAML path registers its folder; anything else is a name."""
    path = task_yaml(spec)
    if path is None:
        return None, spec
    if not path.is_file():
        raise RepairError(f"{what} {spec}: no such task YAML file.")
    m = _TASK_KEY.search(path.read_text())
    if m is None:
        raise RepairError(f"{what} {spec}: the YAML has no 'task:' name.")
    return str(path.resolve().parent), m[1]


def task_manager_for(spec: str, what: str = "--task"):
    """``(TaskManager, task name)`` for one task spec."""
    folder, name = task_location(spec, what)
    return _fresh_manager(folder, name, needs_lm_eval_index(spec)), name


def _fresh_manager(folder: str | None, name: str, defaults: bool):
    """``task_manager`` of one folder, indexed again when ``name`` was written there after it was indexed."""
    tm = task_manager((folder,) if folder else (), defaults)
    if folder and name not in tm.all_tasks:  # a YAML written after its folder was indexed in this process
        for stale in [key for key in _MANAGERS if folder in key[0]]:  # every index of that folder
            del _MANAGERS[stale]
        tm = task_manager((folder,), defaults)
    return tm


_MANAGERS: dict[tuple[tuple[str, ...], bool], object] = {}


def needs_lm_eval_index(spec: str) -> bool:
    """Whether a task needs lm-eval's index of every task it ships (seconds to build, once per set of folders):
    a registered name does. The project's shipped YAMLs stand alone; a user's YAML is tried with its own folder
    alone first, and gets the index only where that fails (lm-eval then loads it, or says why not)."""
    from repair.train.taskgen import shipped_task_names

    if spec in shipped_task_names():
        return False
    path = task_yaml(spec)
    return path is None or not _stands_alone(spec, path)


_ALONE: dict[tuple[str, str], bool] = {}  # (YAML path, digest of its text) -> whether it loads from its folder alone


def _stands_alone(spec: str, path: Path) -> bool:
    """Whether lm-eval loads the task of the YAML at ``path`` from its own folder, without its index."""
    import yaml

    if not path.is_file():
        return False  # task_location names the missing file
    key = (str(path.resolve()), _yaml_digest(spec))
    if key not in _ALONE:
        folder, name = task_location(spec)
        tm = _fresh_manager(folder, name, False)
        try:
            _ALONE[key] = name in tm.all_tasks and bool(tm.load_task_or_group([name]))
        except (KeyError, ValueError, TypeError, OSError, ImportError, yaml.YAMLError):
            _ALONE[key] = False  # what it needs is elsewhere: with lm-eval's index it loads, or fails in words
        if _ALONE[key]:
            _LOADABLE.add((spec, name, key[1]))
    return _ALONE[key]


def task_manager(include_paths: tuple[str, ...], defaults: bool = True):
    """One lm-eval ``TaskManager`` per set of task folders and process: with ``defaults`` it indexes every task
    lm-eval ships (seconds), without it only the folders'."""
    from lm_eval.tasks import TaskManager

    key = (include_paths, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)
    return _MANAGERS[key]


def _pick_metric(task: str, results: dict) -> TaskScore:
    """The first metric of ``METRIC_PREFERENCE`` lm-eval reported, unfiltered if it can be, else under the first
    filter the task lists (``exact_match,strict-match`` for gsm8k-style generation tasks)."""
    for metric in METRIC_PREFERENCE:
        filters = [k.partition(",")[2] for k in results if k.partition(",")[0] == metric]
        if not filters:
            continue
        flt = "none" if "none" in filters else filters[0]
        stderr = results.get(f"{metric}_stderr,{flt}")
        return TaskScore(task, metric if flt == "none" else f"{metric},{flt}", float(results[f"{metric},{flt}"]),
                         float(stderr) if isinstance(stderr, int | float) else None)
    raise RepairError(f"task {task}: lm-eval reported none of the metrics {', '.join(METRIC_PREFERENCE)}.")


_LOADABLE: set[tuple[str, str, str]] = set()  # (spec, name, YAML digest) lm-eval has loaded in this process


def check_task(spec: str, what: str = "--task"):
    """``(TaskManager, name)`` of a task lm-eval can load, checked once per process (before anything runs);
    evaluations then run without a catch-all."""
    tm, name = task_manager_for(spec, what)
    key = (spec, name, _yaml_digest(spec))
    if key not in _LOADABLE:
        load_tasks(tm, name, f"{what} {spec}")
        _LOADABLE.add(key)
    return tm, name


def _yaml_digest(spec: str) -> str:
    """The sha256 of the task YAML a spec names ("" for a registered name): an edited YAML is checked again."""
    import hashlib

    path = task_yaml(spec)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else ""


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


def make_lm(model, tok, batch_size: int | str = 8):
    """An lm-eval ``HFLM`` around an in-memory model; weights edited in place are seen by later calls.
    ``batch_size="auto"`` is lm-eval's own detection."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)  # runs where the model's weights are


@dataclass(frozen=True)
class TaskColumn:
    """One accuracy column: an lm-eval task (registered name or local YAML) run with a set of lm-eval flags."""

    spec: str
    settings: EvalSettings = EvalSettings()
    label: str | None = None  # the column's name; default: the task's lm-eval name

    def resolve(self, what: str = "--task") -> tuple[str, str | None, str]:
        """``(column name, folder to include, task name)``, the task checked loadable."""
        folder, name = task_location(self.spec, what)
        check_task(self.spec, what)
        return self.label or name, folder, name


def check_columns(columns: list[TaskColumn], what: str = "--task") -> list[str]:
    """The column names, each task checked loadable (before any model is loaded); names must be unique."""
    names = [c.resolve(what)[0] for c in columns]
    for n in names:
        if names.count(n) > 1:
            raise RepairError(f"{what}: task {n!r} is given twice.")
    for c in columns:
        c.settings.validate()
    return names


def columns_fingerprint(columns: list[TaskColumn]) -> list:
    """What a cached score depends on besides the model: lm-eval's version, each column's flags and task, and
    the text of a local task YAML."""
    import hashlib

    import lm_eval

    out: list = [lm_eval.__version__]
    for c in columns:
        name, yaml = task_location(c.spec)[1], task_yaml(c.spec)
        text = yaml.read_bytes() if yaml is not None else b""
        out.append([c.label or name, name, c.settings.record(), hashlib.sha256(text).hexdigest()])
    return out


_ENVIRONMENT: list[str] = []  # torch's environment report, once collected


@contextmanager
def environment_collected_once() -> Iterator[None]:
    """Inside: torch's environment report, which ``simple_evaluate`` adds to every result, is collected once a
    process. Collecting it runs ``pip list`` and other commands in subprocesses, about a second a call, and it
    cannot change between the calls of one process; lm-eval's results keep it whole."""
    import torch.utils.collect_env as collect_env

    real = collect_env.get_pretty_env_info

    def once() -> str:
        if not _ENVIRONMENT:
            _ENVIRONMENT.append(real())
        return _ENVIRONMENT[0]

    collect_env.get_pretty_env_info = once
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = real


def evaluate_columns(lm, columns: list[TaskColumn], limit: int | None = None, record=None,
                     model_args: str = "") -> dict[str, TaskScore]:
    """Each column's score: one ``simple_evaluate`` call per distinct set of flags, all its tasks at once, as
    ``lm_eval --tasks a,b`` runs them. With ``record`` (an ``evals.measure.lmeval_files.LmEvalRecord``), lm-eval's own
    tracker writes each call's result files."""
    from lm_eval import simple_evaluate

    groups: dict[EvalSettings, list[TaskColumn]] = {}
    for c in columns:
        groups.setdefault(c.settings, []).append(c)
    scores: dict[str, TaskScore] = {}
    for settings, cols in groups.items():
        resolved = [c.resolve() for c in cols]
        folders = tuple(sorted({f for _, f, _ in resolved if f}))
        names = list(dict.fromkeys(n for _, _, n in resolved))
        defaults = any(needs_lm_eval_index(c.spec) for c in cols)
        tracker = record.tracker() if record is not None else None
        with environment_collected_once():
            out = simple_evaluate(model=lm, tasks=names, task_manager=task_manager(folders, defaults), limit=limit,
                                  evaluation_tracker=tracker, model_args=model_args, **settings.kwargs())
        for label, _, name in resolved:
            if out is None or name not in out["results"]:
                raise RepairError(f"task {name}: lm-eval returned no results for it.")
            scores[label] = _pick_metric(name, out["results"][name])
        if record is not None:
            record.save(tracker, out)
    return scores
