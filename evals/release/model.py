"""``release.json``: the verdict of a release and every number its model card and report show."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from evals.measure.results import Score, SweepPoint, SweepReport

RELEASE_SCHEMA = "1.0"
Verdict = Literal["patched", "unchanged", "gate-failed"]


class EvidenceRow(BaseModel):
    """One model of the evidence table: base, tuned or released."""

    label: Literal["base", "tuned", "released"]
    scale: float | None = Field(description="λ of the intruder edit; None for the base model")
    scores: dict[str, Score] = Field(description="accuracy per task, as lm-eval reports it")
    forgetting_nll: float
    forgetting_stderr: float | None
    forgetting_removed: float | None = Field(
        description="share of the fine-tune's forgetting removed: (NLL_tuned - NLL) / (NLL_tuned - NLL_base)")
    forgetting_removed_stderr: float | None
    intruders_left: int | None = Field(description="intruder dimensions left in these weights; None for the base")

    @classmethod
    def of(cls, label: str, point: SweepPoint, base: bool = False) -> EvidenceRow:
        return cls(label=label, scale=point.scale, scores=point.scores, forgetting_nll=point.forgetting_nll,
                   forgetting_stderr=point.forgetting_stderr,
                   forgetting_removed=None if base else point.forgetting_removed,
                   forgetting_removed_stderr=None if base else point.forgetting_removed_stderr,
                   intruders_left=None if base else point.intruders)


class Found(BaseModel):
    """What detection found in TUNED."""

    top_k: int
    epsilon: float
    intruders: int
    matrices: int
    matrices_with_intruders: int
    by_module_type: dict[str, int] = Field(description="intruders per module type (q_proj, ...)")


class ReleaseReport(BaseModel):
    schema_version: str = RELEASE_SCHEMA
    tool_version: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    command: str = Field(description="the command that made the release")
    verdict: Verdict
    ready: bool = Field(description="True: publish the folder; False: a gate failed (exit 1)")
    reason: str = Field(description="the verdict in one sentence")
    base: str
    tuned: str
    base_model: str | None = Field(description="the base's hub id, as the model card's metadata names it")
    format: Literal["adapter", "merged"]
    scale: float | None = Field(description="the released λ (1: TUNED unchanged); None: per-direction λ_i fitted by "
                                            "--fit (logs/fit.json)")
    method: Literal["uniform", "fit"] = Field("uniform", description="one λ over the intruders, or fitted λ_i")
    rule: str = Field(description="how λ was picked: the least forgetting within the accuracy budget")
    max_acc_drop: float
    fail_above: int | None
    found: Found
    edited_directions: int = Field(description="intruder directions whose σ the release scaled (0 at λ = 1)")
    edited_matrices: int
    limit: int | None = Field(description="task examples per evaluation (None: the whole test split)")
    forgetting: str = Field(description="the forgetting corpus")
    corpus_documents: int
    rows: list[EvidenceRow]
    files: list[str] = Field(default_factory=list)

    def row(self, label: str) -> EvidenceRow:
        return next(r for r in self.rows if r.label == label)

    @property
    def tasks(self) -> list[str]:
        return list(self.rows[0].scores)


def evidence(sweep: SweepReport, scale: float) -> list[EvidenceRow]:
    released = next(p for p in sweep.points if p.scale == scale)
    return [EvidenceRow.of("base", sweep.base, base=True), EvidenceRow.of("tuned", sweep.tuned),
            EvidenceRow.of("released", released)]
