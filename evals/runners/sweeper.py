"""``repair sweep``: accuracy and forgetting across λ, with one SVD pass and in-place patching."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from evals.measure.accuracy import (
    EvalSettings,
    TaskColumn,
    check_columns,
    columns_fingerprint,
    evaluate_columns,
    make_lm,
)
from evals.measure.causal import annotate
from evals.measure.corpus import load_corpus
from evals.measure.forgetting import document_tokens, forgetting
from evals.measure.forgetting import kind as forgetting_kind
from evals.measure.lmeval_files import LM_EVAL_DIR, lm_eval_record
from evals.measure.models import Placement, check_batch_size, forgetting_batch, load_model, source_fingerprint
from evals.measure.results import (
    ControlReport,
    Pick,
    Score,
    SweepPoint,
    SweepReport,
    markdown_table,
    mean_score,
    plot_tradeoff,
    write_csv,
)
from repair import __version__
from repair.adapters.pairs import PairSource
from repair.detection.detector import DetectOptions
from repair.edit.controls import CONTROL_KINDS
from repair.edit.inplace import InPlacePatcher
from repair.edit.plan import check_per_matrix, check_scale
from repair.errors import OutputError, RepairError
from repair.io.writer import check_output_dir
from repair.runtime.durable import write_text_atomic
from repair.runtime.progress import Points, stage

logger = logging.getLogger(__name__)
PICKED_DIR = "picked"  # --write-picked writes DIR/picked
_PICK = re.compile(r"^max-acc-drop=(\d*\.?\d+)(?::(.+))?$")


@dataclass(frozen=True)
class SweepOptions:
    out: Path
    scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    tasks: tuple[str, ...] = ()  # lm-eval tasks (names or local YAML paths), each run with ``eval``
    forgetting: str = "base-samples"
    limit: int | None = None
    detect: DetectOptions = field(default_factory=DetectOptions)
    pick: str | None = None
    write_picked: bool = False
    batch_size: int | str = 8  # or "auto": lm-eval's own detection
    allow_amplify: bool = False
    dtype: str = "auto"  # the evaluated model's dtype (see evals.measure.models.Placement)
    device_map: str | None = None  # "auto": accelerate spreads the model (chosen by itself when it does not fit)
    overwrite: bool = False  # --write-picked may replace a non-empty DIR/picked
    control: str = "matched"  # control edits at each λ: matched, neighbour or none (see repair.edit.controls)
    per_matrix: int | None = None  # scale only the N top-ranked intruders of each matrix (N = 1: the paper's v2)
    eval: EvalSettings = field(default_factory=EvalSettings)  # lm-eval's flags (--num-fewshot, --seed, ...)
    extra_columns: tuple[TaskColumn, ...] = ()  # tasks run with flags of their own (the demo's chat-template pair)
    format: str = "merged"  # --write-picked writes a merged checkpoint or a PEFT adapter (TUNED a LoRA adapter)

    @property
    def columns(self) -> list[TaskColumn]:
        return [TaskColumn(t, self.eval) for t in self.tasks] + list(self.extra_columns)

    @property
    def placement(self) -> Placement:
        """The model goes where the detector's linear algebra runs (``--device``)."""
        return Placement(self.detect.device, self.dtype, self.device_map)

    def validate(self) -> None:
        self.detect.validate()
        self.placement.validate()
        if not self.scales:
            raise RepairError("scales: expected at least one λ.")
        for s in self.scales:
            check_scale(s, self.allow_amplify, "--scales")
        if self.pick is not None:
            pick_bound(self.pick)
            if not self.columns:
                raise RepairError("pick: needs --task, since it bounds the accuracy drop.")
        if self.write_picked and self.pick is None:
            raise RepairError("write_picked: needs --pick.")
        if self.format not in ("merged", "adapter"):
            raise RepairError(f"format: expected merged or adapter, got {self.format!r}.")
        if self.limit is not None and self.limit < 1:
            raise RepairError(f"limit: expected a positive integer, got {self.limit}.")
        check_batch_size(self.batch_size)
        if self.control not in CONTROL_KINDS:
            raise RepairError(f"control: expected one of {', '.join(CONTROL_KINDS)}, got {self.control!r}.")
        check_per_matrix(self.per_matrix)
        self.eval.validate()


def pick_bound(rule: str) -> tuple[float, str | None]:
    """``(bound, task)``: ``max-acc-drop=X`` bounds the mean over the tasks, ``max-acc-drop=X:TASK`` one task."""
    m = _PICK.match(rule)
    if m is None:
        raise RepairError(f"pick: expected max-acc-drop=X or max-acc-drop=X:TASK (e.g. max-acc-drop=0.01), "
                          f"got {rule!r}.")
    return float(m[1]), m[2]


