"""Typed sweep and comparison results, and their CSV, markdown and plot renderings."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from repair.durable import write_text_atomic
from repair.report import SCHEMA_VERSION


class SweepPoint(BaseModel):
    label: str  # base, tuned, or scale=λ
    scale: float | None
    accuracy: float | None = None
    accuracy_stderr: float | None = None
    metric: str | None = None
    forgetting_nll: float
    forgetting_delta: float = Field(description="forgetting_nll minus the base model's")
    intruders: int = Field(description="intruder dimensions left among the top k of each matrix")
    seconds: float = 0.0


class Pick(BaseModel):
    rule: str
    scale: float
    accuracy_drop: float | None
    forgetting_recovered: float | None = Field(
        None, description="fraction of the tuned model's forgetting (vs base) removed at this λ")
    checkpoint: str | None = None


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


CSV_FIELDS = ["label", "scale", "accuracy", "accuracy_stderr", "forgetting_nll", "forgetting_delta", "intruders"]


def write_csv(report: SweepReport, path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for p in [report.base, report.tuned, *report.points]:
        w.writerow({k: getattr(p, k) for k in CSV_FIELDS})
    write_text_atomic(path, buf.getvalue())


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(report: SweepReport) -> str:
    rows = ["| point | λ | accuracy | ± stderr | forgetting NLL | Δ vs base | intruders |",
            "|---|---|---|---|---|---|---|"]
    for p in [report.base, report.tuned, *report.points]:
        rows.append(f"| {p.label} | {_fmt(p.scale, 'g')} | {_fmt(p.accuracy)} | {_fmt(p.accuracy_stderr)} | "
                    f"{p.forgetting_nll:.4f} | {p.forgetting_delta:+.4f} | {p.intruders} |")
    return "\n".join(rows)


def plot_tradeoff(report: SweepReport, path: Path) -> None:
    """Accuracy against forgetting, each λ labelled, base and tuned marked (forgetting vs λ without a task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    pts = sorted(report.points, key=lambda p: p.scale)
    has_acc = all(p.accuracy is not None for p in [report.base, report.tuned, *pts])
    y = (lambda p: p.accuracy) if has_acc else (lambda p: p.scale)
    ax.plot([p.forgetting_nll for p in pts], [y(p) for p in pts], "o-", color="tab:blue", label="patched (λ)")
    for p in pts:
        ax.annotate(f"λ={p.scale:g}", (p.forgetting_nll, y(p)), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.plot(report.base.forgetting_nll, y(report.base) if has_acc else 0, "*", ms=14, color="tab:green", label="base")
    ax.plot(report.tuned.forgetting_nll, y(report.tuned) if has_acc else 1, "s", ms=9, color="tab:red",
            label="tuned (λ=1)", fillstyle="none")
    ax.set_xlabel(f"forgetting: {report.forgetting_kind} per token on the reference corpus (lower is better)")
    ax.set_ylabel(f"accuracy ({report.tuned.metric})" if has_acc else "λ")
    ax.set_title("Intruder scaling: task accuracy vs forgetting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
