"""``repair release``: detect -> sweep λ -> pick within the accuracy budget -> write the folder to publish.

The measurements live in a work folder beside ``out`` (``.NAME.release/``) until the release is published, so a
failed run keeps every measured point and the same command resumes; ``out`` itself appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from evals.measure.accuracy import EvalSettings
from evals.measure.results import SweepReport
from evals.release.fitted import fit_report, run_fitted
from evals.release.model import Found, ReleaseReport, evidence
from evals.runners.sweeper import PICKED_DIR, SweepOptions, check_sweep, run_sweep
from repair import __version__
from repair.detection.detector import DetectOptions, detect
from repair.detection.report import DetectionReport
from repair.errors import OutputError, RepairError, RunFailed
from repair.io.archs import EMBEDDED_MODELS
from repair.io.sources import looks_like_hub_id
from repair.io.writer import check_output_dir
from repair.runtime.durable import atomic_output_dir, write_text_atomic
from repair.runtime.progress import stage

logger = logging.getLogger(__name__)
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class ReleaseOptions:
    out: Path
    tasks: tuple[str, ...]
    max_acc_drop: float
    scales: tuple[float, ...] = SCALES  # λ = 1 (TUNED unchanged) is always measured, so a λ is always found
    forgetting: str = "base-samples"
    limit: int | None = None
    control: str = "none"  # the control edit, once, when the evidence should include it
    format: str | None = None  # adapter where TUNED is a LoRA adapter, merged otherwise
    fail_above: int | None = None  # the gate: more intruders left in the released weights fail the release
    overwrite: bool = False
    batch_size: int | str = 8
    dtype: str = "auto"
    device_map: str | None = None
    per_matrix: int | None = None
    allow_amplify: bool = False
    detect: DetectOptions = field(default_factory=DetectOptions)
    eval: EvalSettings = field(default_factory=EvalSettings)
    command: str = ""  # recorded in the card and release.json
    method: str = "uniform"  # uniform: one λ over the intruders (a sweep); fit: per-direction λ_i (repair fit)
    directions: str = "delta"  # method fit: which directions get a λ_i
    calibration: Path | None = None  # method fit: task examples (jsonl) where the tasks have no training split

    def fit(self, work: Path, fmt: str):
        """The fit a ``--fit`` release runs: the same tasks, budget, corpus and evaluation flags."""
        from evals.runners.fitter import FitOptions

        return FitOptions(out=work / "logs", tasks=self.tasks, max_acc_drop=self.max_acc_drop,
                          directions=self.directions, format=fmt, forgetting=self.forgetting, limit=self.limit,
                          calibration=self.calibration,
                          detect=self.detect, batch_size=self.batch_size, dtype=self.dtype,
                          device_map=self.device_map, overwrite=True,
                          allow_amplify=self.allow_amplify, eval=self.eval)

    def sweep(self, work: Path, fmt: str) -> SweepOptions:
        return SweepOptions(
            out=work / "logs", scales=tuple(dict.fromkeys([*self.scales, 1.0])), tasks=self.tasks,
            forgetting=self.forgetting, limit=self.limit, detect=self.detect, pick=f"max-acc-drop={self.max_acc_drop}",
            write_picked=True, overwrite=True, format=fmt, batch_size=self.batch_size, allow_amplify=self.allow_amplify,
            dtype=self.dtype, device_map=self.device_map, control=self.control, per_matrix=self.per_matrix,
            eval=self.eval)

    def validate(self) -> None:
        if not self.tasks:
            raise RepairError("tasks: a release needs at least one --task, since it bounds the accuracy drop.")
        if not 0 <= self.max_acc_drop <= 1:
            raise RepairError(f"max_acc_drop: expected an accuracy drop in [0, 1], got {self.max_acc_drop}.")
        if self.fail_above is not None and self.fail_above < 0:
            raise RepairError(f"fail_above: expected a number of intruders >= 0, got {self.fail_above}.")
        if self.format not in (None, "adapter", "merged"):
            raise RepairError(f"format: expected adapter or merged, got {self.format!r}.")
        if self.method not in ("uniform", "fit"):
            raise RepairError(f"method: expected uniform or fit, got {self.method!r}.")
        if self.method == "fit" and (self.control != "none" or self.per_matrix is not None
                                     or self.scales != SCALES):
            raise RepairError("fit: fits every direction's λ itself; --scales, --control and --per-matrix belong "
                              "to the swept release (without --fit).")
        if self.method == "uniform" and (self.calibration is not None or self.directions != "delta"):
            raise RepairError("directions/calibration: belong to a fitted release; add --fit.")


def work_dir(out: Path) -> Path:
    """Where a release's measurements live until it is published (kept when a run fails, for the rerun)."""
    out = Path(out)
    return out.parent / f".{out.name}.release"


