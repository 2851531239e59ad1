"""Bounds on one point mass of a spectral measure from s Lanczos steps: Christoffel functions.

A column x and a symmetric operator M define the measure μ = Σ_j (u_jᵀ x)² δ(λ_j). The certificate
needs the largest single mass, max_j (u_jᵀ x)². s Lanczos steps give the recurrence coefficients
α_1..α_s, β_1..β_s (β_s from the residual after the last step), hence the orthonormal polynomials
p_0..p_s of μ, and for every t

    μ({t}) <= λ(t) = 1 / K(t),    K(t) = Σ_(k<=s) p_k(t)²,

because for q(x) = K(x, t) / K(t, t) (degree s, q(t) = 1) a mass at t is at most ∫ q² dμ = 1 / K(t).
The bound holds for any measure with μ's first 2s + 1 moments, so it is as sharp as those moments
allow (the Chebyshev-Markov-Stieltjes pair sums bound the whole mass of an interval, about twice
as much on a dense spectrum).

λ(t) is evaluated rigorously over whole intervals, not at samples:

- outside [θ_1, θ_s] (the Gauss nodes, the zeros of p_s; every p_k's zeros lie inside) each |p_k|
  grows away from the interval, so λ(t) <= λ(θ_1) = ω_1 below and <= ω_s above;
- each gap [θ_l, θ_(l+1)] is cut into ``PIECES`` pieces; on a piece, K (degree 2s) is interpolated
  exactly at 2s + 1 Chebyshev points, and min K >= c_0 - Σ_(k>=1) |c_k| (|T_k| <= 1), less a
  rounding allowance. A piece where that is not positive keeps the pair sum ω_l + ω_(l+1), which
  holds there too, as does every pair sum, so the result is never weaker than the pair sums;
- the pieces that decide the answer (the ``REFINE`` largest bounds, and the ``REFINE`` largest
  bounds over their lower ends, for ``largest_ratio``) are cut again into ``SUB`` pieces each: the
  Chebyshev bound loosens with a piece's width, and λ(t) peaks inside a gap, so four pieces per gap
  overstate the peak (on a 70B-shaped down_proj, 0.503 where the peak is 0.4935 after 44 steps).
  Each sub-piece keeps the smaller of its own bound and its parent's; the pieces stay a partition,
  in ascending order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from repair.spectral.krylov import Quadrature

PIECES = 4  # pieces per gap between consecutive nodes
REFINE = 8  # pieces cut again per column and per criterion (largest bound; largest bound over the lower end)
SUB = 16  # sub-pieces per re-cut piece
ROUNDING = 1e-9  # allowance for rounding in the Chebyshev lower bound, relative to the largest sample


@dataclass(frozen=True)
class PointMassBounds:
    """Per piece of the real line: an upper bound on any single mass there, and the piece's lower end."""

    mass: torch.Tensor  # (b, c, P) float64
    lower: torch.Tensor  # (b, c, P) float64; -inf for the piece below θ_1

    def largest(self) -> torch.Tensor:
        """(b, c) upper bound on the largest single mass."""
        return self.mass.amax(-1)

    def largest_ratio(self, floor: torch.Tensor) -> torch.Tensor:
        """(b, c) upper bound on max_j ν_j / λ_j for masses ν_j at eigenvalues λ_j >= ``floor`` (b,)."""
        low = torch.maximum(self.lower, floor.reshape(-1, 1, 1)).clamp_min(1e-300)
        return torch.where(self.mass > 0, self.mass / low, torch.zeros_like(self.mass)).amax(-1)


def pair_sums(q: Quadrature) -> torch.Tensor:
    """(..., s + 1) the Chebyshev-Markov-Stieltjes bound on a point mass in each interval of the nodes:
    (-inf, θ_1], [θ_1, θ_2], ..., [θ_s, inf)."""
    w = q.weights
    if w.shape[-1] == 1:
        return torch.cat([w, w], -1)
    return torch.cat([w[..., :1], w[..., :-1] + w[..., 1:], w[..., -1:]], -1)


def point_mass_bounds(q: Quadrature, pieces: int = PIECES) -> PointMassBounds:
    """Christoffel bounds per piece (see the module docstring); columns whose run broke down are resolved
    exactly, and keep their weights as the masses at their nodes."""
    theta, w = q.nodes, q.weights  # (b, c, s)
    s = theta.shape[-1]
    pairs = pair_sums(q)  # (b, c, s + 1)
    inf = torch.full_like(theta[..., :1], -math.inf)
    if s == 1:
        return PointMassBounds(pairs[..., :1], inf)
    t0, t1 = theta[..., :-1], theta[..., 1:]  # (b, c, s - 1) the gaps
    cuts = torch.linspace(0, 1, pieces + 1, dtype=theta.dtype, device=theta.device)
    lo = t0[..., None] + (t1 - t0)[..., None] * cuts[:-1]  # (b, c, s - 1, P)
    hi = t0[..., None] + (t1 - t0)[..., None] * cuts[1:]
    lo, hi = lo.flatten(-2), hi.flatten(-2)  # (b, c, (s - 1) P)
    inner = _piece_bounds(q, lo, hi, pairs[..., 1:-1].repeat_interleave(pieces, -1))
    inner, inner_lower = _refine(q, lo, hi, inner)
    mass = torch.cat([w[..., :1], inner, w[..., -1:]], -1)
    lower = torch.cat([inf, inner_lower, theta[..., -1:]], -1)
    dead = q.beta_last <= 0  # (b, c) the Krylov space is invariant: the quadrature is the measure itself
    if dead.any():
        exact = w.amax(-1, keepdim=True).expand_as(mass)
        mass = torch.where(dead[..., None], exact, mass)
    return PointMassBounds(mass, lower)