class Evaluator:
    """Measures one point (for sweeps and fits): lm-eval accuracy on each task and forgetting NLL of the model as it is now; lm-eval's
    own result files go to ``DIR/lm-eval/<label>/``."""

    def __init__(self, model, tok, docs: list[str], opts: SweepOptions, base: str, tuned: str):
        self.model, self.tok, self.docs, self.opts = model, tok, docs, opts
        self.columns = opts.columns
        self.lm = make_lm(model, tok, opts.batch_size) if self.columns else None
        self.base_nll: float | None = None
        self.kind, self.doc_tokens = forgetting_kind(model), document_tokens(model, tok, docs)
        self.base, self.tuned = base, tuned

    def describe(self) -> str:
        """What each point measures, for the progress line."""
        tasks = ", ".join(c.label or c.spec for c in self.columns)
        limit = "" if self.opts.limit is None else f" (at most {self.opts.limit} examples each)"
        return f"forgetting on {len(self.docs)} documents" + (f", accuracy on {tasks}{limit}" if tasks else "")

    def _scores(self, label: str, scale: float | None) -> dict[str, Score]:
        if self.lm is None:
            return {}
        args = f"pretrained={self.base}" if label == "base" else f"pretrained={self.tuned},base={self.base}," + (
            f"edit={label}" if scale is None else f"intruder_scale={scale:g}")
        with lm_eval_record(self.opts.out / LM_EVAL_DIR / label) as record:
            scores = evaluate_columns(self.lm, self.columns, self.opts.limit, record, model_args=args)
        return {k: Score(metric=v.metric, value=v.value, stderr=v.stderr) for k, v in scores.items()}

    def measure(self, label: str, scale: float | None, intruders: int | None,
                frobenius: float | None = None) -> SweepPoint:
        t0 = time.perf_counter()
        f = forgetting(self.model, self.tok, self.docs, forgetting_batch(self.opts.batch_size))
        scores = self._scores(label, scale)
        mean = mean_score(scores)
        return SweepPoint(label=label, scale=scale, accuracy=mean and mean.value, accuracy_stderr=mean and mean.stderr,
                          metric=mean and mean.metric, scores=scores, forgetting_nll=f.nll,
                          forgetting_delta=f.nll - (f.nll if self.base_nll is None else self.base_nll),
                          intruders=intruders, seconds=round(time.perf_counter() - t0, 2), frobenius_removed=frobenius,
                          doc_nll=f.doc_nll)


