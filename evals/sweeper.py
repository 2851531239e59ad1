"""``repair sweep``: accuracy and forgetting across λ, with one SVD pass and in-place patching."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from repair import __version__
from repair.detector import DetectOptions
from repair.durable import write_text_atomic
from repair.errors import RepairError
from repair.inplace import InPlacePatcher
from repair.plan import check_scale

from .accuracy import check_task, evaluate, make_lm
from .corpus import load_corpus
from .forgetting import forgetting, scored_tokens
from .forgetting import kind as forgetting_kind
from .models import Placement, check_batch_size, load_model, source_fingerprint
from .results import Pick, SweepPoint, SweepReport, markdown_table, plot_tradeoff, write_csv

logger = logging.getLogger(__name__)
_PICK = re.compile(r"^max-acc-drop=(\d*\.?\d+)$")


@dataclass(frozen=True)
class SweepOptions:
    out: Path
    scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    task: str | None = None
    forgetting: str = "base-samples"
    limit: int | None = None
    detect: DetectOptions = field(default_factory=DetectOptions)
    pick: str | None = None
    write_picked: bool = False
    batch_size: int = 8
    allow_amplify: bool = False
    dtype: str = "auto"  # the evaluated model's dtype (see evals.models.Placement)
    device_map: str | None = None  # "auto": accelerate spreads the model (chosen by itself when it does not fit)

    @property
    def placement(self) -> Placement:
        """The model goes where the detector's linear algebra runs (``--device``)."""
        return Placement(self.detect.device, self.dtype, self.device_map)

    def validate(self) -> None:
        self.detect.validate()
        self.placement.validate()
        if not self.scales:
            raise RepairError("--scales: expected at least one λ.")
        for s in self.scales:
            check_scale(s, self.allow_amplify, "--scales")
        if self.pick is not None:
            pick_bound(self.pick)
            if self.task is None:
                raise RepairError("--pick: needs --task, since it bounds the accuracy drop.")
        if self.write_picked and self.pick is None:
            raise RepairError("--write-picked: needs --pick.")
        if self.limit is not None and self.limit < 1:
            raise RepairError(f"--limit: expected a positive integer, got {self.limit}.")
        check_batch_size(self.batch_size)


def pick_bound(rule: str) -> float:
    m = _PICK.match(rule)
    if m is None:
        raise RepairError(f"--pick: expected max-acc-drop=X (e.g. max-acc-drop=0.01), got {rule!r}.")
    return float(m[1])


class _Evaluator:
    """Measures one point: lm-eval accuracy and forgetting NLL of the model as it is now."""

    def __init__(self, model, tok, docs: list[str], opts: SweepOptions):
        self.model, self.tok, self.docs, self.opts = model, tok, docs, opts
        self.lm = make_lm(model, tok, opts.batch_size) if opts.task else None
        self.base_nll: float | None = None
        self.kind, self.tokens = forgetting_kind(model), scored_tokens(model, tok, docs)

    def measure(self, label: str, scale: float | None, intruders: int) -> SweepPoint:
        t0 = time.perf_counter()
        f = forgetting(self.model, self.tok, self.docs, self.opts.batch_size)
        acc = evaluate(self.lm, self.opts.task, self.opts.limit) if self.lm is not None else None
        return SweepPoint(label=label, scale=scale, accuracy=acc and acc.value, accuracy_stderr=acc and acc.stderr,
                          metric=acc and acc.metric, forgetting_nll=f.nll,
                          forgetting_delta=f.nll - (f.nll if self.base_nll is None else self.base_nll),
                          intruders=intruders, seconds=round(time.perf_counter() - t0, 2))


