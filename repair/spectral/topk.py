"""Top-k singular triplets of a fine-tuned matrix and their cosines with the base singular vectors.

For a LoRA update, W = W0 + B A with B (m, r) and A (r, n). With W0 = U0 Σ0 V0ᵀ and m <= n, the
Gram matrix of W in the U0 basis is diagonal plus rank 2r:

    U0ᵀ W Wᵀ U0 = Σ0² + X Gᵀ + G Xᵀ + X (A Aᵀ) Xᵀ,    X = U0ᵀ B,   G = U0ᵀ W0 Aᵀ = Σ0 V0ᵀ Aᵀ

so its top eigenpairs (σ², y) come from a subspace solver whose products cost O(m r), started
from the top base directions and the update's, refined by rational (Davidson) corrections. y holds
the coordinates of u = U0 y in the U0 basis: the cosines themselves. Tall matrices are solved as their transpose. Everything else (full
fine-tunes, DoRA, replaced modules) takes the exact path: a full SVD of W.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from repair.spectral.krylov import orthonormal_complement, sym
from repair.spectral.linalg import fix_signs, svd
from repair.spectral.spectra import BaseSpectrum, SideName

logger = logging.getLogger(__name__)

DEGENERATE_GAP = 1e-3  # |σ_i - σ_j| <= this * σ_1: the singular vectors are not unique
RESIDUAL_TOL = 1e-8  # Ritz residual relative to λ_1: vectors good to ~1e-8 / relative gap
DENSE_SIZE = 160  # smaller problems are solved densely
MAX_BASIS_FRACTION = 0.5  # a basis larger than this share of p goes dense instead
MAX_ROUNDS = 12
Q_EXTRA = 8  # head coordinate vectors beyond k + r


class Triplets(Protocol):
    """What detection and editing need of a matrix's top-k, from any path (exact or certified)."""

    S: torch.Tensor  # (k,)
    degenerate: torch.Tensor  # (k,) bool
    method: str

    @property
    def U(self) -> torch.Tensor: ...  # (m, k)

    @property
    def Vh(self) -> torch.Tensor: ...  # (k, n)

    def bounds(self, side: SideName) -> tuple[torch.Tensor, torch.Tensor]: ...  # (k,), (k,)

    def cos_head(self, side: SideName, h: int) -> torch.Tensor: ...  # (k, h)

    def transposed(self) -> Triplets: ...

    def cpu(self) -> Triplets: ...


@dataclass(frozen=True)
class TopK:
    """The leading singular triplets of W and the |cos| of their vectors with all base vectors.

    Detection needs only σ and the cosines; the vectors themselves (for the editor) and the
    cosines of a side the solver did not produce are computed on first use.
    """

    S: torch.Tensor  # (k,)
    degenerate: torch.Tensor  # (k,) bool: σ_i within DEGENERATE_GAP of a neighbour
    method: str  # "structured" or "dense"
    W0: torch.Tensor = field(repr=False)  # (m, n) the base, for the implicit side's coordinates
    spec: BaseSpectrum = field(repr=False)
    known: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # side -> (k, p) |cos|
    vectors: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def _uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._cache:
            self._cache["U"], self._cache["Vh"] = self.vectors()
        return self._cache["U"], self._cache["Vh"]

    @property
    def U(self) -> torch.Tensor:  # (m, k)
        return self._uv()[0]

    @property
    def Vh(self) -> torch.Tensor:  # (k, n)
        return self._uv()[1]

    def cos(self, side: SideName) -> torch.Tensor:
        """(k, p): |cos| of each top-k singular vector on ``side`` with every base singular vector."""
        if side not in self.known:
            vectors = self.U if side == "left" else self.Vh.T
            self.known[side] = self.spec.coords(self.W0, vectors, side).abs().to(self.S.dtype)
        return self.known[side]

    @property
    def cos_left(self) -> torch.Tensor:
        return self.cos("left")

    @property
    def cos_right(self) -> torch.Tensor:
        return self.cos("right")

    def bounds(self, side: SideName) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of each vector's max|cos| with every base vector: equal, since this path is exact."""
        c = self.cos(side).amax(dim=1)
        return c, c

    def cos_head(self, side: SideName, h: int) -> torch.Tensor:
        """(k, h) |cos| with the top-h base singular vectors."""
        return self.cos(side)[:, :h]

    def transposed(self) -> TopK:
        """The same triplets for Wᵀ (signs fixed again in the new orientation)."""
        known = {("right" if s == "left" else "left"): c for s, c in self.known.items()}

        def vectors() -> tuple[torch.Tensor, torch.Tensor]:
            U, Vh = self._uv()
            return fix_signs(Vh.T, U.T)

        return TopK(self.S, self.degenerate, self.method, self.W0.T, self.spec.transposed(), known, vectors)

    def cpu(self) -> TopK:
        U, Vh = self.U.cpu(), self.Vh.cpu()
        return TopK(self.S.cpu(), self.degenerate.cpu(), self.method, self.W0.cpu(), self.spec.cpu(),
                    {s: c.cpu() for s, c in self.known.items()}, lambda: (U, Vh))


