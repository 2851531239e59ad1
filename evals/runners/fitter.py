"""``repair fit``: one λ_i per direction, fitted on calibration data to trade forgetting against the task, and
measured on held-out data beside the paper's uniform λ and the whole update scaled (W0 + λ·ΔW).

The path: λ starts at 1 (the tuned model); for each task-loss weight w (largest first, warm-started) a few
projected Adam steps minimise NLL(calibration documents) + w · NLL(calibration targets) over λ ∈ [0, 1]. Each
w's λ is a front point, measured like a sweep point (lm-eval accuracy on the test split, forgetting on the
evaluation corpus); the pick is the one with the least forgetting whose accuracy drop stays within the budget.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evals.measure.accuracy import EvalSettings, check_columns
from evals.measure.calibration import (
    Calibration,
    calibration_documents,
    calibration_split,
    disjoint,
    evaluated_contexts,
    jsonl_examples,
    task_examples,
)
from evals.measure.corpus import is_base_samples, load_corpus, parse_samples
from evals.measure.fit_report import (
    Calibrated,
    FitDirection,
    FitPick,
    FitReport,
    FrontPoint,
    annotate,
    drop,
)
from evals.measure.models import Placement, check_batch_size, is_masked_lm, load_model, source_fingerprint
from evals.measure.objective import Sequence, document_sequences, example_sequences, mean_nll
from evals.measure.results import SweepPoint
from evals.runners.sweeper import Evaluator, SweepOptions
from repair import __version__
from repair.adapters.pairs import PairSource
from repair.detection.detector import DetectOptions
from repair.edit.edits import changed_tensors
from repair.edit.inplace import InPlacePatcher
from repair.edit.plan import check_scale
from repair.edit.scaled import (
    DIRECTIONS,
    OVERLAP_INTRUDER,
    DirectionGroup,
    DirectionScales,
    delta_groups,
    intruder_groups,
)
from repair.errors import OutputError, RepairError
from repair.io.writer import check_output_dir
from repair.runtime.progress import Points, stage

logger = logging.getLogger(__name__)
FITTED_DIR = "fitted"


@dataclass(frozen=True)
class FitOptions:
    out: Path
    tasks: tuple[str, ...] = ()
    max_acc_drop: float = 0.005  # a fraction: 0.005 is half a point of accuracy
    directions: str = "delta"  # measured on the demo adapter: far more forgetting removed than intruders alone
    format: str = "merged"
    forgetting: str = "base-samples"
    limit: int | None = None
    calibration: Path | None = None  # a jsonl of {"prompt", "completion"} instead of the tasks' training splits
    calibration_corpus: str = "base-samples"  # drawn with its own seed; or a corpus file / rolling task
    calibration_documents: int = 64
    calibration_examples: int = 128
    penalties: tuple[float, ...] = (30.0, 10.0, 3.0, 1.0)
    steps: int = 4  # Adam steps per penalty
    lr: float = 0.2
    fit_batch: int = 8  # calibration documents per step; examples: twice as many
    uniform_scales: tuple[float, ...] = (0.0, 0.5)
    whole_scales: tuple[float, ...] = (0.25, 0.5, 0.75)
    seed: int = 0
    detect: DetectOptions = field(default_factory=DetectOptions)
    batch_size: int | str = 8
    dtype: str = "auto"
    device_map: str | None = None
    overwrite: bool = False
    allow_amplify: bool = False
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        self.detect.validate()
        Placement(self.detect.device, self.dtype, self.device_map).validate()
        if not self.tasks:
            raise RepairError("tasks: repair fit needs at least one --task (its accuracy is the budget).")
        if not (math.isfinite(self.max_acc_drop) and 0 <= self.max_acc_drop <= 1):
            raise RepairError(f"max_acc_drop: expected a fraction in [0, 1], got {self.max_acc_drop}.")
        if self.directions not in DIRECTIONS:
            raise RepairError(f"directions: expected intruders or delta, got {self.directions!r}.")
        if self.format not in ("merged", "adapter"):
            raise RepairError(f"format: expected merged or adapter, got {self.format!r}.")
        for name in ("calibration_documents", "calibration_examples", "steps", "fit_batch"):
            if getattr(self, name) < 1:
                raise RepairError(f"{name}: expected a positive integer, got {getattr(self, name)}.")
        if self.limit is not None and self.limit < 1:
            raise RepairError(f"limit: expected a positive integer, got {self.limit}.")
        if not self.penalties or any(not (math.isfinite(w) and w >= 0) for w in self.penalties):
            raise RepairError(f"penalties: expected non-negative weights, got {list(self.penalties)}.")
        if len({f"{w:g}" for w in self.penalties}) != len(self.penalties):
            raise RepairError(f"penalties: expected distinct weights, got {list(self.penalties)}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RepairError(f"lr: expected a positive learning rate, got {self.lr}.")
        for s in (*self.uniform_scales, *self.whole_scales):
            check_scale(s, self.allow_amplify, "--uniform-scales/--whole-scales")
        check_batch_size(self.batch_size)
        self.eval.validate()

    def sweep_options(self) -> SweepOptions:
        """The evaluation a point gets: a sweep's, on the same tasks, limit, corpus and lm-eval flags."""
        return SweepOptions(out=self.out, tasks=self.tasks, forgetting=self.forgetting, limit=self.limit,
                            detect=self.detect, batch_size=self.batch_size, dtype=self.dtype,
                            device_map=self.device_map, eval=self.eval, control="none")


