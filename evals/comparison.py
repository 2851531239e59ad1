"""``repair compare``: a side-by-side lm-eval table of base, tuned and patched checkpoints."""

from __future__ import annotations

import gc
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from repair import __version__
from repair.durable import write_text_atomic
from repair.errors import RepairError
from repair.report import SCHEMA_VERSION

from .accuracy import evaluate, make_lm, task_manager_for
from .corpus import load_corpus
from .forgetting import forgetting
from .models import Placement, check_batch_size, load_model

logger = logging.getLogger(__name__)


class Score(BaseModel):
    metric: str
    value: float
    stderr: float | None


class CompareRow(BaseModel):
    model: str
    scores: dict[str, Score]
    forgetting_nll: float | None = None


class CompareReport(BaseModel):
    schema_version: str = SCHEMA_VERSION
    tool_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tasks: list[str]
    limit: int | None
    forgetting: str | None
    rows: list[CompareRow]

    def markdown(self) -> str:
        head = ["model", *self.tasks] + (["forgetting NLL"] if self.forgetting else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.model] + [_cell(r.scores[t]) for t in self.tasks]
            if self.forgetting:
                cells.append(f"{r.forgetting_nll:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(s: Score) -> str:
    err = f" ± {s.stderr:.4f}" if s.stderr is not None else ""
    return f"{s.metric} {s.value:.4f}{err}"


def run_compare(models: list[str], tasks: list[str], limit: int | None = None, base: str | None = None,
                forgetting_spec: str | None = None, out: Path | None = None, batch_size: int = 8,
                placement: Placement | None = None) -> CompareReport:
    """Evaluate each model on each task (and optionally forgetting), one model in memory at a time.

    With ``--forgetting base-samples``, the corpus is sampled from the first model listed.
    """
    if not models or not tasks:
        raise RepairError("repair compare: expected at least one MODEL and one task in --tasks.")
    check_batch_size(batch_size)
    names = [task_manager_for(t)[1] for t in tasks]
    rows, docs = [], None
    for ref in models:
        model, tok, _ = load_model(ref, base, placement)
        if forgetting_spec and docs is None:
            docs = load_corpus(forgetting_spec, model, tok, model_key=f"compare:{ref}")
        lm = make_lm(model, tok, batch_size)
        scores = {s.task: Score(metric=s.metric, value=s.value, stderr=s.stderr)
                  for s in (evaluate(lm, t, limit) for t in tasks)}
        nll = forgetting(model, tok, docs, batch_size).nll if docs else None
        rows.append(CompareRow(model=ref, scores=scores, forgetting_nll=nll))
        del model, lm
        gc.collect()
    report = CompareReport(tasks=names, limit=limit, forgetting=forgetting_spec, rows=rows)
    if out is not None:
        write_text_atomic(out / "compare.json", json.dumps(report.model_dump(), indent=2) + "\n")
        write_text_atomic(out / "compare.md", report.markdown() + "\n")
    return report
