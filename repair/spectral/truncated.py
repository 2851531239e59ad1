"""Truncated base spectra: the top singular triplets of a base matrix from a block Krylov solver.

Only products with W0 and W0ᵀ are needed: a few dozen passes over the matrix instead of the
O(m²n + m³) of a complete decomposition, and p · min(m, n) floats to store instead of min(m, n)².

Only Ritz pairs whose residual ‖M z - θ z‖ is at most twice the typical rounding error of forming
the Gram matrix M in float32 (2 sqrt(n) · 6e-8 · θ_1, n = the larger side) are kept, up to the
p asked for; a product budget stops the solver before it chases the slowest directions of a flat
bulk. Each kept vector z_i records how far it may be from W0's own singular vector: the
Davis-Kahan bound sqrt(2) · residual_i / gap_i, the gap measured to every other Ritz value of
the run, less that value's own residual (an a-posteriori estimate, standard for converged Ritz
pairs). The certificates carry these errors, so they hold for W0 itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from repair.runtime.cores import share
from repair.spectral.krylov import GUARD, t_mul, top_eigenpairs
from repair.spectral.linalg import sign_rule
from repair.spectral.spectra import SideName

P_MIN = 32  # fewest base directions kept
P_MARGIN = 16  # p >= k + r + P_MARGIN
BASE_BUDGET = 12  # operator columns per wanted pair before the solver keeps what has converged
MAX_DIM = 8  # basis columns per wanted pair before a thick restart (4 took a quarter more products at 8192 wide)
SEED = 0
COARSE_TOL = 3e-3  # residual (relative to θ_1) at which the bfloat16 coarse solve hands over: about its rounding
COARSE_MIN = 2048  # smaller side from which a matrix gets the coarse solve first (below, float32 alone is quick)
SOLVER = f"budget={BASE_BUDGET},tol=2sqrt(n)u,seed={SEED},coarse=bf16:{COARSE_TOL}@{COARSE_MIN}"  # stored with
# each spectrum; another value is a miss


def base_tol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Kept Ritz residuals, relative to θ_1: twice the typical rounding error (sqrt(n) units in the last
    place) of an n-term Gram entry in ``dtype``."""
    return math.sqrt(n) * torch.finfo(dtype).eps


def p_for(k: int, r: int, d: int) -> int:
    """Base directions to keep for the top ``k`` of a rank-``r`` update of a matrix with smaller side ``d``."""
    return min(d, max(P_MIN, k + r + P_MARGIN))