def _piece_bounds(q: Quadrature, lo: torch.Tensor, hi: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """(b, c, n) bounds on a single mass in each [lo, hi]: the Christoffel bound, at most ``cap``."""
    kmin = _kernel_lower_bound(q, lo, hi)
    chris = torch.where(kmin > 0, 1 / kmin.clamp_min(1e-300), torch.full_like(kmin, math.inf))
    return torch.minimum(chris, cap)


def _refine(q: Quadrature, lo: torch.Tensor, hi: torch.Tensor,
            mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pieces (b, c, n) with the deciding ones re-cut into ``SUB`` each: masses and lower ends, ascending."""
    r = min(REFINE, mass.shape[-1] // 2)
    by_mass = mass.topk(r, dim=-1).indices
    ratio = (mass / lo.clamp_min(1e-300)).scatter(-1, by_mass, -math.inf)  # distinct from the first choice
    idx = torch.cat([by_mass, ratio.topk(r, dim=-1).indices], -1)  # (b, c, 2r)
    plo, phi, parent = (x.gather(-1, idx) for x in (lo, hi, mass))
    cuts = torch.linspace(0, 1, SUB + 1, dtype=lo.dtype, device=lo.device)
    slo = (plo[..., None] + (phi - plo)[..., None] * cuts[:-1]).flatten(-2)  # (b, c, 2r SUB)
    shi = (plo[..., None] + (phi - plo)[..., None] * cuts[1:]).flatten(-2)
    sub = _piece_bounds(q, slo, shi, parent.repeat_interleave(SUB, -1))
    keep = torch.ones_like(mass, dtype=torch.bool).scatter(-1, idx, False)
    rest = (*mass.shape[:-1], mass.shape[-1] - idx.shape[-1])
    lower = torch.cat([lo[keep].reshape(rest), slo], -1)
    order = lower.argsort(dim=-1, stable=True)
    return torch.cat([mass[keep].reshape(rest), sub], -1).gather(-1, order), lower.gather(-1, order)


def _kernel_lower_bound(q: Quadrature, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(b, c, n) lower bounds on K(t) = Σ_(k<=s) p_k(t)² over each [lo, hi] (b, c, n)."""
    s = q.alpha.shape[-1]
    N = 2 * s + 1  # K has degree 2s: interpolation at N Chebyshev points is exact
    j = torch.arange(N, dtype=torch.float64, device=lo.device)
    x = torch.cos((j + 0.5) * math.pi / N)  # (N,) Chebyshev points of the first kind
    t = ((lo + hi) / 2)[..., None] + ((hi - lo) / 2)[..., None] * x  # (b, c, n, N)
    K = _kernel(q, t)
    C = torch.cos(torch.outer(j, j + 0.5) * math.pi / N) * (2 / N)  # (N, N) values -> coefficients
    coef = K @ C.T  # (b, c, n, N)
    low = coef[..., 0] / 2 - coef[..., 1:].abs().sum(-1)
    return low - ROUNDING * K.abs().amax(-1)


def _kernel(q: Quadrature, t: torch.Tensor) -> torch.Tensor:
    """K(t) = Σ_(k<=s) p_k(t)² at points t (b, c, ...), from the three-term recurrence of each column.

    The largest tensors of the certificate (points × steps): the recurrence runs in three buffers, in place. A
    column whose run broke down (β_k = 0) has p_j = 0 from there on (multiplied by 0 instead of 1/β_k)."""
    alpha, beta = q.alpha, torch.cat([q.beta, q.beta_last[..., None]], -1)  # (b, c, s) each
    inv_beta = torch.where(beta > 0, 1 / beta.clamp_min(1e-300), torch.zeros_like(beta))
    shape = (*alpha.shape[:-1], *([1] * (t.ndim - alpha.ndim + 1)))  # a coefficient against t's points

    def coeff(v: torch.Tensor, k: int) -> torch.Tensor:
        return v[..., k].reshape(shape)

    p = torch.ones_like(t).div_(q.mass.sqrt().clamp_min(1e-300).reshape(shape))
    p_prev, nxt = torch.zeros_like(t), torch.empty_like(t)
    K = p * p
    for k in range(alpha.shape[-1]):
        torch.sub(t, coeff(alpha, k), out=nxt).mul_(p)  # (t - α_k) p_k
        if k:
            nxt.addcmul_(coeff(beta, k - 1), p_prev, value=-1)  # - β_(k-1) p_(k-1)
        nxt.mul_(coeff(inv_beta, k))
        K.addcmul_(nxt, nxt)
        p_prev, p, nxt = p, nxt, p_prev
    return K
