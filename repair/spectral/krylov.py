"""Block Krylov solvers for symmetric positive semi-definite operators, batched over problems.

An operator is a function ``op(X)`` mapping a batch of blocks (b, d, c) to (b, d, c); it is never
formed as a matrix. Two routines:

- ``top_eigenpairs``: the top eigenpairs by Rayleigh-Ritz on a growing basis, expanded each round
  with the residuals of the wanted Ritz pairs (a block Lanczos process with thick restarts), until
  every wanted residual is below a tolerance. The residual norms come back with the pairs, so
  callers can bound what the approximation may have changed.
- ``lanczos_quadrature``: ``s`` Lanczos steps per column, with full reorthogonalisation, giving the
  nodes and weights of the Gauss quadrature of each column's spectral measure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Operator = Callable[[torch.Tensor], torch.Tensor]  # (b, d, c) -> (b, d, c)
GUARD = 8  # Ritz pairs carried beyond the wanted ones: they speed up convergence of the last wanted


def t_mul(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Wᵀ X for W (b, m, n) and X (b, m, c), as (Xᵀ W)ᵀ: MKL's transposed product runs at half speed."""
    return (X.mT @ W).mT


def sym(T: torch.Tensor) -> torch.Tensor:
    return (T + T.mT) / 2


def orthonormal_complement(block: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal columns (b, d, c) spanning ``block`` minus its part in span(Q).

    Classical Gram-Schmidt before and after the QR ("twice is enough"). A column with nothing left
    is replaced by a coordinate vector past Q's width: any direction outside span(Q) is a harmless
    addition to a Rayleigh-Ritz basis.
    """
    def project(x: torch.Tensor) -> torch.Tensor:
        return x if Q is None else x - Q @ (Q.mT @ x)

    scale = block.norm(dim=(-2, -1), keepdim=True)
    block = project(block)
    weak = block.norm(dim=-2, keepdim=True) <= 1e-8 * scale  # (b, 1, c), all when scale == 0
    if weak.any():
        d, c, s = block.shape[-2], block.shape[-1], 0 if Q is None else Q.shape[-1]
        cols = torch.arange(s, s + c, device=block.device) % d
        fill = torch.eye(d, dtype=block.dtype, device=block.device)[:, cols]
        block = project(torch.where(weak, fill, block))
    Qb, _ = torch.linalg.qr(block)
    Qb, _ = torch.linalg.qr(project(Qb))  # re-orthogonalise what QR made of nearly dependent columns
    return Qb


@dataclass(frozen=True)
class EigenResult:
    """Ritz pairs of a batch: the wanted ones first, then the guard pairs."""

    theta: torch.Tensor  # (b, k') float64, descending
    Y: torch.Tensor  # (b, d, k') orthonormal Ritz vectors
    residual: torch.Tensor  # (b, k') float64 ‖op(y) - θ y‖
    converged: bool
    products: int  # operator applications per problem (columns)


def top_eigenpairs(op: Operator, start: torch.Tensor, k: int, tol: float, max_dim: int,
                   max_products: int, expand_all: bool = True, accept: float | None = None) -> EigenResult:
    """The top ``k`` eigenpairs of ``op`` from the span of ``start`` (b, d, c) and its Krylov blocks.

    A problem is converged when every wanted residual is at most ``tol · θ_1``; its pairs are kept
    from that round on, and every round expands all problems with all wanted residuals, so a
    problem's answer does not depend on the others in its batch (``expand_all=False`` expands only
    with the pairs still moving: cheaper, for a batch of one). The basis restarts from the
    current Ritz vectors when it would pass ``max_dim`` columns; the solver gives up (returning the
    pairs it has, ``converged=False``) after ``max_products`` operator columns. With ``accept``
    (>= tol), a problem whose wanted residuals are all at most ``accept · θ_1`` and whose largest one
    has not halved since the round before has stalled at its rounding floor: it stops there too
    (``converged`` stays False for it), instead of spending the rest of the budget on rounds that
    no longer move.
    """
    d = start.shape[-2]
    want = min(k + GUARD, d)
    if start.shape[-1] < want:  # too few starting directions: add seeded random ones
        gen = torch.Generator().manual_seed(0)
        extra = torch.randn(*start.shape[:-1], want - start.shape[-1], generator=gen, dtype=start.dtype)
        start = torch.cat([start, extra.to(start.device)], -1)
    V = orthonormal_complement(start, None)
    AV, products = op(V), V.shape[-1]
    kept: EigenResult | None = None
    done = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)
    converged = torch.zeros_like(done)
    last: torch.Tensor | None = None  # (b,) the largest wanted residual of the round before, relative to θ_1
    while True:
        theta, S = torch.linalg.eigh(sym(V.mT @ AV).double())
        theta, S = theta.flip(-1)[..., :want], S.flip(-1)[..., :want].to(V.dtype)
        Y, AY = V @ S, AV @ S
        R = AY - Y * theta[:, None, :].to(V.dtype)
        resid = R.double().norm(dim=-2)  # (b, want)
        scale = theta[:, :1].abs().clamp_min(torch.finfo(V.dtype).tiny)  # (b, 1) θ_1
        floor = tol * scale
        complete = V.shape[-1] >= d  # the basis is the whole space: Rayleigh-Ritz is exact
        now = (resid[:, :k] <= floor).all(1) | complete
        worst = (resid[:, :k] / scale).amax(1)  # (b,) the largest wanted residual relative to θ_1
        stalled = torch.zeros_like(now) if accept is None or last is None else (worst <= accept) & (worst > last / 2)
        last = worst
        current = EigenResult(theta, Y, resid, bool(now.all()), products)
        kept = current if kept is None else _merge(kept, current, ~done)  # frozen once converged or stalled
        converged |= now & ~done
        done |= now | stalled
        if done.all() or products >= max_products or complete:
            if not converged.all():
                logger.debug("block Krylov stopped after %d products with %d of %d problems unconverged",
                             products, int((~converged).sum()), converged.numel())
            return EigenResult(kept.theta, kept.Y, kept.residual, bool(converged.all()), products)
        todo = torch.ones(want, dtype=torch.bool, device=R.device)
        if not expand_all:
            todo = (resid > floor).any(0)
            todo[k:] = True  # the guard pairs keep the last wanted ones moving
        if V.shape[-1] + int(todo.sum()) > max_dim:
            V, AV = Y, AY  # thick restart: keep the Ritz vectors and their images
        new = orthonormal_complement(R[..., todo], V)[..., : d - V.shape[-1]]
        V, AV = torch.cat([V, new], -1), torch.cat([AV, op(new)], -1)
        products += new.shape[-1]


def _merge(kept: EigenResult, current: EigenResult, take: torch.Tensor) -> EigenResult:
    """``current`` for the problems in ``take`` (b,), ``kept`` for the others."""
    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(take.view(-1, *[1] * (a.ndim - 1)), b, a)

    return EigenResult(pick(kept.theta, current.theta), pick(kept.Y, current.Y),
                       pick(kept.residual, current.residual), current.converged, current.products)


@dataclass(frozen=True)
class Quadrature:
    """Gauss quadrature of the spectral measure of each column: nodes ascending, weights summing
    to the column's squared norm. Columns that broke down early carry zero-weight padding nodes at -1."""

    nodes: torch.Tensor  # (b, c, s) float64
    weights: torch.Tensor  # (b, c, s) float64
    alpha: torch.Tensor  # (b, c, s) float64 the recurrence's diagonal (-1 past a breakdown)
    beta: torch.Tensor  # (b, c, s - 1) float64 its off-diagonal (0 past a breakdown)
    beta_last: torch.Tensor  # (b, c) float64 the residual norm after the last step (0: broken down)
    mass: torch.Tensor  # (b, c) float64 the measure's total mass, ‖x‖²

    def columns(self, index) -> Quadrature:
        """The quadrature of some columns (``index`` into the column axis)."""
        return Quadrature(self.nodes[:, index], self.weights[:, index], self.alpha[:, index], self.beta[:, index],
                          self.beta_last[:, index], self.mass[:, index])