def check_fit(base: str, tuned: str, opts: FitOptions) -> PairSource:
    """Every check that needs no model, before any is loaded."""
    opts.validate()
    check_columns(opts.sweep_options().columns)
    if is_base_samples(opts.calibration_corpus):
        parse_samples(opts.calibration_corpus, opts.calibration_documents, "--calibration-corpus")
    if opts.calibration is not None:
        jsonl_examples(opts.calibration, opts.calibration_examples)
    else:
        for spec in opts.tasks:
            calibration_split(spec)
    src = opts.detect.pairs(base, tuned)
    check_output_dir(opts.out / FITTED_DIR, [src.base_source.path, src.tuned_source.path], opts.overwrite)
    if opts.format == "adapter":
        from repair.edit.patcher import check_adapter_format

        check_adapter_format(src, tuned)
    return src


def _calibration(opts: FitOptions, model, tok, key: str, eval_docs: list[str]) -> Calibration:
    """Calibration documents and examples, with everything the evaluation scores taken out."""
    docs = calibration_documents(opts.calibration_corpus, model, tok, key, opts.calibration_documents,
                                 opts.eval.apply_chat_template)
    tested = [c for spec in opts.tasks for c in evaluated_contexts(spec)]
    if opts.calibration is not None:
        examples, where = jsonl_examples(opts.calibration, opts.calibration_examples), str(opts.calibration)
    else:
        examples = [e for spec in opts.tasks for e in task_examples(spec, opts.calibration_examples, opts.seed)]
        where = "training (else validation) split of " + ", ".join(opts.tasks)
    sources = {"documents": opts.calibration_corpus, "examples": where}
    return disjoint(Calibration(docs, examples, sources=sources), eval_docs, tested)


def whole_update(src: PairSource, param_of, scale: float) -> None:
    """Every tensor the fine-tune changed set to W0 + λ·(W_tuned − W0), from the checkpoints (λ = 1: the merge)."""
    with torch.no_grad():
        for name, merged in changed_tensors(src):
            p = param_of(name)
            if scale == 1.0:
                p.copy_(merged.to(p.dtype))
                continue
            base = src.base.get(name).float()
            p.copy_((base + scale * (merged.float() - base)).to(p.dtype))


