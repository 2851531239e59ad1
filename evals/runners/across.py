"""Intruders against forgetting across several fine-tunes of one base (the paper reports Spearman's ρ = 0.971).

Each fine-tune's forgetting NLL is measured on the same corpus (base samples are drawn from the base once,
as ``repair sweep`` and ``repair compare`` draw them); the intruder counts come from ``repair figures``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

from evals.measure.forgetting import forgetting
from evals.measure.models import Placement, check_batch_size, forgetting_batch, load_model
from evals.measure.stats import nll
from evals.runners.comparison import forgetting_corpus
from repair.detection.detector import DetectOptions
from repair.figures.curves import FiguresReport, Spearman, make_figures

logger = logging.getLogger(__name__)
MIN_FOR_RHO = 3  # fine-tunes needed before a rank correlation says anything


def figures_with_forgetting(base: str, tuned: Sequence[str], out: Path, forgetting_spec: str, k: int = 10,
                            k_max: int = 50, opts: DetectOptions | None = None, placement: Placement | None = None,
                            batch_size: int | str = 8, labels: Sequence[str] | None = None) -> FiguresReport:
    """``repair figures`` for several fine-tunes, plus each one's forgetting and intruders against it."""
    check_batch_size(batch_size)
    placement = placement or Placement()
    placement.validate()
    report = make_figures(base, list(tuned), out, k, k_max, opts, labels=labels)
    hub = None if opts is None else opts.hub()  # hub ids as the detector fetched them
    docs = forgetting_corpus(forgetting_spec, base, placement, chat=False, hub=hub)
    for a in report.adapters:
        model, tok, _ = load_model(a.tuned, base, placement, hub=hub)
        score = forgetting(model, tok, docs, forgetting_batch(batch_size))
        a.forgetting_nll, a.forgetting_stderr = nll(score.doc_nll, score.doc_tokens)
        del model
        gc.collect()
    report.forgetting = forgetting_spec
    report.spearman = spearman(report)
    report.files.append(str(plot_intruders_vs_forgetting(report, out / "intruders_vs_forgetting.png")))
    report.write(out)
    return report


def spearman(report: FiguresReport) -> Spearman | None:
    """Spearman's ρ of intruder count against forgetting NLL over the fine-tunes (None below three)."""
    from scipy.stats import spearmanr

    pts = [(a.intruders, a.forgetting_nll) for a in report.adapters if a.forgetting_nll is not None]
    if len(pts) < MIN_FOR_RHO:
        logger.warning("Spearman's rho needs at least %d fine-tunes; got %d", MIN_FOR_RHO, len(pts))
        return None
    rho, p_value = spearmanr([p[0] for p in pts], [p[1] for p in pts])
    if rho != rho:  # NaN: one of the two is constant
        logger.warning("Spearman's rho is undefined: the intruder counts or the forgetting NLLs are all equal")
        return None
    return Spearman(rho=float(rho), p_value=float(p_value), n=len(pts))


def plot_intruders_vs_forgetting(report: FiguresReport, path: Path) -> Path:
    from repair.figures.render import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for a in report.adapters:
        ax.errorbar(a.forgetting_nll, a.intruders, xerr=a.forgetting_stderr or 0.0, fmt="o", capsize=3)
        ax.annotate(a.label, (a.forgetting_nll, a.intruders), textcoords="offset points", xytext=(5, 4), fontsize=7)
    a0 = report.adapters[0]
    ax.set_xlabel(f"forgetting NLL ({report.forgetting})")
    ax.set_ylabel(f"intruders (top {a0.top_k}, ε={a0.epsilon})")
    rho = report.spearman
    ax.set_title(f"Spearman ρ = {rho.rho:.3f} (p = {rho.p_value:.2g}, n = {rho.n})" if rho else
                 "Spearman ρ: needs 3 or more fine-tunes that differ", fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
