"""``repair release --fit``: the release's weights and evidence from ``repair fit`` instead of a λ sweep.

The released weights are the fit's picked checkpoint (``logs/fitted``), or TUNED unchanged when no fitted point
keeps the accuracy drop within the budget. Intruders left in them are counted by detecting on the written
checkpoint itself: a fit over ΔW's directions changes W_tuned's singular vectors, so no shortcut is exact.
"""

from __future__ import annotations

from pathlib import Path

from evals.measure.fit_report import FitReport
from evals.release.model import EvidenceRow, Found, ReleaseReport
from evals.runners.fitter import FITTED_DIR, FitOptions, run_fit
from repair import __version__
from repair.detection.detector import detect
from repair.detection.report import DetectionReport
from repair.runtime.progress import stage


def run_fitted(base: str, tuned: str, opts: FitOptions) -> tuple[FitReport, Path]:
    """The fit, and the folder of the weights to release (the fitted checkpoint, or TUNED's own at λ = 1)."""
    from repair.edit.patcher import PatchOptions, copy_adapter, patch

    report = run_fit(base, tuned, opts)
    folder = opts.out / FITTED_DIR
    if report.pick.label is None:
        stage("No fitted point within the budget: releasing TUNED unchanged")
        if opts.format == "adapter":
            copy_adapter(opts.detect.pairs(base, tuned), folder, overwrite=True)
        else:
            patch(base, tuned, PatchOptions(out=folder, scale=1.0, detect=opts.detect, overwrite=True))
    return report, folder


def fit_report(base: str, tuned: str, opts, fmt: str, base_model: str | None, detection: DetectionReport,
               fit: FitReport, folder: Path) -> ReleaseReport:
    """``release.json`` of a fitted release (``opts``: the ``ReleaseOptions``): the picked fitted point against
    base and tuned; intruders left are detected in the weights written to ``folder``."""
    picked = next((f for f in fit.fronts if f.point.label == fit.pick.label), None)
    left = detect(base, str(folder), opts.detect).total_intruders if picked is not None else \
        detection.total_intruders
    released = (picked.point if picked is not None else fit.tuned).model_copy(update={"intruders": left})
    changed = [] if picked is None else [d for d, s in zip(fit.directions, picked.scales, strict=True) if s != 1.0]
    gate = opts.fail_above is not None and left > opts.fail_above
    if gate:
        verdict, reason = "gate-failed", (f"{left} intruders are left in the released weights, more than "
                                          f"--fail-above {opts.fail_above}.")
    elif picked is None or not changed:
        verdict, reason = "unchanged", (fit.pick.reason or "the fit left every λ_i at 1") + "; released unchanged."
    else:
        rec = released.forgetting_removed
        verdict, reason = "patched", (f"fitted λ_i remove {'n/a' if rec is None else f'{rec:.0%}'} of the fine-tune's "
                                      f"forgetting for an accuracy drop of {fit.pick.accuracy_drop:.1%}.")
    found = Found(top_k=detection.top_k, epsilon=detection.epsilon, intruders=detection.total_intruders,
                  matrices=len(detection.matrices),
                  matrices_with_intruders=sum(bool(m.intruders) for m in detection.matrices),
                  by_module_type={t: s.intruders for t, s in detection.by_module_type.items()})
    return ReleaseReport(
        tool_version=__version__, command=opts.command or f"repair release {base} {tuned} --fit",
        verdict=verdict, ready=not gate, reason=reason, base=base, tuned=tuned,
        base_model=base_model, format=fmt,
        scale=None if changed else 1.0, method="fit", rule=f"max-acc-drop={opts.max_acc_drop} (fitted λ_i)",
        max_acc_drop=opts.max_acc_drop, fail_above=opts.fail_above, found=found, edited_directions=len(changed),
        edited_matrices=len({d.matrix for d in changed}), limit=opts.limit, forgetting=opts.forgetting,
        corpus_documents=fit.corpus_documents,
        rows=[EvidenceRow.of("base", fit.base, base=True), EvidenceRow.of("tuned", fit.tuned),
              EvidenceRow.of("released", released)])
