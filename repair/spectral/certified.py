"""The certified path: the tuned top-k without a complete base basis, with bounds on max|cos|.

Definition 1 needs c(y) = max_j |cos(y, u_j)| over every base singular vector u_j. With only the
top p base directions Q (the smaller side, see ``truncated``), each q_i within δ_i of u_i, c(y) is
bracketed, a = Qᵀ y:

- lower bound: max_i (|a_i| - δ_i), the cosines with the kept directions;
- cheap upper bound: the kept directions take at least Σ (|a_i| - δ_i)² of the unit vector's
  squared cosines, so hi = max(max_i (|a_i| + δ_i), sqrt(1 - Σ (|a_i| - δ_i)²));
- Lanczos upper bound, for vectors the cheap one leaves undecided: y - Q a has a spectral measure
  with respect to W0's own Gram matrix M. s Lanczos steps give its Gauss quadrature, nodes θ_l and
  weights ω_l, and its Christoffel function λ(t) bounds any single point mass at t (``christoffel``:
  about max ω_l on a dense spectrum, never more than the Chebyshev-Markov-Stieltjes pair sums
  ω_l + ω_(l+1)); Q a adds at most ‖a‖ Δ to any singular vector outside Q, Δ = sqrt(Σ δ_i²).

On the larger side of a rectangular matrix M has a null space that holds no singular vector but
would swallow the bound, so there the measure of z = W0 v is used instead: its masses are λ_j c_j²,
and c_j² <= λ(t) / t over each piece of the spectrum; below θ_1 the divisor is an estimate of M's smallest eigenvalue:
FLOOR_FACTOR times the smallest Ritz value of a seeded random vector's Lanczos run, which rides
along with the others at no cost. It is the one quantity in the certificate that is estimated.
The tuned vectors' own residuals (Davis-Kahan) widen every bound. A vector is decided at a
threshold τ when hi + MARGIN < τ (an intruder) or lo - MARGIN >= τ (not one); undecided vectors get
more Lanczos steps, then the matrix returns None and the caller takes the exact path.

The tuned top-k come from a block Krylov solver on W Wᵀ whose only products are with W0, B and A
(or with W for a full checkpoint), started from [Q, B, W0 Aᵀ]; see ``krylov.top_eigenpairs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from repair.runtime.cores import share
from repair.spectral.christoffel import point_mass_bounds
from repair.spectral.krylov import GUARD, Lanczos, Quadrature, t_mul, top_eigenpairs
from repair.spectral.linalg import fix_signs
from repair.spectral.spectra import SideName
from repair.spectral.topk import degenerate_flags
from repair.spectral.truncated import SEED, TruncatedSpectrum, base_tol, gram_operator, vector_errors

MARGIN = 1e-4  # a bound this close to a threshold does not decide it
STEPS = (16, 20, 24, 32, 40, 48, 64, 80, 96, 128)  # Lanczos steps per certificate, raised (continuing the
# run) while undecided
TUNED_TOL = 1e-6  # Ritz residual of the tuned top-k, relative to σ_1² (float32 reaches about 3e-7), aimed for;
# a solver that stalls above it is accepted down to the rounding of an n-term float32 product (``base_tol``):
# the residuals widen every bound (Davis-Kahan), so a looser residual costs sharpness, never correctness
PRECISE_TOL = 1e-11  # the same after the float64 polish the editor asks for
FLOOR_FACTOR = 0.5  # the estimate of M's smallest eigenvalue is this share of the smallest Ritz value
PRODUCTS_PER_PAIR = 40  # operator columns allowed per wanted Ritz pair before giving up
SLACK = 4.0  # a bound is expected to fall at most this many times as fast per step as over the last two raises


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
    out: list[CertifiedTopK | None] = []
    for problem in problems:  # one at a time: no problem's answer depends on what it was batched with
        flip, pr = problem.oriented()
        t = _Batch([pr], k).solve(_oriented_sides(sides, flip), decisions, precise)[0]
        out.append(t.transposed() if (flip and t is not None) else t)
    return out


def _oriented_sides(sides: tuple[SideName, ...], flip: bool) -> tuple[SideName, ...]:
    return tuple(("right" if s == "left" else "left") for s in sides) if flip else sides


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(b, ...) row-major in ``dtype``: a transposed view as the left operand of a product runs at half speed."""
    if len(tensors) == 1:
        return _row_major(tensors[0], dtype)[None]
    return torch.stack([_row_major(t, dtype) for t in tensors])


