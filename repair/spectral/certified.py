"""The certified path: the tuned top-k without a complete base basis, with bounds on max|cos|.

Definition 1 needs c(y) = max_j |cos(y, y0_j)| over every base singular vector y0_j. With only the
top p base directions Q (the smaller side, see ``truncated``: exact eigenvectors of a Gram matrix
within float32 rounding of W0 W0ᵀ), c(y) is bracketed, a = Qᵀ y:

- lower bound: lo = max |a|, the cosines with the kept directions;
- cheap upper bound: the other directions share 1 - ‖a‖², so hi = max(max |a|, sqrt(1 - ‖a‖²));
- Lanczos upper bound, for vectors the cheap one leaves undecided: the rest of y has a spectral
  measure with respect to the Gram matrix M deflated by Q. s Lanczos steps give its Gauss
  quadrature, nodes θ_l and weights ω_l, and by the Chebyshev-Markov-Stieltjes inequalities a point
  mass between θ_l and θ_(l+1) is at most ω_l + ω_(l+1) (ω_1 below θ_1, ω_s above θ_s). So
  hi = max(lo, sqrt(max_l (ω_l + ω_(l+1)))).

On the larger side of a rectangular matrix M has a null space that holds no singular vector but
would swallow the bound, so there the measure of z = W0 v is used instead: its masses are λ_j c_j²,
and c_j² <= (ω_l + ω_(l+1)) / θ_l; below θ_1 the divisor is an estimate of M's smallest eigenvalue:
FLOOR_FACTOR times the smallest Ritz value of a seeded random vector's Lanczos run, which rides
along with the others at no cost. It is the one quantity in the certificate that is estimated.
The tuned vectors' own residuals (Davis-Kahan) widen both bounds. A vector is decided at a
threshold τ when hi + MARGIN < τ (an intruder) or lo - MARGIN >= τ (not one); undecided vectors get
more Lanczos steps, then the matrix returns None and the caller takes the exact path.

The tuned top-k come from a block Krylov solver on W Wᵀ whose only products are with W0, B and A
(or with W for a full checkpoint), started from [Q, B, W0 Aᵀ]; see ``krylov.top_eigenpairs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .krylov import GUARD, Lanczos, Quadrature, t_mul, top_eigenpairs
from .linalg import fix_signs
from .spectra import SideName
from .topk import degenerate_flags
from .truncated import SEED, TruncatedSpectrum, gram_operator

MARGIN = 1e-4  # a bound this close to a threshold does not decide it
STEPS = (16, 32, 64, 128)  # Lanczos steps per certificate, raised (continuing the run) while undecided
TUNED_TOL = 1e-6  # Ritz residual of the tuned top-k, relative to σ_1² (float32 reaches about 3e-7)
PRECISE_TOL = 1e-11  # the same after the float64 polish the editor asks for
FLOOR_FACTOR = 0.5  # the estimate of M's smallest eigenvalue is this share of the smallest Ritz value
PRODUCTS_PER_PAIR = 40  # operator columns allowed per wanted Ritz pair before giving up


@dataclass(frozen=True)
class CertifiedProblem:
    """W = W0 + B A (or a dense W) in (out, in) orientation, with the truncated spectrum of W0."""

    W0: torch.Tensor  # (m, n)
    spec: TruncatedSpectrum
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # B (m, r) scaled, A (r, n)
    tuned: torch.Tensor | None = None  # (m, n) when there are no factors

    def oriented(self) -> tuple[bool, CertifiedProblem]:
        """(transposed, problem) with the kept basis on the left: tall matrices are solved as Wᵀ."""
        if self.spec.side == "left":
            return False, self
        f = None if self.factors is None else (self.factors[1].T, self.factors[0].T)
        t = None if self.tuned is None else self.tuned.T
        return True, CertifiedProblem(self.W0.T, self.spec.transposed(), f, t)


@dataclass(frozen=True)
class CertifiedTopK:
    """Top-k triplets of W with bounds [lo, hi] on each vector's max|cos| with every base vector."""

    S: torch.Tensor  # (k,)
    degenerate: torch.Tensor  # (k,) bool
    U: torch.Tensor  # (m, k)
    Vh: torch.Tensor  # (k, n)
    lo: dict[str, torch.Tensor]  # side -> (k,)
    hi: dict[str, torch.Tensor]  # side -> (k,)
    head: dict[str, torch.Tensor] = field(repr=False)  # side -> (k, p) |cos| with the top-p base vectors
    method: str = "certified"

    def bounds(self, side: SideName) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo[side], self.hi[side]

    def cos_head(self, side: SideName, h: int) -> torch.Tensor:
        return self.head[side][:, :h]

    def transposed(self) -> CertifiedTopK:
        def swap(d: dict) -> dict:
            return {("right" if s == "left" else "left"): v for s, v in d.items()}

        U, Vh = fix_signs(self.Vh.T, self.U.T)
        return CertifiedTopK(self.S, self.degenerate, U, Vh, swap(self.lo), swap(self.hi), swap(self.head))

    def cpu(self) -> CertifiedTopK:
        def cpu(d: dict) -> dict:
            return {s: v.cpu() for s, v in d.items()}

        return CertifiedTopK(self.S.cpu(), self.degenerate.cpu(), self.U.cpu(), self.Vh.cpu(), cpu(self.lo),
                             cpu(self.hi), cpu(self.head))