def log_path(out: Path) -> Path:
    """The run's log (other libraries' output), published as ``logs/run.log``."""
    return work_dir(out) / "logs" / "run.log"


@dataclass(frozen=True)
class Checked:
    """What the checks found: the format to write and TUNED's local folder (for its model card)."""

    format: str
    tuned_folder: Path


def check_release(base: str, tuned: str, opts: ReleaseOptions) -> Checked:
    """Every check that needs no model (exit 2 before anything is loaded or written)."""
    opts.validate()
    src = opts.detect.pairs(base, tuned)
    from repair.edit.patcher import adapter_format_allowed, check_adapter_format

    fmt = opts.format or ("adapter" if adapter_format_allowed(src) else "merged")
    if fmt == "adapter":
        check_adapter_format(src, tuned)
    check_output_dir(opts.out, [src.base_source.path, src.tuned_source.path], opts.overwrite)
    if opts.method == "fit":
        from evals.runners.fitter import check_fit

        check_fit(base, tuned, opts.fit(work_dir(opts.out), fmt))
    else:
        check_sweep(base, tuned, dataclasses.replace(opts.sweep(work_dir(opts.out), fmt), write_picked=False))
    return Checked(fmt, src.tuned_source.path)


def run_release(base: str, tuned: str, opts: ReleaseOptions) -> ReleaseReport:
    """Detect, sweep, pick and write ``opts.out``; the report says whether it is ready (``ready``)."""
    checked = check_release(base, tuned, opts)
    stage(f"Detecting intruder dimensions of {tuned} against {base}")
    detection = detect(base, tuned, opts.detect)
    stage(f"Found {detection.total_intruders} intruders in "
          f"{sum(bool(m.intruders) for m in detection.matrices)} of {len(detection.matrices)} matrices")
    work = work_dir(opts.out)
    try:
        if opts.method == "fit":
            fitted, folder = run_fitted(base, tuned, opts.fit(work, checked.format))
            report = fit_report(base, tuned, opts, checked.format, base_model_id(base, checked.tuned_folder),
                                detection, fitted, folder)
        else:
            sweep = run_sweep(base, tuned, opts.sweep(work, checked.format))
            report, folder = _report(base, tuned, opts, checked, detection, sweep), work / "logs" / PICKED_DIR
        stage(f"Writing the release to {opts.out}")
        _publish(opts, work, report, detection, checked.tuned_folder, folder)
    except RunFailed:
        raise
    except OutputError as e:
        raise OutputError(f"{e} {_resume_hint(opts, work)}") from e
    except RepairError as e:  # the input passed every check: whatever fails now is not the user's command
        raise RunFailed(f"{e} {_resume_hint(opts, work)}") from e
    shutil.rmtree(work, ignore_errors=True)
    return report


def _resume_hint(opts: ReleaseOptions, work: Path) -> str:
    if opts.method == "fit":  # a fit keeps no finished points: it starts again
        return f"The fit's report, if it got that far, is in {work / 'logs'}; the same command runs it again."
    return f"The measured points are kept in {work / 'logs' / 'points'}; the same command resumes."


def base_model_id(base: str, tuned_folder: Path) -> str | None:
    """The base's hub id for the card: the id given, the embedded model's, or the adapter config's."""
    ref = base.partition("@")[0]
    if ref in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[ref].hub_id
    if looks_like_hub_id(ref):
        return ref
    config = tuned_folder / "adapter_config.json"
    if config.is_file():
        named = json.loads(config.read_text()).get("base_model_name_or_path") or ""
        if named in EMBEDDED_MODELS:
            return EMBEDDED_MODELS[named].hub_id
        if looks_like_hub_id(named):
            return named
    return None