class _PointCache:
    """Finished points as ``DIR/points/<label>.json``, valid only for the same fingerprint."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir, self.fingerprint = out / "points", fingerprint

    def get(self, label: str) -> SweepPoint | None:
        path = self.dir / f"{label}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") != self.fingerprint:
                return None
            point = SweepPoint.model_validate(data["point"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # pydantic's error is a ValueError
            logger.warning("%s: unreadable finished point (%s); measuring %s again", path, e, label)
            return None
        logger.info("resuming: %s from %s", label, path)
        return point

    def put(self, point: SweepPoint) -> SweepPoint:
        """Remember a finished point; a failed write only costs measuring it again on a resumed run."""
        payload = {"fingerprint": self.fingerprint, "point": point.model_dump()}
        try:
            write_text_atomic(self.dir / f"{point.label}.json", json.dumps(payload, indent=2) + "\n")
        except OSError as e:
            logger.warning("%s: could not store the finished point %s (%s); a resumed run measures it again",
                           self.dir, point.label, e.strerror or e)
        return point


def _label(scale: float) -> str:
    return f"scale={scale:g}"


def choose(points: list[SweepPoint], tuned: SweepPoint, base: SweepPoint, rule: str) -> Pick:
    """The λ with the least forgetting whose accuracy drop against λ=1 stays within the bound."""
    bound = pick_bound(rule)
    ok = [p for p in points if tuned.accuracy - p.accuracy <= bound + 1e-12]
    if not ok:
        raise RepairError(f"--pick {rule}: no λ keeps the accuracy drop within {bound}.")
    best = min(ok, key=lambda p: (p.forgetting_nll, -p.accuracy, -p.scale))
    gap = tuned.forgetting_nll - base.forgetting_nll
    recovered = (tuned.forgetting_nll - best.forgetting_nll) / gap if gap > 0 else None
    return Pick(rule=rule, scale=best.scale, accuracy_drop=tuned.accuracy - best.accuracy,
                forgetting_recovered=recovered)


def _arguments(base: str, tuned: str, opts: SweepOptions) -> dict[str, object]:
    d = opts.detect
    return {"base": base, "tuned": tuned, "scales": list(opts.scales), "task": opts.task,
            "forgetting": opts.forgetting, "limit": opts.limit, "top_k": d.top_k, "epsilon": d.epsilon,
            "side": d.side, "modules": d.modules, "pick": opts.pick, "batch_size": opts.batch_size,
            "dtype": opts.dtype}


def run_sweep(base: str, tuned: str, opts: SweepOptions) -> SweepReport:
    """Evaluate base, tuned and each λ; write sweep.json, sweep.csv and tradeoff.png to ``opts.out``."""
    opts.validate()
    if opts.task is not None:
        check_task(opts.task)  # an unknown task is a sentence before any model is loaded
    src = opts.detect.pairs(base, tuned)
    model, tok, base_src = load_model(base, placement=opts.placement)
    docs = load_corpus(opts.forgetting, model, tok, json.dumps(source_fingerprint(base_src)))
    args = _arguments(base, tuned, opts)
    key = [__version__, args, source_fingerprint(base_src), source_fingerprint(src.tuned_source), docs]
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache, ev = _PointCache(opts.out, fingerprint), _Evaluator(model, tok, docs, opts)
    base_point = cache.get("base") or cache.put(ev.measure("base", None, 0))
    ev.base_nll = base_point.forgetting_nll
    patcher = InPlacePatcher(model, src, opts.detect)  # the one SVD pass; the model now holds TUNED
    done: dict[float, SweepPoint] = {}
    for scale in tqdm([1.0, *[s for s in opts.scales if s != 1.0]], desc="sweep", unit="λ", disable=None):
        point = cache.get(_label(scale))
        if point is None and not patcher.entries and 1.0 in done:  # nothing to rescale: every λ is λ=1
            point = cache.put(done[1.0].model_copy(update={"label": _label(scale), "scale": scale, "seconds": 0.0}))
        if point is None:
            patcher.apply(scale)
            point = cache.put(ev.measure(_label(scale), scale, patcher.intruders_at(scale)))
            patcher.restore()
        done[scale] = point
    tuned_point = done[1.0].model_copy(update={"label": "tuned"})
    report = SweepReport(
        tool_version=__version__, arguments=args, fingerprint=fingerprint, forgetting_kind=ev.kind,
        corpus_documents=len(docs), corpus_tokens=ev.tokens, total_intruders=patcher.total_intruders,
        base=base_point, tuned=tuned_point, points=[done[s] for s in opts.scales],
    )
    if opts.pick:
        report.pick = choose(report.points, tuned_point, base_point, opts.pick)
        if opts.write_picked:
            report.pick.checkpoint = str(_write_picked(base, tuned, opts, report.pick.scale))
    _write_outputs(report, opts.out)
    return report


def _write_picked(base: str, tuned: str, opts: SweepOptions, scale: float) -> Path:
    from repair.patcher import PatchOptions, patch

    out = opts.out / "picked"
    patch(base, tuned, PatchOptions(out=out, scale=scale, detect=opts.detect, overwrite=True,
                                    allow_amplify=opts.allow_amplify))
    return out


def _write_outputs(report: SweepReport, out: Path) -> None:
    try:
        _write_files(report, out)
    except OSError as e:
        raise RepairError(f"--out {out}: writing the sweep's results failed ({e.strerror or e}); the finished "
                          "points are kept, so a rerun resumes.") from e


def _write_files(report: SweepReport, out: Path) -> None:
    write_text_atomic(out / "sweep.json", report.model_dump_json(indent=2) + "\n")
    write_csv(report, out / "sweep.csv")
    write_text_atomic(out / "sweep.md", markdown_table(report) + "\n")
    plot_tradeoff(report, out / "tradeoff.png")