Decisions = tuple[tuple[float, int], ...]  # (threshold τ, how many leading vectors must be decided at τ)


def certified_topk_many(problems: list[CertifiedProblem], k: int, sides: tuple[SideName, ...],
                        decisions: Decisions, precise: bool = False) -> list[CertifiedTopK | None]:
    """The certified top-``k`` of each problem; None where it could not be certified (take the exact path).

    ``sides`` are the sides (in the problems' own orientation) whose bounds are computed; for each
    (τ, n) in ``decisions`` the first n vectors must be decided at τ, on the larger of the sides' bounds.
    ``precise`` polishes the triplets in float64 (for the editor, which writes them into weights).
    """
    out: list[CertifiedTopK | None] = [None] * len(problems)
    groups: dict[tuple, list[tuple[int, bool, CertifiedProblem]]] = {}
    for i, problem in enumerate(problems):
        flip, pr = problem.oriented()
        rank = -1 if pr.factors is None else pr.factors[0].shape[1]
        key = (tuple(pr.W0.shape), rank, pr.spec.p, pr.W0.dtype == torch.float64, pr.W0.device)
        groups.setdefault(key, []).append((i, flip, pr))
    for group in groups.values():
        flips = {flip for _, flip, _ in group}
        for flip in flips:  # sides are named in each problem's own orientation
            members = [(i, pr) for i, f, pr in group if f == flip]
            solved = _Batch([pr for _, pr in members], k).solve(_oriented_sides(sides, flip), decisions, precise)
            for (i, _), t in zip(members, solved, strict=True):
                out[i] = t.transposed() if (flip and t is not None) else t
    return out