@dataclass(frozen=True)
class TruncatedSpectrum:
    """The top singular values of W0 (m, n) and their vectors on the smaller side, in W0's orientation.

    ``side == "left"`` (m <= n): Z = U_p, (m, p). ``side == "right"`` (m > n): Z = V_p, (n, p).
    """

    S: torch.Tensor  # (p,) float64, descending
    Z: torch.Tensor  # (d, p) orthonormal columns, float32
    side: SideName
    shape: tuple[int, int]  # (m, n) of W0
    requested: int  # the p asked for (fewer are kept when fewer converged within the budget)
    residual: float  # max over the kept pairs of ‖M z - σ² z‖ (absolute, M = smaller-side Gram)
    errors: torch.Tensor  # (p,) float64: bound on ‖z_i - u_i‖ for W0's own singular vector u_i

    @property
    def p(self) -> int:
        return int(self.S.shape[0])

    @property
    def complete(self) -> bool:
        """Whether the kept directions are the whole smaller side (no tail to bound)."""
        return self.p >= min(self.shape)

    def serves(self, p: int) -> bool:
        """Whether this entry answers a request for ``p`` directions."""
        return self.complete or self.requested >= p

    def head(self, p: int) -> TruncatedSpectrum:
        """At most the first ``p`` directions."""
        if p >= self.p:
            return self
        return TruncatedSpectrum(self.S[:p], self.Z[:, :p], self.side, self.shape, p, self.residual, self.errors[:p])

    def transposed(self) -> TruncatedSpectrum:
        other: SideName = "right" if self.side == "left" else "left"
        return TruncatedSpectrum(self.S, self.Z, other, (self.shape[1], self.shape[0]), self.requested,
                                 self.residual, self.errors)

    def to(self, device) -> TruncatedSpectrum:
        return TruncatedSpectrum(self.S.to(device), self.Z.to(device), self.side, self.shape, self.requested,
                                 self.residual, self.errors.to(device))

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What the cache stores: tensors and string metadata."""
        meta = {"side": self.side, "shape": f"{self.shape[0]},{self.shape[1]}", "requested": str(self.requested),
                "residual": repr(self.residual), "solver": SOLVER}
        tensors = {"S": self.S.cpu().contiguous(), "Z": self.Z.cpu().contiguous(), "E": self.errors.cpu().contiguous()}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> TruncatedSpectrum:
        if meta.get("solver") != SOLVER:
            raise ValueError(f"computed with other solver settings ({meta.get('solver')})")
        shape = tuple(int(x) for x in meta["shape"].split(","))
        return cls(tensors["S"], tensors["Z"], meta["side"], shape, int(meta["requested"]), float(meta["residual"]),
                   tensors["E"])


def gram_operator(W: torch.Tensor, side: SideName):
    """X (b, d, c) -> M X for M = W Wᵀ (side "left") or Wᵀ W, with W (b, m, n)."""
    def left(X: torch.Tensor) -> torch.Tensor:
        return W @ t_mul(W, X)

    def right(X: torch.Tensor) -> torch.Tensor:
        return t_mul(W, W @ X)

    one = left if side == "left" else right

    def apply(X: torch.Tensor) -> torch.Tensor:
        share()
        if X.shape[-1] == 2 and X.device.type == "cpu":  # MKL: two matrix-vector products beat one 2-column
            return torch.cat([one(X[..., :1]), one(X[..., 1:])], -1)  # product (120 against 129 ms, 8192 x 28672)
        return one(X)

    return apply


def _coarse_gram(W: torch.Tensor, side: SideName, dtype: torch.dtype):
    """The Gram operator of a bfloat16 W (b, m, n), taking and giving ``dtype`` blocks (for starting blocks only)."""
    op = gram_operator(W, side)
    return lambda X: op(X.to(torch.bfloat16)).to(dtype)


def compute_truncated(stored: torch.Tensor, p: int, device: torch.device | str = "cpu") -> TruncatedSpectrum:
    """The top ``p`` singular triplets of a stored base tensor (m, n), in float32 (float64 stays float64)."""
    if stored.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(stored.shape)}")
    m, n = stored.shape
    side: SideName = "left" if m <= n else "right"
    d = min(m, n)
    p = min(p, d)
    cd = torch.float64 if stored.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(SEED)
    start = torch.randn(d, min(d, p + GUARD), generator=gen, dtype=cd).to(device)[None]
    want, tol = min(d, p + GUARD), base_tol(max(m, n), cd)
    solve = dict(max_dim=min(d, MAX_DIM * want), max_products=BASE_BUDGET * want, expand_all=False)
    if cd == torch.float32 and d >= COARSE_MIN:
        coarse = stored.detach().to(device=device, dtype=torch.bfloat16)[None]  # (1, m, n)
        start = top_eigenpairs(_coarse_gram(coarse, side, cd), start, p, COARSE_TOL, **solve).Y
        del coarse
    W = stored.detach().to(device=device, dtype=cd)[None]  # (1, m, n)
    res = top_eigenpairs(gram_operator(W, side), start, p, tol, **solve)
    theta, resid = res.theta[0].clamp_min(0), res.residual[0]
    keep = torch.nonzero(resid[:p] <= tol * max(float(theta[0]), torch.finfo(cd).tiny)).flatten()
    Z = res.Y[0][:, keep]  # the converged pairs, in descending order
    Z = Z * sign_rule(Z)
    residual = float(resid[keep].max()) if keep.numel() else 0.0
    errors = vector_errors(theta, resid)[keep]
    return TruncatedSpectrum(theta[keep].sqrt().cpu(), Z.to(cd).cpu(), side, (m, n), p, residual, errors.cpu())


def vector_errors(theta: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """(s,) Davis-Kahan bounds sqrt(2) · r_i / gap_i on each Ritz vector's distance to its eigenvector; the gap
    to every other Ritz value j is shortened by r_j, within which its eigenvalue lies (1 where no gap is left)."""
    gaps = (theta[:, None] - theta[None, :]).abs() - resid[None, :]  # (s, s)
    gaps.fill_diagonal_(float("inf"))
    gap = gaps.amin(1) if theta.numel() > 1 else torch.full_like(theta, float("inf"))
    err = torch.where(gap > 0, 2**0.5 * resid / gap.clamp_min(1e-300), torch.ones_like(gap))
    return torch.where(resid > 0, err, torch.zeros_like(err)).clamp(max=1.0).double()
