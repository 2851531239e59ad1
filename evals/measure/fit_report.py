"""``fit.json``, ``fit.md`` and ``front.png`` of ``repair fit``: three fronts measured in one run (the fitted
per-direction λ, one λ over the intruders, the whole update scaled) and the picked point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from evals.measure import stats
from evals.measure.results import SweepPoint

FIT_SCHEMA_VERSION = "1.0"
Front = Literal["fitted", "uniform", "whole"]
FRONT_NAMES = {"fitted": "fitted λ_i (repair fit)", "uniform": "one λ over the intruders (the paper)",
               "whole": "whole update × λ, W0 + λ·ΔW (baseline)"}


class FitDirection(BaseModel):
    matrix: str
    rank: int = Field(description="index among W_tuned's singular vectors (intruders) or ΔW's (delta)")
    sigma: float
    intruder: bool = Field(description="an intruder of W_tuned, or (delta) a ΔW direction mostly in their span")
    intruder_overlap: float = Field(description="share of u_i in the span of the matrix's intruders' u")


class FrontPoint(BaseModel):
    front: Front
    parameter: float = Field(description="fitted: the task-loss weight w of the path; others: λ")
    point: SweepPoint
    scales: list[float] | None = Field(None, description="fitted: λ_i of every direction, in `directions` order")
    removed_mass: float | None = Field(None, description="fitted: ‖R‖_F² of the removed part R = Σ (1−λ_i) σ_i u_i v_iᵀ")
    removed_on_intruders: float | None = Field(
        None, description="fitted: share of ‖R‖_F² inside the intruders' span, ‖U_Iᵀ R V_I‖_F² / ‖R‖_F²")


class FitPick(BaseModel):
    max_acc_drop: float
    label: str | None = Field(description="the picked fitted point; None: no fitted point met the bound")
    accuracy_drop: float | None = None
    forgetting_removed: float | None = None
    checkpoint: str | None = None
    reason: str | None = None


class Calibrated(BaseModel):
    documents: int
    examples: int
    dropped_documents: int = Field(description="calibration documents dropped as equal to evaluated ones")
    dropped_examples: int = Field(description="calibration examples dropped as equal to test examples")
    sources: dict[str, str]


class FitReport(BaseModel):
    schema_version: str = FIT_SCHEMA_VERSION
    kind: Literal["intruder-repair-fit"] = "intruder-repair-fit"
    tool_version: str
    arguments: dict[str, object]
    directions_kind: Literal["intruders", "delta"]
    total_intruders: int
    calibration: Calibrated
    base: SweepPoint
    tuned: SweepPoint
    fronts: list[FrontPoint]
    directions: list[FitDirection]
    pick: FitPick
    corpus_documents: int = 0
    doc_tokens: list[int] = Field(default_factory=list, description="scored tokens of each evaluation document")
    fit_seconds: float = 0.0
    seconds: float = 0.0

    def write(self, out: Path) -> None:
        from repair.runtime.durable import write_text_atomic

        write_text_atomic(out / "fit.json", self.model_dump_json(indent=2) + "\n")
        write_text_atomic(out / "fit.md", markdown(self) + "\n")
        plot_front(self, out / "front.png")


def annotate(report: FitReport) -> None:
    """Each point's forgetting stderr and removed share (paired by document), in place."""
    base, tuned = report.base.doc_nll, report.tuned.doc_nll
    tokens = report.doc_tokens
    for p in [report.base, report.tuned, *(f.point for f in report.fronts)]:
        if tokens and len(p.doc_nll) == len(tokens) == len(base) == len(tuned):
            p.forgetting_stderr = stats.nll(p.doc_nll, tokens)[1]
            p.forgetting_removed, p.forgetting_removed_stderr = stats.share_removed(p.doc_nll, tuned, base)


def drop(report: FitReport, p: SweepPoint) -> float:
    return (report.tuned.accuracy or 0.0) - (p.accuracy or 0.0)


def markdown(report: FitReport) -> str:
    rows = ["| front | parameter | accuracy | drop (points) | forgetting NLL | forgetting removed |",
            "|---|---|---|---|---|---|"]
    for label, p, par in [("base", report.base, "–"), ("tuned", report.tuned, "–")] + [
            (f.front, f.point, f"{'w' if f.front == 'fitted' else 'λ'}={f.parameter:g}") for f in report.fronts]:
        acc = "–" if p.accuracy is None else f"{100 * p.accuracy:.1f}%"
        d = "–" if label == "base" or p.accuracy is None else f"{100 * drop(report, p):+.1f}"
        removed = "–" if p.forgetting_removed is None else (
            f"{100 * p.forgetting_removed:.1f}% ± {100 * (p.forgetting_removed_stderr or 0):.1f}")
        rows.append(f"| {label} | {par} | {acc} | {d} | {p.forgetting_nll:.3f} | {removed} |")
    return "\n".join(rows)


def plot_front(report: FitReport, path: Path) -> Path:
    """Forgetting removed against accuracy drop, one line per front."""
    from repair.figures.render import data_digest, draw_once

    shown = report.model_dump_json(include={"base": True, "tuned": True, "fronts": True, "pick": {"max_acc_drop"}})
    return draw_once(path, data_digest("front", shown), lambda: _draw(report))


def _draw(report: FitReport):
    from repair.figures.render import pyplot

    fig, ax = pyplot().subplots(figsize=(6.5, 4.5), dpi=120)
    for front, marker in (("whole", "s"), ("uniform", "o"), ("fitted", "D")):
        pts = [report.tuned] + [f.point for f in report.fronts if f.front == front]
        pts = sorted(pts, key=lambda p: p.forgetting_removed or 0.0)
        ax.plot([100 * drop(report, p) for p in pts], [100 * (p.forgetting_removed or 0.0) for p in pts],
                marker=marker, label=FRONT_NAMES[front])
    ax.axvline(100 * report.pick.max_acc_drop, color="grey", ls=":", lw=1, label="accuracy budget")
    ax.set_xlabel("accuracy drop against the tuned model (points)")
    ax.set_ylabel("forgetting removed (%)")
    ax.set_title("repair fit: three fronts, measured on held-out data")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