def _oriented_sides(sides: tuple[SideName, ...], flip: bool) -> tuple[SideName, ...]:
    return tuple(("right" if s == "left" else "left") for s in sides) if flip else sides


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(b, ...) row-major in ``dtype``: a transposed view as the left operand of a product runs at half speed."""
    if len(tensors) == 1:
        return tensors[0].to(dtype, memory_format=torch.contiguous_format)[None]
    return torch.stack([t.to(dtype) for t in tensors])


@dataclass(frozen=True)
class _Tuned:
    """W = W0 + B A (or a dense W) for a batch: the products the solvers need, in one dtype."""

    W0: torch.Tensor  # (b, m, n)
    B: torch.Tensor | None  # (b, m, r)
    A: torch.Tensor | None  # (b, r, n)
    W: torch.Tensor | None  # (b, m, n) when there are no factors

    def to(self, dtype: torch.dtype) -> _Tuned:
        def cast(t):
            return None if t is None else t.to(dtype)

        return _Tuned(self.W0.to(dtype), cast(self.B), cast(self.A), cast(self.W))

    def mul_t(self, X: torch.Tensor) -> torch.Tensor:
        """Wᵀ X (b, n, c)."""
        if self.W is not None:
            return t_mul(self.W, X)
        return t_mul(self.W0, X) + self.A.mT @ (self.B.mT @ X)

    def mul(self, Y: torch.Tensor) -> torch.Tensor:
        """W Y (b, m, c)."""
        if self.W is not None:
            return self.W @ Y
        return self.W0 @ Y + self.B @ (self.A @ Y)

    def gram(self, X: torch.Tensor) -> torch.Tensor:
        return self.mul(self.mul_t(X))


class _Batch:
    """Problems of one shape (m <= n), rank and p, solved together."""

    def __init__(self, problems: list[CertifiedProblem], k: int):
        self.cd = cd = torch.float64 if problems[0].W0.dtype == torch.float64 else torch.float32
        self.W0 = _stack([pr.W0 for pr in problems], cd)  # (b, m, n)
        dev = self.W0.device
        self.Q = _stack([pr.spec.Z.to(dev) for pr in problems], cd)  # (b, m, p)
        self.S0 = _stack([pr.spec.S.to(dev) for pr in problems], torch.float64)  # (b, p)
        self.specs = [pr.spec for pr in problems]
        self.k = min(k, self.W0.shape[1])
        if problems[0].factors is not None:
            B = _stack([pr.factors[0] for pr in problems], cd)
            A = _stack([pr.factors[1] for pr in problems], cd)
            self.tuned = _Tuned(self.W0, B, A, None)
        else:
            self.tuned = _Tuned(self.W0, None, None, _stack([pr.tuned for pr in problems], cd))

    def _start(self) -> torch.Tensor:
        t = self.tuned
        if t.W is None:
            return torch.cat([self.Q, t.B, self.W0 @ t.A.mT], -1)
        gen = torch.Generator().manual_seed(SEED)
        b, m, _ = self.W0.shape
        rand = torch.randn(b, m, min(m, self.k + GUARD), generator=gen, dtype=self.cd).to(self.W0.device)
        return torch.cat([self.Q, rand], -1)

    def _eigenpairs(self, precise: bool):
        """Ritz pairs of W Wᵀ; with ``precise``, polished in float64 from the float32 ones."""
        start = self._start()
        m, want = self.W0.shape[1], min(self.W0.shape[1], self.k + GUARD)
        res = top_eigenpairs(self.tuned.gram, start, self.k, TUNED_TOL, max_dim=min(m, start.shape[-1] + 6 * want),
                             max_products=start.shape[-1] + PRODUCTS_PER_PAIR * want)
        ok = (res.residual[:, : self.k] <= TUNED_TOL * res.theta[:, :1].abs().clamp_min(1e-300)).all(1)
        if precise and self.cd != torch.float64:
            res = top_eigenpairs(self.tuned.to(torch.float64).gram, res.Y.double(), self.k, PRECISE_TOL,
                                 max_dim=min(m, 4 * want), max_products=PRODUCTS_PER_PAIR * want)
        return res, ok

    def solve(self, sides: tuple[SideName, ...], decisions: Decisions, precise: bool) -> list[CertifiedTopK | None]:
        res, ok = self._eigenpairs(precise)
        theta = res.theta.clamp_min(0)
        S = theta[:, : self.k].sqrt()  # (b, k)
        ok &= S[:, -1] > 1e-6 * S[:, 0]  # a (near-)zero σ has an arbitrary vector: the exact path decides
        U = res.Y[..., : self.k]  # (b, m, k)
        tuned = self.tuned if U.dtype == self.cd else self.tuned.to(U.dtype)
        V = tuned.mul_t(U) / S[:, None, :].to(U.dtype).clamp_min(1e-30)  # (b, n, k)
        U, Vh = (x.to(self.cd) for x in fix_signs(U, V.mT))
        cert = _Certificate(self, U, Vh.mT, S, _vector_errors(theta, res.residual, self.k))
        decided = cert.run(sides, decisions)
        results: list[CertifiedTopK | None] = []
        for i in range(len(self.specs)):
            if not (ok[i] and decided[i]):
                results.append(None)
                continue
            results.append(CertifiedTopK(
                S[i].to(self.cd), degenerate_flags(S[i]), U[i], Vh[i],
                {s: cert.lo[s][i].to(self.cd) for s in sides}, {s: cert.hi[s][i].to(self.cd) for s in sides},
                {s: h[i].to(self.cd) for s, h in cert.head.items()}))
        return results


def _vector_errors(theta: torch.Tensor, resid: torch.Tensor, k: int) -> torch.Tensor:
    """(b, k) Davis-Kahan bound sqrt(2) · residual / gap on each Ritz vector's distance to the true one."""
    gaps = (theta[:, :k, None] - theta[:, None, :]).abs()  # (b, k, want)
    gaps = gaps.masked_fill(torch.eye(k, theta.shape[1], dtype=torch.bool, device=gaps.device), float("inf"))
    gap = gaps.amin(-1) if theta.shape[1] > 1 else torch.full_like(theta[:, :k], float("inf"))
    err = (2**0.5) * resid[:, :k] / gap.clamp_min(1e-300)
    return torch.where(resid[:, :k] > 0, err, torch.zeros_like(err)).clamp(max=1.0)