def _row_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` contiguous in ``dtype``. A transposed view is reordered in the narrower of its dtype and ``dtype``
    (a bfloat16 (28672, 8192) weight: 0.6 s transposed then widened, against 1.8 s widened while transposed)."""
    if t.is_contiguous() or t.element_size() > dtype.itemsize:
        return t.to(dtype, memory_format=torch.contiguous_format)
    return t.contiguous().to(dtype)


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
        share()
        return self.mul(self.mul_t(X))


class _Batch:
    """Problems of one shape (m <= n), rank and p, solved together (the path solves one at a time)."""

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
        accept = max(TUNED_TOL, base_tol(max(self.W0.shape[1:]), self.cd))
        res = top_eigenpairs(self.tuned.gram, start, self.k, TUNED_TOL, max_dim=min(m, start.shape[-1] + 6 * want),
                             max_products=start.shape[-1] + PRODUCTS_PER_PAIR * want, expand_all=False,
                             accept=accept)
        ok = (res.residual[:, : self.k] <= accept * res.theta[:, :1].abs().clamp_min(1e-300)).all(1)
        if precise and self.cd != torch.float64:
            res = top_eigenpairs(self.tuned.to(torch.float64).gram, res.Y.double(), self.k, PRECISE_TOL,
                                 max_dim=min(m, 4 * want), max_products=PRODUCTS_PER_PAIR * want, expand_all=False)
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
        err = torch.stack([vector_errors(t, r)[: self.k] for t, r in zip(theta, res.residual, strict=True)])
        cert = _Certificate(self, U, Vh.mT, S, err)
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


class _Certificate:
    """Bounds for the tuned vectors of a problem, refined until every decision is made.

    a = Qᵀ y holds the cosines with the kept directions, each within δ_i (the kept direction's own
    error, ``TruncatedSpectrum.errors``) of the cosine with W0's singular vector; Δ = sqrt(Σ δ_i²)
    bounds how much of any other singular vector lies in span(Q). The tuned vector's own error
    (Davis-Kahan) widens every bound. Cheap bound first: the kept directions take at least
    Σ (|a_i| - δ_i)² of a unit vector's squared cosines, so no other exceeds the rest. Vectors it
    leaves undecided get Lanczos bounds on y - Q a with 16 to 128 steps (``STEPS``) of W0's own Gram
    matrix (not deflated, so the measure is the true one), continuing the same run each time.
    """

    def __init__(self, batch: _Batch, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor, err: torch.Tensor):
        self.batch, self.V = batch, V
        Q, S0 = batch.Q, batch.S0
        E = torch.stack([s.errors.to(Q.device) for s in batch.specs]).double()  # (b, p) δ_i
        self.delta = E.pow(2).sum(-1).sqrt()  # (b,) Δ
        inv = torch.where(S0[:, :1] * 1e-12 < S0, 1 / S0, torch.zeros_like(S0))  # (b, p), 0 where σ0 = 0
        z = batch.W0 @ V  # (b, m, k): Q-coordinates σ0_j cos_j of the right vectors
        self.x = {"left": U, "right": z}
        self.a = {"left": (Q.mT @ U).double(), "right": (Q.mT @ z).double() * inv[..., None]}  # (b, p, k)
        self.qz = (Q.mT @ z).double().norm(dim=1)  # (b, k) ‖Qᵀ z‖
        self.ea = {"left": E[..., None].expand_as(self.a["left"]),
                   "right": E[..., None] * inv[..., None] * z.double().norm(dim=1)[:, None, :]}
        self.head = {s: v.abs().mT for s, v in self.a.items()}  # (b, k, p)
        sigma_ratio = (S[:, :1] / S.clamp_min(1e-300)).double()  # (b, k) σ_1 / σ_i
        self.err = {"left": err, "right": (err * sigma_ratio).clamp(max=1.0)}
        self.lo = {s: (_amax(v.abs() - self.ea[s]) - self.err[s]).clamp(0, 1) for s, v in self.a.items()}
        self.head_hi = {s: _amax(v.abs() + self.ea[s]) for s, v in self.a.items()}
        self.hi = {s: self._cheap(s) for s in self.a}
        self.tail = {s: torch.ones_like(h) for s, h in self.hi.items()}  # (b, k) the latest Lanczos bounds alone
        self.runs: dict[tuple[str, int], tuple[torch.Tensor, Lanczos]] = {}  # (side, row) -> (columns, run)

    def _cheap(self, side: SideName) -> torch.Tensor:
        if self.batch.Q.shape[-1] >= self.batch.Q.shape[-2]:  # the kept directions are all there are
            return (self.head_hi[side] + self.err[side]).clamp(0, 1)
        taken = (self.a[side].abs() - self.ea[side]).clamp_min(0).pow(2).sum(1)
        rest = (1 - taken).clamp_min(0).sqrt()  # (b, k)
        return (torch.maximum(self.head_hi[side], rest) + self.err[side]).clamp(0, 1)

    def _lanczos(self, side: SideName, row: int, cols: torch.Tensor, steps: int) -> tuple[Quadrature, torch.Tensor]:
        """The quadrature of problem ``row``'s vectors ``cols`` after ``steps`` Lanczos steps, continuing the
        run this side and problem already has when it covers these columns; and the columns' positions."""
        known = self.runs.get((side, row))
        if known is None or not torch.isin(cols, known[0]).all():
            W0, Q, rows = self.batch.W0[row : row + 1], self.batch.Q[row : row + 1], slice(row, row + 1)
            if side == "left":  # y - Q a, against W0 W0ᵀ
                y = self.x["left"][rows][..., cols]
                run = Lanczos(gram_operator(W0, "left"), y - Q @ (Q.mT @ y))
            elif W0.shape[1] == W0.shape[2]:  # square: v itself against W0ᵀ W0 (no null space there)
                run = Lanczos(gram_operator(W0, "right"), self.V[rows][..., cols])
            else:  # z - Q Qᵀ z against W0 W0ᵀ, and a seeded random column for M's smallest eigenvalue
                z = self.x["right"][rows][..., cols]
                gen = torch.Generator().manual_seed(SEED)
                rand = torch.randn(1, W0.shape[1], 1, generator=gen, dtype=W0.dtype).to(W0.device)
                run = Lanczos(gram_operator(W0, "left"), torch.cat([z - Q @ (Q.mT @ z), rand], -1))
            known = self.runs[(side, row)] = (cols, run)
        where = torch.nonzero(known[0][:, None] == cols[None, :])[:, 0]  # positions of cols in the run
        return known[1].extend(steps).quadrature(), where

    def _tail(self, side: SideName, row: int, cols: torch.Tensor, steps: int) -> torch.Tensor:
        """(1, c) upper bound on the largest |cos| with a singular vector of W0 outside the kept ones."""
        q, where = self._lanczos(side, row, cols, steps)
        rows = slice(row, row + 1)
        if side == "left":
            spill = self.a["left"][rows][..., cols].norm(dim=1) * self.delta[rows, None]  # ‖a‖ Δ
            return point_mass_bounds(q).largest()[:, where].sqrt() + spill
        if self.batch.W0.shape[1] == self.batch.W0.shape[2]:
            return point_mass_bounds(q).largest()[:, where].sqrt()
        real = q.weights[:, -1] > 0  # the random column's nodes
        floor = FLOOR_FACTOR * q.nodes[:, -1][real].min().clamp_min(0) if real.any() else q.nodes.new_zeros(())
        ratio = point_mass_bounds(q.columns(slice(None, -1))).largest_ratio(floor.reshape(1))[:, where]
        spill = self.qz[rows][..., cols] * self.delta[rows, None] / floor.sqrt().clamp_min(1e-300)
        return ratio.sqrt() + spill

    def _refine(self, sides: tuple[SideName, ...], row: int, cols: torch.Tensor, steps: int) -> None:
        """Lanczos upper bounds for ``cols`` of problem ``row``, kept where tighter than before."""
        rows = slice(row, row + 1)
        for s in sides:
            tail = self._tail(s, row, cols, steps)
            hi = (torch.maximum(self.head_hi[s][rows][..., cols], tail) + self.err[s][rows][..., cols]).clamp(0, 1)
            self.tail[s][rows, cols] = hi
            self.hi[s][rows, cols] = torch.minimum(self.hi[s][rows, cols], hi)

    def run(self, sides: tuple[SideName, ...], decisions: Decisions) -> torch.Tensor:
        """Refine the undecided vectors; returns (b,) whether every decision is made.

        A problem is given up (the exact path answers it) as soon as one of its vectors cannot be decided
        within the steps left even at SLACK times the rate its Lanczos bound (``tail``; the decisive bound may be
        the cheap one for a while, which does not move) fell over the last two raises:
        a vector whose largest |cos| lies above τ, with a base vector outside the kept ones, is never decided, and
        every further step on it would be spent for nothing.
        """
        given_up = torch.zeros(self.batch.W0.shape[0], dtype=torch.bool, device=self.batch.W0.device)  # (b,)
        history: list[torch.Tensor] = []  # (b, k) the decisive Lanczos bounds after each raise
        for level, steps in enumerate(STEPS):
            undecided = self._undecided(sides, decisions) & ~given_up[:, None]  # (b, k)
            if not undecided.any():
                break
            for i in torch.nonzero(undecided.any(1)).flatten().tolist():
                self._refine(sides, i, torch.nonzero(undecided[i]).flatten(), steps)
            history.append(torch.stack([self.tail[s] for s in sides]).amax(0))  # (b, k)
            if level >= 2:  # the rate over the last two raises (one raise may find nothing and the next a lot)
                rate = (history[-3] - history[-1]).clamp_min(0) / (steps - STEPS[level - 2])  # (b, k) per step
                reach = torch.where(history[-3] < 1, rate * (STEPS[-1] - steps), math.inf)  # at 1: no rate yet
                given_up |= (history[-1] - self._targets(sides, decisions) > SLACK * reach).any(1)
        return ~self._undecided(sides, decisions).any(1) & ~given_up

    def _targets(self, sides: tuple[SideName, ...], decisions: Decisions) -> torch.Tensor:
        """(b, k) what each vector's upper bound must fall below to be decided: the lowest threshold its decisive
        bounds straddle, less MARGIN; inf for a decided vector."""
        lo = torch.stack([self.lo[s] for s in sides]).amax(0)  # (b, k) the decisive value's bounds
        hi = torch.stack([self.hi[s] for s in sides]).amax(0)
        target = torch.full_like(hi, math.inf)
        for t, n in decisions:
            straddles = ((hi + MARGIN >= t) & (lo - MARGIN < t))[:, :n]
            target[:, :n] = torch.where(straddles, target[:, :n].clamp(max=t - MARGIN), target[:, :n])
        return target

    def _undecided(self, sides: tuple[SideName, ...], decisions: Decisions) -> torch.Tensor:
        """(b, k) vectors whose decisive bounds straddle a threshold they must be decided at."""
        return self._targets(sides, decisions) < math.inf


def _amax(a: torch.Tensor) -> torch.Tensor:
    """(b, k) max over the kept directions of (b, p, k); 0 when none were kept."""
    return a.amax(1) if a.shape[1] else torch.zeros(a.shape[0], a.shape[2], dtype=a.dtype, device=a.device)