class _PointCache:
    """Finished points as ``DIR/points/<label>.json``, valid only for the same fingerprint."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir, self.fingerprint = out / "points", fingerprint

    def get(self, label: str) -> SweepPoint | None:
        path = self.dir / f"{label}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") != self.fingerprint:
                return None
            point = SweepPoint.model_validate(data["point"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # pydantic's error is a ValueError
            logger.warning("%s: unreadable finished point (%s); measuring %s again", path, e, label)
            return None
        logger.info("resuming: %s from %s", label, path)
        return point

    def put(self, point: SweepPoint) -> SweepPoint:
        """Remember a finished point; a failed write only costs measuring it again on a resumed run."""
        payload = {"fingerprint": self.fingerprint, "point": point.model_dump()}
        try:
            write_text_atomic(self.dir / f"{point.label}.json", json.dumps(payload, indent=2) + "\n")
        except OSError as e:
            logger.warning("%s: could not store the finished point %s (%s); a resumed run measures it again",
                           self.dir, point.label, e.strerror or e)
        return point


def _label(scale: float) -> str:
    return f"scale={scale:g}"


def _accuracy(point: SweepPoint, task: str | None) -> float:
    return point.accuracy if task is None else point.scores[task].value


def choose(points: list[SweepPoint], tuned: SweepPoint, base: SweepPoint, rule: str) -> Pick:
    """The λ with the least forgetting whose accuracy drop against λ=1 (of the mean, or of the task named in
    the rule) stays within the bound."""
    bound, task = pick_bound(rule)
    if task is not None and task not in tuned.scores:
        raise RepairError(f"pick {rule}: {task!r} is not one of the swept tasks ({', '.join(tuned.scores)}).")
    drop = {id(p): _accuracy(tuned, task) - _accuracy(p, task) for p in points}
    ok = [p for p in points if drop[id(p)] <= bound + 1e-12]
    if not ok:
        least = min(drop.values())
        return Pick(rule=rule, task=task, scale=None, accuracy_drop=None, forgetting_recovered=None,
                    reason=f"no λ of {', '.join(f'{p.scale:g}' for p in points)} keeps the accuracy drop within "
                           f"{bound:g} (the least drop measured: {least:.4f}); add λ=1 to the scales, or allow more")
    best = min(ok, key=lambda p: (p.forgetting_nll, -_accuracy(p, task), -p.scale))
    gap = tuned.forgetting_nll - base.forgetting_nll
    recovered = (tuned.forgetting_nll - best.forgetting_nll) / gap if gap > 0 else None
    return Pick(rule=rule, task=task, scale=best.scale, accuracy_drop=drop[id(best)], forgetting_recovered=recovered)


def _arguments(base: str, tuned: str, opts: SweepOptions) -> dict[str, object]:
    d = opts.detect
    return {"base": base, "tuned": tuned, "scales": list(opts.scales), "tasks": list(opts.tasks),
            "forgetting": opts.forgetting, "limit": opts.limit, "top_k": d.top_k, "epsilon": d.epsilon,
            "side": d.side, "modules": d.modules, "pick": opts.pick, "batch_size": opts.batch_size,
            "dtype": opts.dtype, "lm_eval": opts.eval.record(), "control": opts.control, "per_matrix": opts.per_matrix,
            "extra_columns": [{"task": c.spec, "label": c.label, "lm_eval": c.settings.record()}
                              for c in opts.extra_columns]}


def check_sweep(base: str, tuned: str, opts: SweepOptions) -> PairSource:
    """Every check that needs no model: options, tasks, sources, the picked checkpoint's folder. A sweep that
    passes them fails later only on the machine (memory, disk) or on a bug, never on its input."""
    opts.validate()
    names = check_columns(opts.columns)  # an unknown task is a sentence before any model is loaded
    if opts.pick and (task := pick_bound(opts.pick)[1]) is not None and task not in names:
        raise RepairError(f"pick {opts.pick}: {task!r} is not one of the swept tasks ({', '.join(names)}).")
    src = opts.detect.pairs(base, tuned)
    if opts.write_picked:  # before any work: a refused output folder must not cost a whole sweep
        check_output_dir(opts.out / PICKED_DIR, [src.base_source.path, src.tuned_source.path], opts.overwrite)
        if opts.format == "adapter":
            from repair.edit.patcher import check_adapter_format

            check_adapter_format(src, tuned)
        if opts.dtype != "auto":
            logger.warning("dtype %s: the sweep measures the model in %s, but --write-picked writes the "
                           "checkpoint's own dtype", opts.dtype, opts.dtype)
    return src


def run_sweep(base: str, tuned: str, opts: SweepOptions) -> SweepReport:
    """Evaluate base, tuned and each λ; write sweep.json, sweep.csv and tradeoff.png to ``opts.out``."""
    src = check_sweep(base, tuned, opts)
    stage(f"Loading {base} and the forgetting corpus ({opts.forgetting})")
    model, tok, base_src = load_model(base, placement=opts.placement, hub=opts.detect.hub())
    docs = load_corpus(opts.forgetting, model, tok, json.dumps(source_fingerprint(base_src)),
                       chat=opts.eval.apply_chat_template)
    args = _arguments(base, tuned, opts)
    measured = {k: v for k, v in args.items() if k != "pick"}  # another budget reuses the points
    key = [__version__, measured, source_fingerprint(base_src), source_fingerprint(src.tuned_source), docs,
           columns_fingerprint(opts.columns)]
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache, ev = _PointCache(opts.out, fingerprint), Evaluator(model, tok, docs, opts, base, tuned)
    n_points = 1 + len({1.0, *opts.scales}) + (sum(s != 1.0 for s in opts.scales) if opts.control != "none" else 0)
    stage(f"Measuring {n_points} points: {ev.describe()}")
    points = Points(n_points)
    base_point = _point(cache, "base", points, lambda: ev.measure("base", None, 0))
    ev.base_nll = base_point.forgetting_nll
    stage(f"Finding the intruders of {tuned} (one SVD pass; the weights are then edited in place)")
    patcher = InPlacePatcher(model, src, opts.detect, opts.per_matrix, opts.control)  # the one SVD pass: TUNED now
    done = _measure_scales(patcher, ev, cache, opts, points)
    tuned_point = done[1.0].model_copy(update={"label": "tuned"})
    report = SweepReport(
        tool_version=__version__, arguments=args, fingerprint=fingerprint, forgetting_kind=ev.kind,
        corpus_documents=len(docs), corpus_tokens=sum(ev.doc_tokens), total_intruders=patcher.total_intruders,
        base=base_point, tuned=tuned_point, points=[done[s] for s in opts.scales], per_matrix=opts.per_matrix,
        doc_tokens=ev.doc_tokens,
    )
    if opts.control != "none":
        report.control = ControlReport(kind=opts.control, directions=patcher.control_record(),
                                       points=_measure_controls(patcher, ev, cache, opts, done, points))
    annotate(report)
    if opts.pick:
        report.pick = choose(report.points, tuned_point, base_point, opts.pick)
        if opts.write_picked and report.pick.scale is not None:
            stage(f"Writing the {opts.format} checkpoint at λ={report.pick.scale:g}")
            report.pick.checkpoint = str(_write_picked(base, tuned, opts, patcher, report.pick.scale, fingerprint))
    _write_outputs(report, opts.out)
    return report


def _result(point: SweepPoint) -> str:
    acc = "" if point.accuracy is None else \
        f"accuracy {point.accuracy:.3f}" + ("" if point.accuracy_stderr is None else f" ± {point.accuracy_stderr:.3f}")
    nll = f"forgetting NLL {point.forgetting_nll:.3f}"
    return ", ".join(x for x in (acc, nll, f"{point.intruders} intruders") if x)


def _point(cache: _PointCache, label: str, points: Points, measure) -> SweepPoint:
    """A finished point from an earlier run, or the point measured now (and stored); one progress line."""
    point = cache.get(label)
    if point is not None:
        points.finished(label, _result(point), None)
        return point
    point = cache.put(measure())
    points.finished(label, _result(point), point.seconds)
    return point


def _measure_scales(patcher: InPlacePatcher, ev: Evaluator, cache: _PointCache,
                    opts: SweepOptions, points: Points) -> dict[float, SweepPoint]:
    """λ = 1 (the tuned model), then each λ: edit in place, measure, restore; finished points come from the cache."""
    done: dict[float, SweepPoint] = {}
    for scale in [1.0, *dict.fromkeys(s for s in opts.scales if s != 1.0)]:
        done[scale] = _point(cache, _label(scale), points, lambda scale=scale: _measure_edit(
            patcher, ev, _label(scale), scale, done.get(1.0), control=False))
    return done


def _measure_edit(patcher: InPlacePatcher, ev: Evaluator, label: str, scale: float, tuned: SweepPoint | None,
                  control: bool) -> SweepPoint:
    if not patcher.entries and tuned is not None:  # nothing to rescale: every λ is λ=1
        return tuned.model_copy(update={"label": label, "scale": scale, "seconds": 0.0})
    patcher.apply(scale, control=control)
    try:
        return ev.measure(label, scale, patcher.intruders_at(scale, control=control),
                          patcher.frobenius_removed(scale, control=control))
    finally:
        patcher.restore()


def _measure_controls(patcher: InPlacePatcher, ev: Evaluator, cache: _PointCache, opts: SweepOptions,
                      done: dict[float, SweepPoint], points: Points) -> list[SweepPoint]:
    """The control edit at each λ ≠ 1 (λ = 1 is the tuned model for both series)."""
    out = []
    for scale in [s for s in opts.scales if s != 1.0]:
        label = f"control={scale:g}"
        out.append(_point(cache, label, points, lambda scale=scale, label=label: _measure_edit(
            patcher, ev, label, scale, done[1.0], control=True)))
    return out


def _write_picked(base: str, tuned: str, opts: SweepOptions, patcher: InPlacePatcher, scale: float,
                  fingerprint: str) -> Path:
    """The checkpoint at the picked λ, from the sweep's own intruders and triplets: the weights it measured.
    An adapter at λ = 1 (or with no intruder) is TUNED's own, copied unchanged."""
    from repair.edit.patcher import PatchOptions, copy_adapter, patch

    out = opts.out / PICKED_DIR
    if opts.format == "adapter" and (scale == 1.0 or not patcher.entries):
        copy_adapter(opts.detect.pairs(base, tuned), out, opts.overwrite)
        return out
    patch(base, tuned, PatchOptions(out=out, scale=scale, detect=opts.detect, overwrite=opts.overwrite,
                                    format=opts.format, allow_amplify=opts.allow_amplify, patches=patcher.patches(),
                                    patches_from=f"repair sweep {fingerprint}"))
    return out


def _write_outputs(report: SweepReport, out: Path) -> None:
    try:
        _write_files(report, out)
    except OSError as e:
        raise OutputError(f"out {out}: writing the sweep's results failed ({e.strerror or e}); the finished "
                          "points are kept, so a rerun resumes.") from e


def _write_files(report: SweepReport, out: Path) -> None:
    write_text_atomic(out / "sweep.json", report.model_dump_json(indent=2) + "\n")
    write_csv(report, out / "sweep.csv")
    write_text_atomic(out / "sweep.md", markdown_table(report) + "\n")
    plot_tradeoff(report, out / "tradeoff.png")
