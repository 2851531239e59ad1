"""Truncated base spectra: the top p singular triplets of a base matrix from a block Krylov solver.

Only products with W0 and W0ᵀ are needed: a few dozen passes over the matrix instead of the
O(m²n + m³) of a complete decomposition, and p · min(m, n) floats to store instead of min(m, n)².
Each spectrum records what the certificates need to stay honest: the largest residual of the p
Ritz pairs, the next Ritz value (the gap to the rest of the spectrum), and an estimate of the
smallest eigenvalue of the smaller-side Gram matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .krylov import GUARD, lanczos_quadrature, top_eigenpairs
from .linalg import sign_rule
from .spectra import SideName

P_MIN = 32  # fewest base directions kept
P_MARGIN = 16  # p >= k + r + P_MARGIN
BASE_TOL = 1e-6  # Ritz residual ‖M z - θ z‖ relative to θ_1 (M = the smaller-side Gram matrix)
FLOOR_STEPS = 48  # Lanczos steps for the smallest eigenvalue of M
FLOOR_FACTOR = 0.5  # the floor is this share of the smallest Ritz value found
SEED = 0


def p_for(k: int, r: int, d: int) -> int:
    """Base directions to keep for the top ``k`` of a rank-``r`` update of a matrix with smaller side ``d``."""
    return min(d, max(P_MIN, k + r + P_MARGIN))


@dataclass(frozen=True)
class TruncatedSpectrum:
    """The top p singular values of W0 (m, n) and their vectors on the smaller side, in W0's orientation.

    ``side == "left"`` (m <= n): Z = U_p, (m, p). ``side == "right"`` (m > n): Z = V_p, (n, p).
    """

    S: torch.Tensor  # (p,) float64, descending
    Z: torch.Tensor  # (d, p) orthonormal columns, float32
    side: SideName
    shape: tuple[int, int]  # (m, n) of W0
    residual: float  # max over the p pairs of ‖M z - σ² z‖, in units of σ² (M = smaller-side Gram)
    next_sigma2: float  # the (p+1)-th Ritz value of M: the gap below the kept directions
    floor: float  # estimated lower bound of the smallest eigenvalue of M (0 when unknown)

    @property
    def p(self) -> int:
        return int(self.S.shape[0])

    @property
    def complete(self) -> bool:
        """Whether the kept directions are the whole smaller side (no tail to bound)."""
        return self.p >= min(self.shape)

    def head(self, p: int) -> TruncatedSpectrum:
        """The first ``p`` directions (same residual bookkeeping, the gap to the (p+1)-th)."""
        if p >= self.p:
            return self
        nxt = float(self.S[p]) ** 2
        return TruncatedSpectrum(self.S[:p], self.Z[:, :p], self.side, self.shape, self.residual, nxt, self.floor)

    def basis_error(self) -> float:
        """Davis-Kahan bound on the angle between span(Z) and W0's true top-p subspace on that side."""
        if self.complete:
            return 0.0
        gap = float(self.S[-1]) ** 2 - self.next_sigma2
        if gap <= 0:
            return 1.0
        return min(1.0, math.sqrt(self.p) * self.residual / gap)

    def transposed(self) -> TruncatedSpectrum:
        other: SideName = "right" if self.side == "left" else "left"
        return TruncatedSpectrum(self.S, self.Z, other, (self.shape[1], self.shape[0]), self.residual,
                                 self.next_sigma2, self.floor)

    def to(self, device) -> TruncatedSpectrum:
        return TruncatedSpectrum(self.S.to(device), self.Z.to(device), self.side, self.shape, self.residual,
                                 self.next_sigma2, self.floor)

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What the cache stores: tensors and string metadata."""
        meta = {"side": self.side, "shape": f"{self.shape[0]},{self.shape[1]}", "residual": repr(self.residual),
                "next_sigma2": repr(self.next_sigma2), "floor": repr(self.floor)}
        return {"S": self.S.cpu().contiguous(), "Z": self.Z.cpu().contiguous()}, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> TruncatedSpectrum:
        shape = tuple(int(x) for x in meta["shape"].split(","))
        return cls(tensors["S"], tensors["Z"], meta["side"], shape, float(meta["residual"]),
                   float(meta["next_sigma2"]), float(meta["floor"]))


def gram_operator(W: torch.Tensor, side: SideName):
    """X (b, d, c) -> M X for M = W Wᵀ (side "left") or Wᵀ W, with W (b, m, n)."""
    if side == "left":
        return lambda X: W @ (W.mT @ X)
    return lambda X: W.mT @ (W @ X)


def compute_truncated(stored: torch.Tensor, p: int, device: torch.device | str = "cpu") -> TruncatedSpectrum:
    """The top ``p`` singular triplets of a stored base tensor (m, n), in float32 (float64 stays float64)."""
    if stored.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(stored.shape)}")
    m, n = stored.shape
    side: SideName = "left" if m <= n else "right"
    d = min(m, n)
    p = min(p, d)
    cd = torch.float64 if stored.dtype == torch.float64 else torch.float32
    W = stored.detach().to(device=device, dtype=cd)[None]  # (1, m, n)
    op = gram_operator(W, side)
    gen = torch.Generator().manual_seed(SEED)
    start = torch.randn(d, min(d, p + GUARD), generator=gen, dtype=cd).to(device)[None]
    want = min(d, p + GUARD)
    res = top_eigenpairs(op, start, p, BASE_TOL, max_dim=min(d, 3 * want), max_products=60 * want)
    Z = res.Y[0, :, :p]
    Z = Z * sign_rule(Z)
    theta = res.theta[0].clamp_min(0)
    nxt = float(theta[p]) if theta.shape[0] > p else 0.0
    return TruncatedSpectrum(theta[:p].sqrt().cpu(), Z.to(cd).cpu(), side, (m, n), float(res.residual[0, :p].max()),
                             nxt, smallest_eigenvalue_floor(op, d, cd, device))


def smallest_eigenvalue_floor(op, d: int, dtype: torch.dtype, device) -> float:
    """FLOOR_FACTOR times the smallest Ritz value of ``FLOOR_STEPS`` Lanczos steps from a seeded vector.

    An estimate, not a bound: Ritz values approach the smallest eigenvalue from above. It is used
    only on the larger side of a rectangular matrix (see ``certified``), with a factor of safety.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(d, 1, generator=gen, dtype=dtype).to(device)[None]
    q = lanczos_quadrature(op, x, FLOOR_STEPS)
    nodes = q.nodes[q.weights > 0]
    return max(0.0, FLOOR_FACTOR * float(nodes.min())) if nodes.numel() else 0.0