class _Certificate:
    """Bounds for the tuned vectors of a batch, refined until every decision is made.

    First the cheap bound: the kept directions take Σ a_i² of a unit vector's squared cosines, so
    none outside them exceeds 1 - Σ a_i². Vectors it leaves undecided get Lanczos bounds with
    32, 64, then 128 steps, problem by problem (so no problem's bounds depend on its batch).
    """

    def __init__(self, batch: _Batch, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor, err: torch.Tensor):
        self.batch, self.V = batch, V
        Q, S0 = batch.Q, batch.S0
        inv = torch.where(S0[:, :1] * 1e-12 < S0, 1 / S0, torch.zeros_like(S0))  # (b, p), 0 where σ0 = 0
        self.x = {"left": U, "right": batch.W0 @ V}  # right: z = W0 v, whose Q-coordinates are σ0_j cos_j
        self.a = {"left": (Q.mT @ U).double(), "right": (Q.mT @ self.x["right"]).double() * inv[..., None]}
        self.head = {s: v.abs().mT for s, v in self.a.items()}  # (b, k, p)
        sigma_ratio = (S[:, :1] / S.clamp_min(1e-300)).double()  # (b, k) σ_1 / σ_i
        self.err = {"left": err, "right": (err * sigma_ratio).clamp(max=1.0)}  # how far each vector may be off
        self.runs: dict[tuple[str, int], tuple[torch.Tensor, Lanczos]] = {}  # (side, row) -> (columns, run)
        self.lo = {s: (_amax(v.abs()) - self.err[s]).clamp(0, 1) for s, v in self.a.items()}
        self.hi = {s: self._cheap(s) for s in self.a}

    def _cheap(self, side: SideName) -> torch.Tensor:
        a = self.a[side]
        if self.batch.Q.shape[-1] >= self.batch.Q.shape[-2]:  # the kept directions are all there are
            return (_amax(a.abs()) + self.err[side]).clamp(0, 1)
        rest = (1 - a.pow(2).sum(1)).clamp_min(0).sqrt()  # (b, k)
        return (torch.maximum(_amax(a.abs()), rest) + self.err[side]).clamp(0, 1)

    def _lanczos(self, side: SideName, row: int, cols: torch.Tensor, steps: int) -> tuple[Quadrature, torch.Tensor]:
        """The quadrature of problem ``row``'s vectors ``cols`` after ``steps`` Lanczos steps, continuing the
        run this side and problem already has when it covers these columns; and the columns' positions."""
        known = self.runs.get((side, row))
        if known is None or not torch.isin(cols, known[0]).all():
            W0, Q, rows = self.batch.W0[row : row + 1], self.batch.Q[row : row + 1], slice(row, row + 1)
            if side == "left":
                run = Lanczos(gram_operator(W0, "left"), self.x["left"][rows][..., cols], Q)
            elif W0.shape[1] == W0.shape[2]:  # square: W0ᵀ W0 has no null space either; bound v directly
                Vp, _ = torch.linalg.qr(t_mul(W0, Q))  # (1, n, p) spans the right top-p directions
                run = Lanczos(gram_operator(W0, "right"), self.V[rows][..., cols], Vp)
            else:  # z = W0 v, plus a seeded random column for the estimate of M's smallest eigenvalue
                gen = torch.Generator().manual_seed(SEED)
                rand = torch.randn(1, W0.shape[1], 1, generator=gen, dtype=W0.dtype).to(W0.device)
                run = Lanczos(gram_operator(W0, "left"), torch.cat([self.x["right"][rows][..., cols], rand], -1), Q)
            known = self.runs[(side, row)] = (cols, run)
        where = torch.nonzero(known[0][:, None] == cols[None, :])[:, 0]  # positions of cols in the run
        return known[1].extend(steps).quadrature(), where

    def _tail(self, side: SideName, row: int, cols: torch.Tensor, steps: int) -> torch.Tensor:
        """(1, c) upper bound on the largest squared cosine with a base vector outside Q."""
        q, where = self._lanczos(side, row, cols, steps)
        if side == "left" or self.batch.W0.shape[1] == self.batch.W0.shape[2]:
            return pair_sums(q).amax(-1)[:, where]
        real = q.weights[:, -1] > 0  # the random column's nodes
        floor = FLOOR_FACTOR * q.nodes[:, -1][real].min().clamp_min(0) if real.any() else q.nodes.new_zeros(())
        return ratio_bound(Quadrature(q.nodes[:, :-1], q.weights[:, :-1]), floor.reshape(1))[:, where]

    def _refine(self, sides: tuple[SideName, ...], row: int, cols: torch.Tensor, steps: int) -> None:
        """Lanczos upper bounds for ``cols`` of problem ``row``, kept where tighter than before."""
        rows = slice(row, row + 1)
        for s in sides:
            err = self.err[s][rows][..., cols]
            tail = self._tail(s, row, cols, steps).clamp_min(0).sqrt()
            hi = torch.maximum(self.lo[s][rows][..., cols] + 2 * err, tail + err).clamp(0, 1)
            self.hi[s][rows, cols] = torch.minimum(self.hi[s][rows, cols], hi)

    def run(self, sides: tuple[SideName, ...], decisions: Decisions) -> torch.Tensor:
        """Refine the undecided vectors; returns (b,) whether every decision is made."""
        for steps in STEPS:
            undecided = self._undecided(sides, decisions)  # (b, k)
            for i in torch.nonzero(undecided.any(1)).flatten().tolist():
                self._refine(sides, i, torch.nonzero(undecided[i]).flatten(), steps)
        return ~self._undecided(sides, decisions).any(1)

    def _undecided(self, sides: tuple[SideName, ...], decisions: Decisions) -> torch.Tensor:
        """(b, k) vectors whose decisive bounds straddle a threshold they must be decided at."""
        lo = torch.stack([self.lo[s] for s in sides]).amax(0)  # (b, k) the decisive value's bounds
        hi = torch.stack([self.hi[s] for s in sides]).amax(0)
        out = torch.zeros_like(lo, dtype=torch.bool)
        for t, n in decisions:
            out[:, :n] |= ((hi + MARGIN >= t) & (lo - MARGIN < t))[:, :n]
        return out