class Lanczos:
    """Lanczos recurrences of ``P op P`` from each column of X (b, d, c), P = I - Q Qᵀ for ``deflate`` Q.

    Every column runs its own recurrence (the operator is applied to all of them at once), fully
    reorthogonalised against its earlier vectors, so the tridiagonal matrices are those of exact
    arithmetic on a nearby problem. ``extend`` continues where the last call stopped, so asking for
    more steps costs only the new ones.
    """

    def __init__(self, op: Operator, X: torch.Tensor, deflate: torch.Tensor | None = None):
        self.op, self.deflate = op, deflate
        X = self._project(X)
        self.norm = X.double().norm(dim=-2)  # (b, c)
        self.q = X / self.norm.clamp_min(1e-300)[:, None, :].to(X.dtype)
        self.alive = self.norm > 0  # (b, c) columns not yet broken down
        self.basis: list[torch.Tensor] = []  # (b, d, c) per step
        self.alpha: list[torch.Tensor] = []  # (b, c) float64 per step
        self.beta: list[torch.Tensor] = []  # (b, c) float64 between steps

    def _project(self, Z: torch.Tensor) -> torch.Tensor:
        return Z if self.deflate is None else Z - self.deflate @ (self.deflate.mT @ Z)

    def extend(self, steps: int) -> Lanczos:
        """Run until ``steps`` steps in all (at most the dimension)."""
        d = self.q.shape[-2]
        while len(self.basis) < min(steps, d):
            if self.basis:  # the step before ended with w; it becomes the next vector unless it broke down
                self._advance()
            q = self.q
            self.basis.append(q)
            w = self._project(self.op(q))
            alpha = (q * w).sum(-2).double()
            stack = torch.stack(self.basis, 1)  # (b, s, d, c)
            for _ in range(2):  # full reorthogonalisation, twice
                w = w - torch.einsum("bsdc,bsc->bdc", stack, torch.einsum("bsdc,bdc->bsc", stack, w))
                w = self._project(w)
            self.alpha.append(torch.where(self.alive, alpha, torch.full_like(alpha, -1.0)))
            self._w = w
        return self

    def _advance(self) -> None:
        w = self._w
        nb = w.double().norm(dim=-2)  # (b, c)
        scale = torch.stack(self.alpha, -1).abs().amax(-1).clamp_min(1e-300)
        self.alive = self.alive & (nb > 1e-10 * scale)  # broken down: the measure is resolved exactly
        self.beta.append(torch.where(self.alive, nb, torch.zeros_like(nb)))
        self.q = torch.where(self.alive[:, None, :], w / nb.clamp_min(1e-300)[:, None, :].to(w.dtype),
                             torch.zeros_like(w))

    def quadrature(self) -> Quadrature:
        """The Gauss quadrature of the steps run so far."""
        alpha = torch.stack(self.alpha, -1)  # (b, c, s)
        T = torch.diag_embed(alpha)
        beta = alpha.new_zeros(*alpha.shape[:-1], 0)
        if self.beta:
            beta = torch.stack(self.beta, -1)  # (b, c, s - 1)
            T = T + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
        nodes, vecs = torch.linalg.eigh(T)  # ascending
        weights = vecs[..., 0, :] ** 2 * (self.norm**2)[..., None]
        weights = torch.where(nodes < -0.5, torch.zeros_like(weights), weights)  # padding of dead columns
        last = self._w.double().norm(dim=-2)  # (b, c)
        scale = alpha.abs().amax(-1).clamp_min(1e-300)
        last = torch.where(self.alive & (last > 1e-10 * scale), last, torch.zeros_like(last))
        return Quadrature(nodes, weights, alpha, beta, last, self.norm**2)


def lanczos_quadrature(op: Operator, X: torch.Tensor, steps: int, deflate: torch.Tensor | None = None) -> Quadrature:
    """The Gauss quadrature of ``steps`` Lanczos steps of ``P op P`` from each column of X (see ``Lanczos``)."""
    return Lanczos(op, X, deflate).extend(max(1, steps)).quadrature()
