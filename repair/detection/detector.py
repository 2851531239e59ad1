"""The intruder detector: Definition 1 and the algorithm of Fig. 4, per matrix and model-wide."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from repair import __version__
from repair.adapters.pairs import MatrixPair, MatrixPairSource, PairSource
from repair.detection.report import DetectionReport, MatrixReport, Side
from repair.detection.solver import Method, certifies, sides_of, solve_pairs, tuned_topks
from repair.errors import RepairError
from repair.io.archs import module_type
from repair.io.sources import HubOptions, resolve
from repair.runtime.cache import ADAPTERS, cache_path
from repair.runtime.pipeline import default_workers, ordered_batches, resolve_device
from repair.spectral.certified import Decisions
from repair.spectral.linalg import effective_rank, lowrank_singular_values
from repair.spectral.spectra import BaseSpectrum, compute_spectrum
from repair.spectral.store import SpectraCache
from repair.spectral.topk import Triplets
from repair.spectral.truncated import p_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectOptions:
    top_k: int = 10
    epsilon: float = 0.5
    side: Side = "left"
    modules: str | None = None
    allow_pickle: bool = False
    cache: bool = True  # reuse and store base spectra in the cache folder
    threads: int = 0  # matrices processed side by side; 0 = one per core
    device: str = "auto"  # where the linear algebra runs: auto, cpu, cuda
    batch_bytes: int = 32 << 20  # base weights per batch of matrices solved together
    method: Method = "auto"  # certified, exact (complete base decompositions), or auto (by size, see solver)
    revision: str | None = None  # hub ids without their own ``@REV``: this revision
    token: str | None = field(default=None, repr=False, compare=False)  # hub token (never recorded)

    def validate(self) -> None:
        if self.top_k < 1:
            raise RepairError(f"top_k: expected an integer >= 1, got {self.top_k}.")
        if not 0 < self.epsilon <= 1:
            raise RepairError(f"epsilon: expected a number in (0, 1], got {self.epsilon}.")
        if self.side not in ("left", "right", "both"):
            raise RepairError(f"side: expected left, right or both, got {self.side!r}.")
        if self.method not in ("auto", "certified", "exact"):
            raise RepairError(f"method: expected auto, certified or exact, got {self.method!r}.")
        if self.threads < 0:
            raise RepairError(f"threads: expected an integer >= 0 (0 = one per core), got {self.threads}.")
        resolve_device(self.device)

    @property
    def workers(self) -> int:
        return self.threads or default_workers()

    def spectra(self) -> SpectraCache:
        return SpectraCache.default() if self.cache else SpectraCache(None)

    def pairs(self, base: str, tuned: str) -> PairSource:
        """The matrix pairs of BASE and TUNED, with the spectra cache these options ask for."""
        hub = self.hub()
        return PairSource(resolve(base, hub), resolve(tuned, hub), self.modules, self.allow_pickle, self.spectra(),
                          self.settings_dir())

    def settings_dir(self) -> Path | None:
        """Where adapter configs as peft resolved them are remembered, with the cache on."""
        return cache_path(ADAPTERS) if self.cache else None

    def hub(self) -> HubOptions:
        return HubOptions(self.revision, self.token, self.allow_pickle)


def detect_options(options: dict, model=None) -> DetectOptions:
    """``DetectOptions`` from keyword options, validated; an unknown name is a TypeError naming the valid ones.

    For a live ``model`` the default device is the one its weights are on.
    """
    names = {f.name for f in fields(DetectOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}.")
    if model is not None and "device" not in options:
        options = {**options, "device": str(next(model.parameters()).device)}
    opts = DetectOptions(**options)
    opts.validate()
    return opts


@dataclass(frozen=True)
class MatrixIntruders:
    """Per-matrix detection result, with the tuned top-k triplets kept for the editor."""

    intruders: list[int]  # indices among the top k
    max_cos: torch.Tensor  # (k,) the decisive similarities (certified lower bounds; exact on the exact path)
    max_cos_upper: torch.Tensor  # (k,) their certified upper bounds (equal on the exact path)
    max_cos_left: torch.Tensor | None  # (k,)
    max_cos_right: torch.Tensor | None  # (k,)
    tuned: Triplets  # at least k + 1 triplets when the matrix has them
    fallback: bool = False  # the certified path could not decide; the exact path did

    @property
    def degenerate(self) -> list[int]:
        k = self.max_cos.shape[0]
        return torch.nonzero(self.tuned.degenerate[:k]).flatten().tolist()


def tuned_topk(base: torch.Tensor, tuned: torch.Tensor | Callable[[], torch.Tensor], k: int,
               spectrum: BaseSpectrum | None = None,
               factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Triplets:
    """The exact top-k triplets of ``tuned`` (out, in) with their base cosines, from the complete spectrum.

    With LoRA ``factors`` (tuned = base + B @ A) the structured path avoids the full SVD; otherwise,
    or when it cannot decide a direction, a full SVD runs. ``tuned`` may be a function that builds
    the dense matrix, called only when the SVD needs it.
    """
    pair = MatrixPair("", tuple(base.shape), False, base, tuned, factors)
    return tuned_topks([pair], [spectrum or compute_spectrum(base)], k)[0]


def decisive(t: Triplets, side: Side) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of the decisive max|cos| of every triplet: with ``both``, the larger of the two sides."""
    bounds = [t.bounds(s) for s in sides_of(side)]
    lo = functools.reduce(torch.maximum, [b[0] for b in bounds])
    return lo, functools.reduce(torch.maximum, [b[1] for b in bounds])