def degenerate_flags(S: torch.Tensor) -> torch.Tensor:
    """Flag each σ_i that lies within DEGENERATE_GAP · σ_1 of its neighbours."""
    flags = torch.zeros(S.shape[0], dtype=torch.bool, device=S.device)
    if S.numel() > 1:
        close = (S[:-1] - S[1:]).abs() <= DEGENERATE_GAP * S[0]
        flags[:-1] |= close
        flags[1:] |= close
    return flags


def dense_topk(W: torch.Tensor, W0: torch.Tensor, spec: BaseSpectrum, k: int) -> TopK:
    """The exact path: a full SVD of W (m, n), truncated to k triplets."""
    t = svd(W)
    k = min(k, t.S.shape[0])
    U, Vh = t.U[:, :k], t.Vh[:k]
    return TopK(t.S[:k], degenerate_flags(t.S[:k]), "dense", W0, spec, {}, lambda: (U, Vh))


@dataclass(frozen=True)
class LowRankProblem:
    """W = W0 + B A with the spectrum of W0, all in (out, in) orientation."""

    W0: torch.Tensor  # (m, n)
    B: torch.Tensor  # (m, r), scaling included
    A: torch.Tensor  # (r, n)
    spec: BaseSpectrum

    def oriented(self) -> tuple[bool, LowRankProblem]:
        """(transposed, problem) with the basis on the left: tall matrices are solved as Wᵀ."""
        if self.spec.side == "left":
            return False, self
        return True, LowRankProblem(self.W0.T, self.A.T, self.B.T, self.spec.transposed())


def structured_topk(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, spec: BaseSpectrum,
                    k: int) -> TopK | None:
    """Top-k triplets of W0 + B A from the base spectrum; None when W has fewer than k nonzero σ."""
    return structured_topk_many([LowRankProblem(W0, B, A, spec)], k)[0]


def structured_topk_many(problems: list[LowRankProblem], k: int) -> list[TopK | None]:
    """``structured_topk`` for many problems: those of one shape and rank are solved as one batch,
    so a layer's worth of matrices costs a handful of large operations instead of hundreds of small ones."""
    out: list[TopK | None] = [None] * len(problems)
    groups: dict[tuple, list[tuple[int, bool, LowRankProblem]]] = {}
    for i, problem in enumerate(problems):
        flip, pr = problem.oriented()
        key = (tuple(pr.W0.shape), pr.B.shape[1], pr.W0.dtype == torch.float64, pr.W0.device)
        groups.setdefault(key, []).append((i, flip, pr))
    for group in groups.values():
        for (i, flip, _), t in zip(group, _solve_batch([pr for _, _, pr in group], k), strict=True):
            out[i] = t.transposed() if (flip and t is not None) else t
    return out


def _solve_batch(problems: list[LowRankProblem], k: int) -> list[TopK | None]:
    """Problems of one shape (m <= n) and rank, solved together.

    Only O(m n r) products touch the big matrices; the eigenproblem runs on the batch at once.
    Both sides' cosines come from the solution: y (the left coordinates) and, for the right side,
    V0ᵀ v = (Σ0 y + Σ0⁻¹ G Xᵀ y) / σ, since V0ᵀ Aᵀ = Σ0⁻¹ G.
    """
    cd = torch.float64 if problems[0].W0.dtype == torch.float64 else torch.float32  # big products in cd
    f64 = torch.float64
    parts = []
    for pr in problems:
        U0, B, A = pr.spec.Z.to(cd), pr.B.to(cd), pr.A.to(cd)
        parts.append((U0.T @ B, U0.T @ (pr.W0.to(cd) @ A.T), A @ A.T))  # (m, r), (m, r), (r, r)
    X, G, AAt = (torch.stack(t).to(f64) for t in zip(*parts, strict=True))
    S0 = torch.stack([pr.spec.S.to(X.device, f64) for pr in problems])  # (b, m)
    r = X.shape[-1]
    eye = torch.eye(r, dtype=f64, device=X.device).expand(len(problems), r, r)
    H = torch.cat([torch.cat([AAt, eye], -1), torch.cat([eye, torch.zeros_like(eye)], -1)], -2)  # (b, 2r, 2r)
    k = min(k, X.shape[1])
    lam, Y = top_eigs(S0**2, torch.cat([X, G], -1), H, k)  # (b, k), (b, m, k)
    S = lam.clamp_min(0).sqrt()
    inv = 1 / torch.where(S0[:, :1] * 1e-12 < S0, S0, torch.full_like(S0, float("inf")))  # 0 where σ0 = 0
    R = (S0[..., None] * Y + (G * inv[..., None]) @ (X.mT @ Y)) / S[:, None, :].clamp_min(1e-300)
    results: list[TopK | None] = []
    for i, pr in enumerate(problems):
        if k == 0 or S[i, -1] <= S[i, 0] * 1e-6:
            results.append(None)  # (near-)zero σ: the vector is arbitrary; let the exact path pick it
            continue
        known = {"left": Y[i].T.abs().to(cd), "right": R[i].T.abs().to(cd)}
        results.append(TopK(S[i].to(cd), degenerate_flags(S[i]), "structured", pr.W0, pr.spec, known,
                            partial(_lowrank_vectors, pr, Y[i], S[i], cd)))
    return results