class _Cursor:
    """Minibatches that walk through every item once per pass, in an order shuffled afresh for each pass."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.order, self.pos = n, rng, list(range(n)), n

    def take(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < min(size, self.n):
            if self.pos == self.n:  # a new pass; what this batch already holds goes last, so nothing repeats
                self.rng.shuffle(self.order)
                self.order = [i for i in self.order if i not in out] + [i for i in self.order if i in out]
                self.pos = 0
            k = min(size - len(out), self.n - self.pos)
            out += self.order[self.pos:self.pos + k]
            self.pos += k
        return out


def fit_path(scales: DirectionScales, model: torch.nn.Module, doc_seqs: list[Sequence], ex_seqs: list[Sequence],
             opts: FitOptions) -> list[tuple[float, torch.Tensor]]:
    """λ after each penalty of the path (warm-started, projected Adam), with the weight that gave it."""
    rng = random.Random(opts.seed)
    docs, examples = _Cursor(len(doc_seqs), rng), _Cursor(len(ex_seqs), rng)
    upper = math.inf if opts.allow_amplify else 1.0
    path = []
    with scales.hooked() as lam:
        adam = torch.optim.Adam([lam], lr=opts.lr)
        step = 0
        for w in opts.penalties:
            for _ in range(opts.steps):
                forget = mean_nll(model, [doc_seqs[i] for i in docs.take(opts.fit_batch)])
                task = mean_nll(model, [ex_seqs[i] for i in examples.take(2 * opts.fit_batch)]) if w > 0 else \
                    forget.new_zeros(())
                loss = forget + w * task
                logger.debug("fit step %d: w=%g, forgetting %.4f, task %.4f", step, w, float(forget), float(task))
                adam.zero_grad()
                loss.backward()
                adam.step()
                with torch.no_grad():
                    lam.clamp_(0.0, upper)
                step += 1
            path.append((w, lam.detach().clone()))
            logger.info("fit: w=%g, mean λ %.3f, %d of %d directions below 0.5", w, float(lam.detach().mean()),
                        int((lam.detach() < 0.5).sum()), lam.numel())
    return path


@dataclass
class _Run:
    """What one fit holds while it measures: the model, the evaluator, the directions and their scales."""

    ev: Evaluator
    points: Points
    calib: Calibration
    patcher: InPlacePatcher
    scales: DirectionScales
    base: SweepPoint
    tuned: SweepPoint


def _start(base: str, tuned: str, src: PairSource, opts: FitOptions) -> _Run:
    """Load the model and the data, measure base and tuned, find the directions."""
    sweep = opts.sweep_options()
    stage(f"Loading {base}, the evaluation corpus ({opts.forgetting}) and the calibration data")
    model, tok, base_src = load_model(base, placement=sweep.placement, hub=opts.detect.hub())
    if is_masked_lm(model):
        raise RepairError(f"base {base}: repair fit needs a causal language model.")
    key = json.dumps(source_fingerprint(base_src))
    docs = load_corpus(opts.forgetting, model, tok, key, chat=opts.eval.apply_chat_template)
    calib = _calibration(opts, model, tok, key, docs)
    ev = Evaluator(model, tok, docs, sweep, base, tuned)
    n = 2 + len(opts.uniform_scales) + len(opts.whole_scales) + len(opts.penalties)
    stage(f"Measuring {n} points: {ev.describe()}")
    points = Points(n)
    base_point = _measured(points, ev.measure("base", None, 0))
    ev.base_nll = base_point.forgetting_nll
    stage(f"Finding the intruders of {tuned}")
    patcher = InPlacePatcher(model, src, opts.detect)
    groups = intruder_groups(patcher) if opts.directions == "intruders" else delta_groups(
        src, patcher, opts.detect.top_k)
    if not groups:
        hint = "; try --directions delta" if opts.directions == "intruders" else ""
        raise RepairError(f"tuned {tuned}: has no {opts.directions} directions to fit (at k={opts.detect.top_k}, "
                          f"ε={opts.detect.epsilon}){hint}.")
    scales = DirectionScales(model, src, groups, patcher.param)
    tuned_point = _measured(points, ev.measure("tuned", 1.0, patcher.total_intruders))
    return _Run(ev, points, calib, patcher, scales, base_point, tuned_point)


def _fitted_front(run: _Run, opts: FitOptions) -> tuple[list[FrontPoint], float]:
    """Fit the path, then measure each of its points; (the points, the seconds the fitting took)."""
    model, tok = run.ev.model, run.ev.tok
    for p in model.parameters():
        p.requires_grad_(False)
    stage(f"Fitting {run.scales.size} scales ({opts.directions}) on {len(run.calib.documents)} documents and "
          f"{len(run.calib.examples)} examples, {len(opts.penalties)} weights × {opts.steps} steps")
    doc_seqs = document_sequences(model, tok, run.calib.documents)
    ex_seqs = example_sequences(run.ev.lm, run.calib.examples, opts.eval.apply_chat_template)
    if not doc_seqs or not ex_seqs:
        what = "documents have two tokens or more" if not doc_seqs else "examples have a target to score"
        raise RepairError(f"calibration: none of the calibration {what}.")
    t_fit = time.perf_counter()
    path = fit_path(run.scales, model, doc_seqs, ex_seqs, opts)
    seconds = time.perf_counter() - t_fit
    front = []
    for w, lam in path:
        run.scales.apply(lam)
        try:
            left = intruders_left(run.patcher, run.scales, lam) if opts.directions == "intruders" else None
            point = _measured(run.points, run.ev.measure(f"fit-w={w:g}", None, left))
        finally:
            run.scales.restore()
        mass, inside = run.scales.removed_shares(lam)
        front.append(FrontPoint(front="fitted", parameter=w, point=point, scales=[float(x) for x in lam.cpu()],
                                removed_mass=mass, removed_on_intruders=inside / mass if mass > 0 else None))
    return front, seconds


def run_fit(base: str, tuned: str, opts: FitOptions) -> FitReport:
    """Fit, measure the three fronts, write fit.json, fit.md, front.png and the picked checkpoint."""
    t_start = time.perf_counter()
    src = check_fit(base, tuned, opts)
    run = _start(base, tuned, src, opts)
    fronts = _baselines(run.patcher, src, run.ev, opts, run.points)
    fitted, fit_seconds = _fitted_front(run, opts)
    c = run.calib
    report = FitReport(
        tool_version=__version__, arguments=_arguments(base, tuned, opts), directions_kind=opts.directions,
        total_intruders=run.patcher.total_intruders, calibration=Calibrated(
            documents=len(c.documents), examples=len(c.examples), dropped_documents=c.dropped_documents,
            dropped_examples=c.dropped_examples, sources=c.sources),
        base=run.base, tuned=run.tuned, fronts=fronts + fitted, directions=_directions(run.scales.groups),
        pick=FitPick(max_acc_drop=opts.max_acc_drop, label=None), corpus_documents=len(run.ev.docs),
        doc_tokens=run.ev.doc_tokens, fit_seconds=round(fit_seconds, 1))
    annotate(report)
    report.pick = choose(report)
    report.seconds = round(time.perf_counter() - t_start, 1)
    if (opts.out / FITTED_DIR).exists():  # --overwrite: no stale checkpoint beside this fit's report
        shutil.rmtree(opts.out / FITTED_DIR)
    _write_report(report, opts.out)  # first: a failed checkpoint write keeps every measured point
    if report.pick.label is not None:
        lam = next(torch.tensor(f.scales, dtype=torch.float64) for f in fitted if f.point.label == report.pick.label)
        stage(f"Writing the {opts.format} checkpoint of {report.pick.label}")
        report.pick.checkpoint = str(_write_fitted(base, tuned, opts, run.scales, lam))
        _write_report(report, opts.out)
    return report


def _write_report(report: FitReport, out: Path) -> None:
    try:
        report.write(out)
    except OSError as e:
        raise OutputError(f"out {out}: writing the fit's results failed ({e.strerror or e}).") from e


def intruders_left(patcher: InPlacePatcher, scales: DirectionScales, lam: torch.Tensor) -> int:
    """Intruders among the top k of W' when the fit scaled W_tuned's own intruders: W' keeps W_tuned's singular
    vectors with σ_i × |λ_i|, so the 2k triplets kept decide it without a new SVD (as ``intruders_at``)."""
    total = 0
    for e, g in zip(patcher.entries, scales.groups, strict=True):
        s = e.spectrum.clone()
        s[g.indices] *= scales.group_lambdas(g, lam.detach()).abs().to(s.dtype).cpu()
        top = torch.argsort(s, descending=True, stable=True)[: patcher.opts.top_k]
        total += int(e.intruder_mask[top][s[top] > 0].sum())
    return total


def _measured(points: Points, point: SweepPoint) -> SweepPoint:
    acc = "" if point.accuracy is None else f"accuracy {point.accuracy:.3f}, "
    points.finished(point.label, f"{acc}forgetting NLL {point.forgetting_nll:.3f}", point.seconds)
    return point


def _baselines(patcher: InPlacePatcher, src: PairSource, ev: Evaluator, opts: FitOptions,
               points: Points) -> list[FrontPoint]:
    """The uniform-λ front over the intruders and the whole-update front, measured as the fitted one is."""
    out = []
    for s in opts.uniform_scales:
        patcher.apply(s)
        try:
            point = ev.measure(f"uniform={s:g}", s, patcher.intruders_at(s), patcher.frobenius_removed(s))
        finally:
            patcher.restore()
        out.append(FrontPoint(front="uniform", parameter=s, point=_measured(points, point)))
    for s in opts.whole_scales:
        whole_update(src, patcher.param, s)
        try:
            point = ev.measure(f"whole={s:g}", None, None)
        finally:
            whole_update(src, patcher.param, 1.0)
        out.append(FrontPoint(front="whole", parameter=s, point=_measured(points, point)))
    return out


def choose(report: FitReport) -> FitPick:
    """The fitted point with the least forgetting whose measured accuracy drop stays within the budget."""
    bound = report.pick.max_acc_drop
    fitted = [f.point for f in report.fronts if f.front == "fitted"]
    ok = [p for p in fitted if drop(report, p) <= bound + 1e-12]
    if not ok:
        least = min(drop(report, p) for p in fitted)
        return FitPick(max_acc_drop=bound, label=None, reason=f"no fitted point keeps the accuracy drop within "
                       f"{bound:g} (the least: {least:.4f}); allow more, or raise the first --penalties")
    best = min(ok, key=lambda p: p.forgetting_nll)
    return FitPick(max_acc_drop=bound, label=best.label, accuracy_drop=drop(report, best),
                   forgetting_removed=best.forgetting_removed)


def _directions(groups: list[DirectionGroup]) -> list[FitDirection]:
    return [FitDirection(matrix=g.name, rank=r, sigma=round(float(s), 6), intruder=o > OVERLAP_INTRUDER,
                         intruder_overlap=round(float(o), 6))
            for g in groups for r, s, o in zip(g.indices, g.sigma.tolist(), g.overlap, strict=True)]


def _write_fitted(base: str, tuned: str, opts: FitOptions, scales: DirectionScales, lam: torch.Tensor) -> Path:
    """The picked point's exact checkpoint, W_tuned + Σ (λ_i − 1) σ_i u_i v_iᵀ, written by ``repair patch``."""
    from repair.edit.patcher import PatchOptions, patch

    out = opts.out / FITTED_DIR
    patch(base, tuned, PatchOptions(out=out, detect=opts.detect, overwrite=opts.overwrite, format=opts.format,
                                    allow_amplify=opts.allow_amplify, patches=scales.patches(lam, opts.directions),
                                    patches_from=f"repair fit ({opts.directions})"))
    return out


def _arguments(base: str, tuned: str, opts: FitOptions) -> dict[str, object]:
    d = opts.detect
    return {"base": base, "tuned": tuned, "tasks": list(opts.tasks), "max_acc_drop": opts.max_acc_drop,
            "directions": opts.directions, "format": opts.format, "forgetting": opts.forgetting,
            "limit": opts.limit, "calibration": None if opts.calibration is None else str(opts.calibration),
            "calibration_corpus": opts.calibration_corpus, "calibration_documents": opts.calibration_documents,
            "calibration_examples": opts.calibration_examples, "penalties": list(opts.penalties),
            "steps": opts.steps, "lr": opts.lr, "fit_batch": opts.fit_batch, "seed": opts.seed,
            "uniform_scales": list(opts.uniform_scales), "whole_scales": list(opts.whole_scales),
            "top_k": d.top_k, "epsilon": d.epsilon, "side": d.side, "modules": d.modules,
            "lm_eval": opts.eval.record()}
