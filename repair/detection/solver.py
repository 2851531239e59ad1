"""The tuned top-k of loaded matrix pairs: certified from truncated base spectra, exact where it must be.

The certified path (``spectral.certified``) needs only the top p base triplets, cached per base
tensor. The exact path needs the complete base spectrum, then the structured top-k for LoRA
factors or a full SVD otherwise. ``method``: ``exact`` and ``certified`` force a path; ``auto``
certifies matrices whose smaller side is at least AUTO_MIN_SIDE, where a complete decomposition
(cubic in that side) costs more than the certificate, and solves smaller ones exactly. A matrix the
certified path cannot decide takes the exact path (a fallback, recorded in the report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from repair.adapters.pairs import MatrixPair, MatrixPairSource
from repair.detection.report import Side
from repair.runtime.pipeline import resolve_device
from repair.spectral.certified import CertifiedProblem, Decisions, certified_topk_many
from repair.spectral.spectra import BaseSpectrum, SideName
from repair.spectral.topk import LowRankProblem, Triplets, dense_topk, structured_topk_many
from repair.spectral.truncated import p_for

logger = logging.getLogger(__name__)


Method = Literal["auto", "certified", "exact"]
AUTO_MIN_SIDE = 1024


def certifies(method: Method, shape: tuple[int, ...]) -> bool:
    """Whether a matrix of this shape takes the certified path."""
    return method == "certified" or (method == "auto" and min(shape) >= AUTO_MIN_SIDE)


def sides_of(side: Side) -> tuple[SideName, ...]:
    return ("left", "right") if side == "both" else (side,)


@dataclass(frozen=True)
class Solved:
    tuned: Triplets  # on the CPU
    fallback: bool  # the certified path could not decide and the exact path answered


def tuned_topks(pairs: list[MatrixPair], spectra: list[BaseSpectrum], k: int) -> list[Triplets]:
    """The exact path for many pairs: LoRA pairs are solved in batches by shape and rank, the rest by SVD."""
    lowrank = [i for i, p in enumerate(pairs) if p.factors is not None]
    problems = [LowRankProblem(pairs[i].base, *pairs[i].factors, spectra[i]) for i in lowrank]
    out: list[Triplets | None] = [None] * len(pairs)
    for i, t in zip(lowrank, structured_topk_many(problems, k), strict=True):
        out[i] = t
    for i, t in enumerate(out):
        if t is None:
            out[i] = dense_topk(pairs[i].tuned, pairs[i].base, spectra[i], k)
    return out


def _on_device(pair: MatrixPair, dev: torch.device) -> MatrixPair:
    if dev.type == "cpu":
        return pair
    factors = None if pair.factors is None else (pair.factors[0].to(dev), pair.factors[1].to(dev))
    return MatrixPair(pair.name, pair.shape, pair.transposed, pair.base.to(dev), lambda: pair.tuned.to(dev), factors)


def exact_topks(src: MatrixPairSource, pairs: list[MatrixPair], k: int, dev: torch.device) -> list[Triplets]:
    moved = [_on_device(p, dev) for p in pairs]
    return tuned_topks(moved, [src.spectrum(p).to(dev) for p in pairs], k)


def certified_problem(src: MatrixPairSource, pair: MatrixPair, k: int, dev: torch.device) -> CertifiedProblem:
    rank = 0 if pair.factors is None else pair.factors[0].shape[1]
    spec = src.truncated(pair, p_for(k, rank, min(pair.base.shape)), dev)
    moved = _on_device(pair, dev)
    return CertifiedProblem(moved.base, spec, moved.factors, None if moved.factors is not None else moved.tuned)


def solve_pairs(src: MatrixPairSource, pairs: list[MatrixPair], k: int, side: Side, decisions: Decisions,
                method: Method = "auto", device: str = "auto", precise: bool = False) -> list[Solved]:
    """The top ``k`` triplets of each pair, on the CPU, with bounds that decide every (τ, n) in ``decisions``.

    ``precise`` polishes certified triplets in float64: for the editor, which writes them into weights.
    """
    dev = resolve_device(device)
    chosen = [i for i, p in enumerate(pairs) if certifies(method, p.base.shape)]
    problems = [certified_problem(src, pairs[i], k, dev) for i in chosen]
    out: list[Triplets | None] = [None] * len(pairs)
    for i, t in zip(chosen, certified_topk_many(problems, k, sides_of(side), decisions, precise), strict=True):
        out[i] = t
    missing = [i for i, t in enumerate(out) if t is None]
    fallbacks = {i for i in missing if i in set(chosen)}
    if fallbacks:
        logger.info("%d of %d matrices not certified; solving them exactly", len(fallbacks), len(chosen))
    for i, t in zip(missing, exact_topks(src, [pairs[i] for i in missing], k, dev), strict=True):
        out[i] = t
    return [Solved(t.cpu(), i in fallbacks) for i, t in enumerate(out)]
