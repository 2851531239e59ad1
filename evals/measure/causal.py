"""The sweep's causal reading: the share of forgetting each edit removes, with standard errors, and the
intruder edit against the control edit at each λ, paired on the corpus documents (see ``evals.measure.stats``)."""

from __future__ import annotations

from evals.measure import stats
from evals.measure.results import ControlComparison, SweepPoint, SweepReport


def annotate(report: SweepReport) -> None:
    """Fill each point's forgetting stderr and removed share, and the control comparisons, in place."""
    tokens, base, tuned = report.doc_tokens, report.base.doc_nll, report.tuned.doc_nll
    if not tokens or len(base) != len(tokens) or len(tuned) != len(tokens):
        return  # points from a corpus without per-document scores
    points = [report.base, report.tuned, *report.points, *(report.control.points if report.control else [])]
    for p in points:
        if len(p.doc_nll) != len(tokens):
            continue
        p.forgetting_stderr = stats.nll(p.doc_nll, tokens)[1]
        p.forgetting_removed, p.forgetting_removed_stderr = stats.share_removed(p.doc_nll, tuned, base)
    if report.control is not None:
        by_scale = {p.scale: p for p in report.points}
        report.control.comparisons = [_compare(by_scale[c.scale], c, tokens) for c in report.control.points
                                      if c.scale in by_scale]


def _compare(intruder: SweepPoint, control: SweepPoint, tokens: list[int]) -> ControlComparison:
    diff, err = stats.paired_difference(control.doc_nll, intruder.doc_nll, tokens)
    return ControlComparison(
        scale=intruder.scale, intruder_removed=intruder.forgetting_removed,
        intruder_removed_stderr=intruder.forgetting_removed_stderr, control_removed=control.forgetting_removed,
        control_removed_stderr=control.forgetting_removed_stderr, difference=diff, difference_stderr=err,
        beyond_two_stderr=err is not None and abs(diff) > 2 * err,
        frobenius_ratio=control.frobenius_removed / intruder.frobenius_removed
        if control.frobenius_removed is not None and intruder.frobenius_removed else None)