def intruders_in(t: Triplets, top_k: int, epsilon: float, side: Side, fallback: bool = False) -> MatrixIntruders:
    """Definition 1 on computed triplets: the top-k vectors whose largest |cos| is below ε.

    A certified vector is an intruder when its upper bound is below ε (the solver made sure that
    the bounds decide ε); on the exact path both bounds are the value itself.
    """
    k = min(top_k, t.S.shape[0])
    lo, hi = (b[:k] for b in decisive(t, side))
    left = t.bounds("left")[0][:k] if side in ("left", "both") else None  # (k,)
    right = t.bounds("right")[0][:k] if side in ("right", "both") else None  # (k,)
    intruders = torch.nonzero(hi < epsilon).flatten().tolist()
    return MatrixIntruders(intruders, lo, hi, left, right, t, fallback)


def find_intruders(base: torch.Tensor, tuned: torch.Tensor | Callable[[], torch.Tensor], top_k: int = 10,
                   epsilon: float = 0.5, side: Side = "left", spectrum: BaseSpectrum | None = None,
                   factors: tuple[torch.Tensor, torch.Tensor] | None = None, keep: int = 0) -> MatrixIntruders:
    """Intruders of one (out, in) matrix pair.

    A top-k singular vector of ``tuned`` is an intruder when its largest |cos| with every
    singular vector of ``base`` is below ``epsilon``. With ``side="both"`` the left and right
    similarities must both be below ``epsilon`` (the decisive value is their maximum). ``keep``
    asks for more triplets than top_k + 1 (sweeps need 2k).
    """
    t = tuned_topk(base, tuned, max(keep, top_k + 1), spectrum, factors)
    return intruders_in(t, top_k, epsilon, side)


def delta_effective_rank(pair: MatrixPair) -> tuple[float, float]:
    """Effective rank and Frobenius norm of ``tuned - base``, using LoRA factors when known."""
    if pair.factors is not None:
        s = lowrank_singular_values(*pair.factors)
    else:
        s = torch.linalg.svdvals(pair.tuned.float() - pair.base.float())
    return effective_rank(s), float(s.double().pow(2).sum().sqrt())


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [round(float(x), 6) for x in t]