def _lowrank_vectors(pr: LowRankProblem, Y: torch.Tensor, S: torch.Tensor, cd: torch.dtype):
    """u = U0 y and v = Wᵀ u / σ = (W0ᵀ u + Aᵀ (Bᵀ u)) / σ, with fixed signs."""
    U = pr.spec.Z.to(cd) @ Y.to(cd)  # (m, k)
    V = (pr.W0.to(cd).T @ U + pr.A.to(cd).T @ (pr.B.to(cd).T @ U)) / S.to(cd)  # (n, k)
    return fix_signs(U, V.T)


def top_eigs(d: torch.Tensor, F: torch.Tensor, H: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of M = diag(d) + F H Fᵀ for a batch: d (b, p) descending, F (b, p, c), H (b, c, c).

    The basis holds the first q coordinate vectors (the top base directions) and F; Rayleigh-Ritz
    then alternates with Davidson corrections. Below the first q coordinates an eigenvector
    (λ, y) satisfies y_j = (F H Fᵀ y)_j / (λ - d_j), so each round adds that vector for every Ritz
    pair not yet converged: a rational update that converges in a few rounds however flat the
    base spectrum is. Small problems, and bases that grow past half of p, are solved densely.
    """
    b, p = d.shape
    if p <= DENSE_SIZE:
        return _dense_eigs(d, F, H, k)

    def mul(Y: torch.Tensor) -> torch.Tensor:
        return d[..., None] * Y + F @ (H @ (F.mT @ Y))

    q = min(p, k + F.shape[-1] // 2 + Q_EXTRA)  # λ_k >= d_{k+r}: the head must reach past k + r
    Q = torch.eye(p, q, dtype=d.dtype, device=d.device).expand(b, p, q)
    MQ = mul(Q)
    T = MQ[:, :q]  # Qᵀ M Q for Q = the first q coordinate vectors
    new = orthonormal_complement(F, Q)
    for _ in range(MAX_ROUNDS):
        if Q.shape[-1] + new.shape[-1] > MAX_BASIS_FRACTION * p:
            break
        M_new = mul(new)
        cross = Q.mT @ M_new  # (b, s, s_new)
        T = torch.cat([torch.cat([T, cross], -1), torch.cat([cross.mT, new.mT @ M_new], -1)], -2)
        Q, MQ = torch.cat([Q, new], -1), torch.cat([MQ, M_new], -1)
        theta, S = torch.linalg.eigh(sym(T))
        theta, S = theta.flip(-1)[..., :k], S.flip(-1)[..., :k]
        Y = Q @ S  # (b, p, k)
        resid = (MQ @ S - Y * theta[:, None, :]).norm(dim=-2)  # (b, k)
        todo = (resid > RESIDUAL_TOL * theta[:, :1].abs()).any(0)  # (k,) unconverged in some problem
        if not todo.any():
            return theta, Y
        Yt, th = Y[..., todo], theta[:, todo]
        gap = th[:, None, :] - d[:, q:, None]  # (b, p - q, t)
        floor = 1e-12 * theta[:, None, :1].abs()
        gap = torch.where(gap.abs() < floor, floor, gap)
        C = torch.zeros_like(Yt)
        C[:, q:] = (F[:, q:] @ (H @ (F.mT @ Yt))) / gap
        new = orthonormal_complement(C, Q)
    logger.debug("no convergence for p=%d; solving densely", p)
    return _dense_eigs(d, F, H, k)


def _dense_eigs(d: torch.Tensor, F: torch.Tensor, H: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    M = torch.diag_embed(d) + F @ H @ F.mT
    theta, Y = torch.linalg.eigh(sym(M))
    return theta.flip(-1)[..., :k], Y.flip(-1)[..., :k]