def _amax(a: torch.Tensor) -> torch.Tensor:
    """(b, k) max over the kept directions of (b, p, k); 0 when none were kept."""
    return a.amax(1) if a.shape[1] else torch.zeros(a.shape[0], a.shape[2], dtype=a.dtype, device=a.device)


def pair_sums(q: Quadrature) -> torch.Tensor:
    """(..., s) the Chebyshev-Markov-Stieltjes bound on a point mass in each interval of the nodes."""
    w = q.weights
    if w.shape[-1] == 1:
        return w
    return torch.cat([w[..., :1], w[..., :-1] + w[..., 1:], w[..., -1:]], -1)


def ratio_bound(q: Quadrature, floor: torch.Tensor) -> torch.Tensor:
    """(b, c) upper bound on max_j ν_j / λ_j for a measure with masses ν_j at eigenvalues λ_j >= floor."""
    theta = q.nodes
    fl = floor[:, None, None].expand(*theta.shape[:-1], 1)
    lower = torch.maximum(torch.cat([fl, theta], -1), fl)  # each interval's lower end: floor, θ_1, ..., θ_s
    mass = pair_sums(q)
    bound = torch.where(mass > 0, mass / lower.clamp_min(1e-300), torch.zeros_like(mass))
    return bound.amax(-1)

