"""Typed sweep and comparison results, and their CSV, markdown and plot renderings."""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from repair.detection.report import SCHEMA_VERSION
from repair.runtime.durable import write_text_atomic


class Score(BaseModel):
    """One task's score as lm-eval reports it."""

    metric: str
    value: float
    stderr: float | None = None


def mean_score(scores: dict[str, Score]) -> Score | None:
    """The unweighted mean over tasks, its stderr sqrt(Σ se²)/n (tasks evaluated on independent documents)."""
    if not scores:
        return None
    if len(scores) == 1:
        return next(iter(scores.values()))
    errs = [s.stderr for s in scores.values()]
    stderr = math.sqrt(sum(e * e for e in errs)) / len(errs) if all(e is not None for e in errs) else None
    return Score(metric=f"mean of {len(scores)} tasks", value=sum(s.value for s in scores.values()) / len(scores),
                 stderr=stderr)


class SweepPoint(BaseModel):
    label: str  # base, tuned, or scale=λ
    scale: float | None
    accuracy: float | None = Field(None, description="the task's score, or the unweighted mean over the tasks")
    accuracy_stderr: float | None = None
    metric: str | None = None
    scores: dict[str, Score] = Field(default_factory=dict, description="each task's score (lm-eval's metric)")
    forgetting_nll: float
    forgetting_delta: float = Field(description="forgetting_nll minus the base model's")
    intruders: int | None = Field(description="intruder dimensions left among the top k of each matrix; None: not "
                                              "counted (a fit's ΔW-direction or whole-update point: W' has new "
                                              "singular vectors; `repair detect` on its checkpoint counts them)")
    seconds: float = 0.0
    forgetting_stderr: float | None = Field(None, description="standard error of forgetting_nll (documents)")
    forgetting_removed: float | None = Field(
        None, description="share of the fine-tune's forgetting removed: (NLL_tuned - NLL) / (NLL_tuned - NLL_base)")
    forgetting_removed_stderr: float | None = None
    frobenius_removed: float | None = Field(None, description="Σ over matrices of ‖W_tuned‖_F² - ‖W'‖_F²")
    doc_nll: list[float] = Field(default_factory=list, description="summed NLL of each corpus document")


class Pick(BaseModel):
    rule: str
    task: str | None = Field(None, description="the task whose drop is bounded; None: the mean over the tasks")
    scale: float | None = Field(description="the picked λ; None: no λ met the rule (see reason)")
    accuracy_drop: float | None
    forgetting_recovered: float | None = Field(
        None, description="fraction of the tuned model's forgetting (vs base) removed at this λ")
    checkpoint: str | None = None
    reason: str | None = Field(None, description="why no λ was picked")


class ControlComparison(BaseModel):
    """Intruder edit against the control edit at one λ, paired on the corpus documents."""

    scale: float
    intruder_removed: float | None
    intruder_removed_stderr: float | None
    control_removed: float | None
    control_removed_stderr: float | None
    difference: float = Field(description="forgetting NLL of the control minus that of the intruder edit")
    difference_stderr: float | None
    beyond_two_stderr: bool = Field(description="|difference| > 2 standard errors")
    frobenius_ratio: float | None = Field(None, description="Frobenius mass the control removed over the repair's")


class ControlPairRecord(BaseModel):
    intruder: int = Field(description="rank of the intruder among W_tuned's singular vectors (0 = largest)")
    control: int = Field(description="rank of its control direction")
    sigma_intruder: float
    sigma_control: float


class ControlDirections(BaseModel):
    pairs: list[ControlPairRecord]
    spill_order: list[int] = Field(default_factory=list, description=(
        "matched: further non-intruder ranks, in the order they take the mass a paired direction cannot carry"))


class ControlReport(BaseModel):
    kind: str  # neighbour or matched
    directions: dict[str, ControlDirections] = Field(description="per matrix: the directions the control scales")
    points: list[SweepPoint]
    comparisons: list[ControlComparison] = Field(default_factory=list)


class SweepReport(BaseModel):
    schema_version: str = SCHEMA_VERSION
    tool_version: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    arguments: dict[str, object]
    fingerprint: str
    forgetting_kind: str
    corpus_documents: int
    corpus_tokens: int
    total_intruders: int
    base: SweepPoint
    tuned: SweepPoint
    points: list[SweepPoint]
    pick: Pick | None = None
    per_matrix: int | None = Field(None, description="only the N top-ranked intruders of each matrix were scaled")
    doc_tokens: list[int] = Field(default_factory=list, description="scored tokens of each corpus document")
    control: ControlReport | None = None


CSV_FIELDS = ["label", "scale", "accuracy", "accuracy_stderr", "forgetting_nll", "forgetting_stderr",
              "forgetting_delta", "forgetting_removed", "forgetting_removed_stderr", "frobenius_removed", "intruders"]


def _tasks(report: SweepReport) -> list[str]:
    return list(report.tuned.scores)


def all_points(report: SweepReport) -> list[SweepPoint]:
    """Base, tuned, the intruder edits, then the control edits."""
    return [report.base, report.tuned, *report.points, *(report.control.points if report.control else [])]


