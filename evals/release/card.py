"""The release's ``README.md``: the adapter's own model card, its metadata completed as the Hub expects, and a
section on what was found, what was done and the evidence (``huggingface_hub.ModelCard``)."""

from __future__ import annotations

import logging
from pathlib import Path

from evals.release.model import EvidenceRow, ReleaseReport

logger = logging.getLogger(__name__)
TAG = "intruder-repair"
SECTION = "## Intruder-dimension repair"


def source_card(folder: Path):
    """TUNED's own model card (``README.md`` in its folder, local or fetched from the hub), or None."""
    from huggingface_hub import ModelCard

    path = folder / "README.md" if folder.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except (ValueError, OSError) as e:  # unparsable YAML header: the card is rebuilt without it
        logger.warning("%s: its model card could not be parsed (%s); writing a new one", path, e)
        return None


def release_card(report: ReleaseReport, source, name: str):
    """The card to publish: ``source``'s text and metadata, plus the repair section and its evaluation results."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    data = source.data if source is not None else ModelCardData()
    if report.base_model is not None:
        data.base_model = report.base_model
    data.library_name = "peft" if report.format == "adapter" else "transformers"
    data.tags = [*(t for t in (data.tags or []) if t != TAG), TAG]
    data.model_name = data.model_name or name
    released = report.row("released")
    data.eval_results = [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=s.metric,
                   metric_value=round(s.value, 4))
        for task, s in released.scores.items()]
    body = source.text if source is not None else f"# {name}\n\nA LoRA adapter of `{report.base}`.\n"
    body = body.split(SECTION)[0].rstrip() + "\n\n" + section(report)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}")


def section(report: ReleaseReport) -> str:
    f = report.found
    types = ", ".join(f"{t} {n}" for t, n in sorted(report.found.by_module_type.items()) if n)
    lines = [SECTION, "",
             f"Checked with intruder-repair {report.tool_version} before release. Verdict: **{report.verdict}**. "
             f"{report.reason}", "",
             f"**What was found.** {f.intruders} intruder dimensions (singular vectors among the top {f.top_k} of a "
             f"fine-tuned matrix whose cosine with every pre-trained singular vector is below ε={f.epsilon:g}) in "
             f"{f.matrices_with_intruders} of {f.matrices} matrices" + (f": {types}." if types else "."), "",
             f"**What was done.** {what_was_done(report)}", "",
             "**Evidence** (task accuracy from lm-eval"
             + ("" if report.limit is None else f" on {report.limit} test examples per task")
             + f"; forgetting: mean NLL per token on {report.corpus_documents} documents of `{report.forgetting}`, "
               "lower is better):", "",
             *evidence_table(report), "",
             f"Made with `{report.command}`.", ""]
    return "\n".join(lines)


def what_was_done(report: ReleaseReport) -> str:
    if report.verdict == "unchanged" or report.edited_directions == 0:
        return "Nothing: the released weights are TUNED's own, unchanged."
    what = ("a PEFT LoRA adapter whose rank grows by each module's intruders and reproduces the edit exactly"
            if report.format == "adapter" else "a merged checkpoint")
    if report.method == "fit":
        return (f"The singular values of {report.edited_directions} directions in {report.edited_matrices} matrices "
                f"were scaled by λ_i fitted on calibration data (`repair fit`), W' = W + Σ (λ_i−1)·σ_i·u_i·v_iᵀ, the "
                f"fitted point with the least forgetting whose accuracy drop stays within {report.max_acc_drop:g}; "
                f"released as {what}. Every λ_i is in logs/fit.json.")
    return (f"The singular values of {report.edited_directions} intruder directions in {report.edited_matrices} "
            f"matrices were scaled by λ={report.scale:g}, W' = W + Σ (λ−1)·σ·u·vᵀ, the λ with the least forgetting "
            f"whose accuracy drop stays within {report.max_acc_drop:g} ({report.rule}); released as {what}.")


def _num(x: float | None, se: float | None = None, pct: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{x:.1%}" + ("" if se is None else f" ± {se:.1%}")
    return f"{x:.4f}" + ("" if se is None else f" ± {se:.4f}")


def evidence_table(report: ReleaseReport) -> list[str]:
    """The markdown table of base, tuned and released: accuracy per task ± stderr, forgetting NLL ± SE, share of
    forgetting removed, intruders left."""
    tasks = report.tasks
    head = ["model", "λ", *(f"{t} ({report.rows[0].scores[t].metric})" for t in tasks), "forgetting NLL",
            "forgetting removed", "intruders left"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        lines.append("| " + " | ".join(table_cells(r, tasks)) + " |")
    return lines


def table_cells(r: EvidenceRow, tasks: list[str]) -> list[str]:
    scale = "fitted" if r.scale is None and r.label == "released" else "–" if r.scale is None else f"{r.scale:g}"
    return [r.label, scale,
            *(_num(r.scores[t].value, r.scores[t].stderr) for t in tasks),
            _num(r.forgetting_nll, r.forgetting_stderr),
            _num(r.forgetting_removed, r.forgetting_removed_stderr, pct=True),
            "–" if r.intruders_left is None else str(r.intruders_left)]
