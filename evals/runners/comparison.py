"""``repair compare``: a side-by-side lm-eval table of base, tuned and patched checkpoints."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from evals.measure.accuracy import EvalSettings, TaskColumn, check_columns, evaluate_columns, make_lm
from evals.measure.corpus import is_base_samples, load_corpus
from evals.measure.forgetting import forgetting
from evals.measure.lmeval_files import LM_EVAL_DIR, lm_eval_record
from evals.measure.models import Placement, check_batch_size, forgetting_batch, load_model, source_fingerprint
from evals.measure.results import Score, SweepReport
from evals.runners.sweeper import PICKED_DIR
from repair import __version__
from repair.detection.report import SCHEMA_VERSION
from repair.errors import RepairError
from repair.io.sources import HubOptions
from repair.runtime.durable import write_text_atomic

logger = logging.getLogger(__name__)


class CompareRow(BaseModel):
    model: str
    label: str | None = Field(None, description="base, tuned or picked when the model came from a sweep folder")
    scores: dict[str, Score]
    forgetting_nll: float | None = None


class CompareReport(BaseModel):
    schema_version: str = SCHEMA_VERSION
    tool_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tasks: list[str]
    limit: int | None
    lm_eval: dict[str, object] = Field(default_factory=dict, description="lm-eval's flags, as given")
    forgetting: str | None
    rows: list[CompareRow]

    def markdown(self) -> str:
        head = ["model", *self.tasks] + (["forgetting NLL"] if self.forgetting else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [f"{r.label}: {r.model}" if r.label else r.model] + [_cell(r.scores[t]) for t in self.tasks]
            if self.forgetting:
                cells.append(f"{r.forgetting_nll:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(s: Score) -> str:
    err = f" ± {s.stderr:.4f}" if s.stderr is not None else ""
    return f"{s.metric} {s.value:.4f}{err}"


def forgetting_corpus(spec: str, base: str | None, placement: Placement | None, chat: bool,
                      hub: HubOptions | None = None) -> list[str]:
    """The forgetting corpus: base samples are drawn from ``base`` (cached under the same key as a sweep's)."""
    if not is_base_samples(spec):
        return load_corpus(spec)
    model, tok, src = load_model(base, None, placement, hub)
    docs = load_corpus(spec, model, tok, json.dumps(source_fingerprint(src)), chat=chat)
    del model
    gc.collect()
    return docs


@dataclass(frozen=True)
class _Entry:
    ref: str
    label: str | None = None
    base: str | None = None  # the base of a sweep folder's models (LoRA adapters are merged onto it)


def expand_sweep_folders(models: list[str], base: str | None) -> tuple[list[_Entry], str | None]:
    """Each sweep folder (one holding ``sweep.json``) replaced by its base, tuned and picked checkpoint, merged
    onto that sweep's base; and the base for forgetting samples: ``--base``, else the sweeps' common base."""
    out: list[_Entry] = []
    bases: set[str] = set()
    for ref in models:
        report = Path(ref) / "sweep.json"
        if not report.is_file():
            out.append(_Entry(ref, None, base))
            continue
        try:
            data = SweepReport.model_validate_json(report.read_text())
        except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise RepairError(f"{report}: not a sweep report this version reads ({type(e).__name__}).") from e
        sweep_base = str(data.arguments["base"])
        bases.add(sweep_base)
        out += [_Entry(sweep_base, "base"), _Entry(str(data.arguments["tuned"]), "tuned", sweep_base)]
        picked = Path(ref) / PICKED_DIR  # the folder next to sweep.json, wherever the sweep ran from
        if data.pick is not None and data.pick.checkpoint and picked.is_dir():
            out.append(_Entry(str(picked), f"picked λ={data.pick.scale:g}", sweep_base))
        else:
            logger.warning("%s: the sweep wrote no picked checkpoint (--pick with --write-picked); comparing base "
                           "and tuned", ref)
    if base is None and len(bases) > 1:
        raise RepairError(f"MODELS: the sweep folders have different bases ({', '.join(sorted(bases))}); pass --base "
                          "for the forgetting samples.")
    return out, base or next(iter(bases), None)


def run_compare(models: list[str], tasks: list[str], limit: int | None = None, base: str | None = None,
                forgetting_spec: str | None = None, out: Path | None = None, batch_size: int | str = 8,
                placement: Placement | None = None, settings: EvalSettings | None = None) -> CompareReport:
    """Evaluate each model on each task (and optionally forgetting), one model in memory at a time.

    A sweep folder stands for its base, tuned and picked checkpoints. With ``--forgetting base-samples``,
    the corpus is sampled from ``base`` (required), as ``repair sweep`` samples it, so both commands score
    forgetting on the same documents. With ``out``, lm-eval's own result files go to ``out/lm-eval/<n>-<name>``.
    """
    if not models or not tasks:
        raise RepairError("repair compare: expected at least one MODEL and one task in --tasks.")
    check_batch_size(batch_size)
    settings = settings or EvalSettings()
    if settings.log_samples and out is None:
        raise RepairError("log_samples: needs --out, the folder lm-eval's sample files are written to.")
    columns = [TaskColumn(t, settings) for t in tasks]
    names = check_columns(columns, "--tasks")
    entries, base = expand_sweep_folders(models, base)
    if forgetting_spec and is_base_samples(forgetting_spec) and base is None:
        raise RepairError(f"forgetting {forgetting_spec}: needs --base, the model whose own samples measure "
                          "forgetting.")
    docs = forgetting_corpus(forgetting_spec, base, placement, settings.apply_chat_template) if forgetting_spec else None
    rows = [_row(i, e, columns, limit, docs, out, batch_size, placement) for i, e in enumerate(entries)]
    report = CompareReport(tasks=names, limit=limit, lm_eval=settings.record(), forgetting=forgetting_spec, rows=rows)
    if out is not None:
        write_text_atomic(out / "compare.json", json.dumps(report.model_dump(), indent=2) + "\n")
        write_text_atomic(out / "compare.md", report.markdown() + "\n")
    return report


def _row(i: int, entry: _Entry, columns: list[TaskColumn], limit: int | None, docs: list[str] | None,
         out: Path | None, batch_size: int | str, placement: Placement | None) -> CompareRow:
    """One model: its scores (lm-eval's files under ``out``) and forgetting, then freed."""
    ref, label = entry.ref, entry.label
    model, tok, _ = load_model(ref, entry.base, placement)
    lm = make_lm(model, tok, batch_size)
    folder = f"{i}-{(label or Path(ref).resolve().name or 'model').split()[0]}"
    record = lm_eval_record(out / LM_EVAL_DIR / folder) if out is not None else None
    with record or contextlib.nullcontext() as rec:
        scores = evaluate_columns(lm, columns, limit, rec, model_args=f"pretrained={ref}")
    nll = forgetting(model, tok, docs, forgetting_batch(batch_size)).nll if docs else None
    del model, lm
    gc.collect()
    return CompareRow(model=ref, label=label, forgetting_nll=nll,
                      scores={k: Score(metric=v.metric, value=v.value, stderr=v.stderr) for k, v in scores.items()})
