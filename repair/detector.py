"""The intruder detector: Definition 1 and the algorithm of Fig. 4, per matrix and model-wide."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import __version__
from .archs import module_type
from .errors import RepairError
from .linalg import SVD, effective_rank, lowrank_singular_values, max_abs_cos, svd
from .pairs import MatrixPair, PairSource
from .report import DetectionReport, MatrixReport, Side
from .sources import resolve

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectOptions:
    top_k: int = 10
    epsilon: float = 0.5
    side: Side = "left"
    modules: str | None = None
    allow_pickle: bool = False

    def validate(self) -> None:
        if self.top_k < 1:
            raise RepairError(f"--top-k: expected an integer >= 1, got {self.top_k}.")
        if not 0 < self.epsilon <= 1:
            raise RepairError(f"--epsilon: expected a number in (0, 1], got {self.epsilon}.")
        if self.side not in ("left", "right", "both"):
            raise RepairError(f"--side: expected left, right or both, got {self.side!r}.")


@dataclass(frozen=True)
class MatrixIntruders:
    """Per-matrix detection result, with the tuned SVD kept for the editor."""

    intruders: list[int]  # indices among the top k
    max_cos: torch.Tensor  # (k,) the decisive similarities
    max_cos_left: torch.Tensor | None  # (k,)
    max_cos_right: torch.Tensor | None  # (k,)
    tuned_svd: SVD
    base_svd: SVD


def find_intruders(base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10, epsilon: float = 0.5,
                   side: Side = "left", base_svd: SVD | None = None) -> MatrixIntruders:
    """Intruders of one (out, in) matrix pair.

    A top-k singular vector of ``tuned`` is an intruder when its largest |cos| with every
    singular vector of ``base`` is below ``epsilon``. With ``side="both"`` the left and right
    similarities must both be below ``epsilon`` (the decisive value is their maximum).
    """
    b = base_svd or svd(base)
    t = b if torch.equal(base, tuned) else svd(tuned)
    k = min(top_k, t.S.shape[0])
    left = max_abs_cos(t.U[:, :k], b.U) if side in ("left", "both") else None  # (k,)
    right = max_abs_cos(t.Vh[:k].T, b.Vh.T) if side in ("right", "both") else None  # (k,)
    decisive = left if right is None else right if left is None else torch.maximum(left, right)
    intruders = torch.nonzero(decisive < epsilon).flatten().tolist()
    return MatrixIntruders(intruders, decisive, left, right, t, b)


def delta_effective_rank(pair: MatrixPair) -> tuple[float, float]:
    """Effective rank and Frobenius norm of ``tuned - base``, using LoRA factors when known."""
    if pair.factors is not None:
        s = lowrank_singular_values(*pair.factors)
    else:
        s = torch.linalg.svdvals(pair.tuned.float() - pair.base.float())
    return effective_rank(s), float(s.double().pow(2).sum().sqrt())


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [round(float(x), 6) for x in t]


def analyse_pair(pair: MatrixPair, opts: DetectOptions) -> tuple[MatrixReport, MatrixIntruders]:
    """Detect intruders in one matrix pair and describe them."""
    found = find_intruders(pair.base, pair.tuned, opts.top_k, opts.epsilon, opts.side)
    erank, norm = delta_effective_rank(pair)
    k = found.max_cos.shape[0]
    report = MatrixReport(
        name=pair.name, module_type=module_type(pair.name), shape=list(pair.shape), transposed=pair.transposed,
        intruders=found.intruders, max_cos=_floats(found.max_cos), max_cos_left=_floats(found.max_cos_left),
        max_cos_right=_floats(found.max_cos_right), sigma=_floats(found.tuned_svd.S[:k]),
        effective_rank_delta=round(erank, 6), delta_norm=round(norm, 6),
    )
    return report, found


def detect(base: str, tuned: str, opts: DetectOptions | None = None) -> DetectionReport:
    """Find intruder dimensions in every selected matrix of ``tuned`` against ``base``."""
    opts = opts or DetectOptions()
    opts.validate()
    pairs = PairSource(resolve(base), resolve(tuned), opts.modules, opts.allow_pickle)
    matrices = []
    for pair in tqdm(pairs, total=len(pairs), desc="detect", unit="matrix", disable=None):
        matrices.append(analyse_pair(pair, opts)[0])
        logger.debug("%s: %d intruders", pair.name, len(matrices[-1].intruders))
    return DetectionReport.build(
        matrices, tool_version=__version__, base=base, tuned=tuned, top_k=opts.top_k,
        epsilon=opts.epsilon, side=opts.side, modules=opts.modules,
    )
