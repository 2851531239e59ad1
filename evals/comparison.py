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

from .accuracy import check_task, evaluate, make_lm
from .corpus import is_base_samples, load_corpus
from .forgetting import forgetting
from .models import Placement, check_batch_size, load_model, source_fingerprint

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


def _corpus(spec: str, base: str | None, placement: Placement | None) -> list[str]:
    """The forgetting corpus: base samples are drawn from ``base`` (cached under the same key as a sweep's)."""
    if not is_base_samples(spec):
        return load_corpus(spec)
    model, tok, src = load_model(base, None, placement)
    docs = load_corpus(spec, model, tok, json.dumps(source_fingerprint(src)))
    del model
    gc.collect()
    return docs


def run_compare(models: list[str], tasks: list[str], limit: int | None = None, base: str | None = None,
                forgetting_spec: str | None = None, out: Path | None = None, batch_size: int = 8,
                placement: Placement | None = None) -> CompareReport:
    """Evaluate each model on each task (and optionally forgetting), one model in memory at a time.

    With ``--forgetting base-samples``, the corpus is sampled from ``base`` (required), as ``repair sweep``
    samples it, so both commands score forgetting on the same documents.
    """
    if not models or not tasks:
        raise RepairError("repair compare: expected at least one MODEL and one task in --tasks.")
    check_batch_size(batch_size)
    if forgetting_spec and is_base_samples(forgetting_spec) and base is None:
        raise RepairError(f"--forgetting {forgetting_spec}: needs --base, the model whose own samples measure "
                          "forgetting.")
    names = [check_task(t, "--tasks")[1] for t in tasks]
    docs = _corpus(forgetting_spec, base, placement) if forgetting_spec else None
    rows = []
    for ref in models:
        model, tok, _ = load_model(ref, base, placement)
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