def _report(base: str, tuned: str, opts: ReleaseOptions, checked: Checked, detection: DetectionReport,
            sweep: SweepReport) -> ReleaseReport:
    scale = sweep.pick.scale  # λ = 1 is always swept, so a λ meets any budget
    released = next(p for p in sweep.points if p.scale == scale)
    edited = [m for m in detection.matrices if m.intruders] if scale != 1.0 else []
    by_type = {t: s.intruders for t, s in detection.by_module_type.items()}
    found = Found(top_k=detection.top_k, epsilon=detection.epsilon, intruders=detection.total_intruders,
                  matrices=len(detection.matrices), matrices_with_intruders=sum(bool(m.intruders)
                                                                             for m in detection.matrices),
                  by_module_type=by_type)
    gate = opts.fail_above is not None and released.intruders > opts.fail_above
    if gate:
        verdict, reason = "gate-failed", (f"{released.intruders} intruders are left in the released weights, more "
                                          f"than --fail-above {opts.fail_above}.")
    elif scale == 1.0 or not edited:
        verdict = "unchanged"
        reason = ("No intruder dimension was found; the adapter is released unchanged." if not detection.total_intruders
                  else f"No λ < 1 keeps the accuracy drop within {opts.max_acc_drop:g}; released unchanged (λ=1).")
    else:
        rec = released.forgetting_removed
        verdict, reason = "patched", (f"λ={scale:g} removes {'n/a' if rec is None else f'{rec:.0%}'} of the "
                                      f"fine-tune's forgetting for an accuracy drop of {sweep.pick.accuracy_drop:.1%}.")
    return ReleaseReport(
        tool_version=__version__, command=opts.command or f"repair release {base} {tuned}", verdict=verdict,
        ready=not gate, reason=reason, base=base, tuned=tuned,
        base_model=base_model_id(base, checked.tuned_folder), format=checked.format, scale=scale,
        rule=sweep.pick.rule, max_acc_drop=opts.max_acc_drop, fail_above=opts.fail_above, found=found,
        edited_directions=sum(len(m.intruders) for m in edited), edited_matrices=len(edited), limit=opts.limit,
        forgetting=opts.forgetting, corpus_documents=sweep.corpus_documents, rows=evidence(sweep, scale))


def _publish(opts: ReleaseOptions, work: Path, report: ReleaseReport, detection: DetectionReport,
             tuned_folder: Path, weights: Path) -> None:
    """The folder to publish (the weights from ``weights``), written whole in a temporary sibling and renamed to
    ``out``."""
    from evals.release.card import release_card, source_card
    from evals.release.page import render

    logs = work / "logs"
    detection.write_json(logs / "detect.json")
    similarity = _similarity_figure(report.base, report.tuned, opts.detect, detection, logs / "similarity.png")
    try:
        with atomic_output_dir(opts.out, opts.overwrite) as tmp:
            for f in sorted(weights.iterdir()):
                shutil.copyfile(f, tmp / f.name)
            shutil.copytree(logs, tmp / "logs", ignore=shutil.ignore_patterns(weights.name),
                            copy_function=shutil.copyfile)  # modes: sync_tree
            report.files = sorted([*(p.name for p in tmp.iterdir()), "README.md", "report.html", "release.json"])
            card = release_card(report, source_card(tuned_folder), opts.out.resolve().name)
            write_text_atomic(tmp / "README.md", str(card))
            figure = logs / ("front.png" if opts.method == "fit" else "tradeoff.png")
            write_text_atomic(tmp / "report.html", render(report, detection, figure, similarity))
            write_text_atomic(tmp / "release.json", report.model_dump_json(indent=2) + "\n")
    except OSError as e:
        raise OutputError(f"out {opts.out}: writing the release failed ({e.strerror or e}); nothing was "
                          "written there.") from e


def _similarity_figure(base: str, tuned: str, detect_opts: DetectOptions, detection: DetectionReport,
                       path: Path) -> Path | None:
    """The similarity matrix of the worst matrix (the one with the most intruders), or None without intruders."""
    from repair.figures.curves import collect, plot_similarity

    worst = [m for m in detection.worst(1) if m.intruders]
    if not worst:
        return None
    opts = dataclasses.replace(detect_opts, modules=f"^{re.escape(worst[0].name)}$")
    stats = collect(base, tuned, detection.top_k, detection.top_k, opts)
    return plot_similarity(stats[0], detection.epsilon, path) if stats else None