def _report(pair: MatrixPair, found: MatrixIntruders) -> MatrixReport:
    erank, norm = delta_effective_rank(pair)
    k = found.max_cos.shape[0]
    return MatrixReport(
        name=pair.name, module_type=module_type(pair.name), shape=list(pair.shape), transposed=pair.transposed,
        intruders=found.intruders, max_cos=_floats(found.max_cos), max_cos_upper=_floats(found.max_cos_upper),
        max_cos_left=_floats(found.max_cos_left), max_cos_right=_floats(found.max_cos_right),
        sigma=_floats(found.tuned.S[:k]), degenerate=found.degenerate, method=found.tuned.method,
        fallback=found.fallback, effective_rank_delta=round(erank, 6), delta_norm=round(norm, 6),
    )


def analyse_pairs(src: MatrixPairSource, names: list[str], opts: DetectOptions, keep: int = 0, top_k: int | None = None,
                  decisions: Decisions | None = None, precise: bool = False) -> list[tuple[MatrixPair, MatrixIntruders]]:
    """Detect intruders in a batch of matrices (on ``opts.device``); results on the CPU, in order.

    ``keep`` asks for more triplets than top_k + 1, all decided at ε (sweeps need 2k);
    ``decisions`` replaces the (ε, n) pairs the certified bounds must decide (figures need several ε);
    ``precise`` polishes the triplets in float64 for the editor.
    """
    pairs = [src.pair(n) for n in names]
    top_k = opts.top_k if top_k is None else top_k
    decisions = decisions if decisions is not None else ((opts.epsilon, max(keep, top_k)),)
    solved = solve_pairs(src, pairs, max(keep, top_k + 1), opts.side, decisions, opts.method, opts.device,
                         precise)
    found = [intruders_in(s.tuned, top_k, opts.epsilon, opts.side, s.fallback) for s in solved]
    return list(zip(pairs, found, strict=True))


def prefetch(src: MatrixPairSource, opts: DetectOptions, k: int) -> None:
    """Compute the base spectra a cold run needs while peft resolves the adapter config (see PairSource):
    truncated to what the top ``k`` needs for the certified path, complete for the exact one."""
    def p_of(name: str) -> int | None:
        shape = src.base.shape(name)
        return p_for(k, src.raw_rank(name), min(shape)) if certifies(opts.method, shape) else None

    src.prefetch_spectra(opts.workers, p_of, resolve_device(opts.device))


def analyse(src: MatrixPairSource, opts: DetectOptions, keep: int = 0, top_k: int | None = None,
            decisions: Decisions | None = None,
            precise: bool = False) -> Iterator[tuple[MatrixPair, MatrixReport, MatrixIntruders]]:
    """Every pair of ``src`` analysed in batches on all workers, in order, with the loaded pair."""
    prefetch(src, opts, max(keep, (opts.top_k if top_k is None else top_k) + 1))
    work = functools.partial(analyse_pairs, src, opts=opts, keep=keep, top_k=top_k, decisions=decisions,
                             precise=precise)
    results = ordered_batches(work, src.names, opts.workers, src.base.float32_bytes, opts.batch_bytes)
    for pair, found in tqdm(results, total=len(src), desc="detect", unit="matrix", disable=None):
        yield pair, _report(pair, found), found


def detect(base: str, tuned: str, opts: DetectOptions | None = None) -> DetectionReport:
    """Find intruder dimensions in every selected matrix of ``tuned`` against ``base``."""
    opts = opts or DetectOptions()
    opts.validate()
    return detect_source(opts.pairs(base, tuned), opts, base, tuned)


def detect_source(src: MatrixPairSource, opts: DetectOptions, base: str, tuned: str) -> DetectionReport:
    """The detection report of a pair source (folders, or a live model; see ``live``)."""
    matrices = [report for _, report, _ in analyse(src, opts)]
    return DetectionReport.build(
        matrices, tool_version=__version__, base=base, tuned=tuned, top_k=opts.top_k,
        epsilon=opts.epsilon, side=opts.side, modules=opts.modules, cache=src.spectra.stats, method=opts.method,
    )