def write_csv(report: SweepReport, path: Path) -> None:
    """One row per point; with several tasks, each task's score and stderr in its own pair of columns."""
    tasks = _tasks(report) if len(_tasks(report)) > 1 else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS + [f"{t}{x}" for t in tasks for x in ("", "_stderr")],
                       lineterminator="\n")
    w.writeheader()
    for p in all_points(report):
        row = {k: getattr(p, k) for k in CSV_FIELDS}
        for t in tasks:
            row |= {t: p.scores[t].value, f"{t}_stderr": p.scores[t].stderr}
        w.writerow(row)
    write_text_atomic(path, buf.getvalue())


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def _pct(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def _removed(p: SweepPoint) -> str:
    return _pct(p.forgetting_removed, p.forgetting_removed_stderr)


def markdown_table(report: SweepReport) -> str:
    """The points as a table (control edits after the intruder edits); with several tasks, one accuracy
    column per task before the mean."""
    tasks = _tasks(report) if len(_tasks(report)) > 1 else []
    head = ["point", "λ", *tasks, "mean accuracy" if tasks else "accuracy", "± stderr", "forgetting NLL",
            "Δ vs base", "forgetting removed", "intruders"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in all_points(report):
        err = "" if p.forgetting_stderr is None else f" ± {p.forgetting_stderr:.4f}"
        cells = [p.label, _fmt(p.scale, "g"), *(_fmt(p.scores[t].value) for t in tasks), _fmt(p.accuracy),
                 _fmt(p.accuracy_stderr), f"{p.forgetting_nll:.4f}{err}", f"{p.forgetting_delta:+.4f}", _removed(p),
                 str(p.intruders)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def control_verdict(report: SweepReport) -> str | None:
    """One line: the intruder edit against the control at the strongest edit swept (the λ farthest from 1)."""
    if report.control is None or not report.control.comparisons:
        return None
    c = max(report.control.comparisons, key=lambda c: abs(1 - c.scale))
    err = "" if c.difference_stderr is None else f" ± {c.difference_stderr:.4f}"
    if not c.beyond_two_stderr:
        outcome = "within two standard errors: this sweep cannot tell the intruders from the control"
    elif c.difference > 0:
        outcome = "beyond two standard errors: scaling the intruders removes more forgetting than the control"
    else:
        outcome = "beyond two standard errors: the control removes more forgetting than scaling the intruders"
    return (f"Against the {report.control.kind} control at λ={c.scale:g}: intruders remove "
            f"{_pct(c.intruder_removed, c.intruder_removed_stderr)} of the forgetting, the control "
            f"{_pct(c.control_removed, c.control_removed_stderr)}; control minus intruders {c.difference:+.4f}{err} "
            f"nats/token, {outcome}.")


def _panel(ax, report: SweepReport, task: str | None) -> None:
    """Accuracy on ``task`` (None: the mean, or λ without a task) against forgetting, each λ labelled."""
    pts = sorted(report.points, key=lambda p: p.scale)
    has_acc = report.tuned.accuracy is not None
    if task is not None:
        def y(p):
            return p.scores[task].value
    elif has_acc:
        def y(p):
            return p.accuracy
    else:
        def y(p):
            return 0.0 if p is report.base else 1.0 if p is report.tuned else p.scale
    ax.plot([p.forgetting_nll for p in pts], [y(p) for p in pts], "o-", color="tab:blue", label="patched (λ)")
    for p in pts:
        ax.annotate(f"λ={p.scale:g}", (p.forgetting_nll, y(p)), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ctrl = sorted(report.control.points, key=lambda p: p.scale) if report.control else []
    if ctrl:
        ax.plot([p.forgetting_nll for p in ctrl], [y(p) for p in ctrl], "x--", color="tab:orange",
                label=f"{report.control.kind} control (λ)")
    ax.plot(report.base.forgetting_nll, y(report.base), "*", ms=14, color="tab:green", label="base")
    ax.plot(report.tuned.forgetting_nll, y(report.tuned), "s", ms=9, color="tab:red", label="tuned (λ=1)",
            fillstyle="none")
    metric = report.tuned.scores[task].metric if task is not None else report.tuned.metric
    ax.set_ylabel(f"{task or 'accuracy'} ({metric})" if has_acc else "λ")
    ax.set_xlabel(f"forgetting: {report.forgetting_kind} per token (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_tradeoff(report: SweepReport, path: Path) -> Path:
    """Accuracy against forgetting: one panel per task, and one for the mean when there are several tasks
    (forgetting against λ without a task). A resumed sweep whose points are unchanged keeps the figure it drew."""
    from repair.figures.render import data_digest, draw_once

    shown = report.model_dump_json(include={"base", "tuned", "points", "control", "forgetting_kind"})
    return draw_once(path, data_digest("tradeoff", shown), lambda: _tradeoff(report))


def _tradeoff(report: SweepReport):
    from repair.figures.render import pyplot

    tasks = _tasks(report)
    panels: list[str | None] = [*tasks, None] if len(tasks) > 1 else [None]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], panels, strict=True):
        _panel(ax, report, task)
        ax.set_title(task or ("mean over the tasks" if len(panels) > 1 else "task accuracy vs forgetting"))
    fig.suptitle("Intruder scaling: task accuracy vs forgetting")
    return fig
