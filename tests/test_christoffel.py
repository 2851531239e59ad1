"""Christoffel bounds on one point mass of a spectral measure, against the measure itself (float64).

The measure of x with respect to diag(λ) has its masses x_j² at λ_j, known exactly; the bounds come
from Lanczos runs on that operator. Every mass must lie under the bound of every piece holding its
eigenvalue, the bounds may never be weaker than the Chebyshev-Markov-Stieltjes pair sums, and on a
dense spectrum they must be clearly tighter (the point of them).
"""

from __future__ import annotations

import math

import pytest
import torch

from repair.spectral.christoffel import pair_sums, point_mass_bounds
from repair.spectral.krylov import Lanczos

GEN_SEED = 0


def dense_spectrum(d: int, gen: torch.Generator) -> torch.Tensor:
    """Eigenvalues of G Gᵀ for a Gaussian G with decaying columns (piled up near 0, like a square weight)."""
    G = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    G = G * (1 + torch.arange(d, dtype=torch.float64) / 64) ** -0.6
    return torch.linalg.eigvalsh(G @ G.T)


def clustered_spectrum(d: int, gen: torch.Generator) -> torch.Tensor:
    """Tight clusters with repeated eigenvalues, and a few isolated large ones."""
    centres = torch.tensor([0.01, 0.2, 0.21, 1.0], dtype=torch.float64)
    lam = centres[torch.randint(0, 4, (d - 3,), generator=gen)] * (1 + 1e-9 * torch.randn(d - 3, generator=gen))
    lam[:20] = 0.2  # an exactly repeated eigenvalue: its masses add up at one point
    return torch.cat([lam, torch.tensor([3.0, 5.0, 9.0], dtype=torch.float64)]).sort().values


def columns(d: int, gen: torch.Generator) -> torch.Tensor:
    """(d, 3) a random unit vector, one with two planted large masses, and one spread over few atoms."""
    X = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    X[:, 1] *= 0.01
    X[d // 3, 1], X[d - 5, 1] = 0.8, 0.55
    X[:, 2] = torch.where(torch.rand(d, generator=gen) < 0.05, X[:, 2], torch.zeros(d, dtype=torch.float64))
    return X / X.norm(dim=0)


def run(lam: torch.Tensor, X: torch.Tensor, steps: int):
    return Lanczos(lambda Z: lam[None, :, None] * Z, X[None]).extend(steps).quadrature()


def piece_holding(lower: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(n,) index of the piece (lower ends ascending) whose closed interval holds each t."""
    return (torch.searchsorted(lower.contiguous(), t.contiguous(), right=True) - 1).clamp_min(0)


@pytest.mark.parametrize("spectrum", [dense_spectrum, clustered_spectrum])
@pytest.mark.parametrize("steps", [1, 2, 8, 32, 64])
def test_every_mass_lies_under_its_pieces_bound(spectrum, steps):
    gen = torch.Generator().manual_seed(GEN_SEED + steps)
    lam = spectrum(600, gen)
    X = columns(600, gen)
    q = run(lam, X, steps)
    b = point_mass_bounds(q)
    for c in range(X.shape[1]):
        atoms, where = torch.unique(lam, return_inverse=True)  # a repeated eigenvalue is one point
        mass = torch.zeros_like(atoms).index_add_(0, where, X[:, c] ** 2)
        lower = b.lower[0, c]
        idx = piece_holding(lower, atoms)
        bound = b.mass[0, c][idx]
        # an atom exactly at a piece boundary is in both pieces: both must cover it
        at_edge = (idx + 1 < lower.numel()) & (atoms == lower[(idx + 1).clamp(max=lower.numel() - 1)])
        bound = torch.where(at_edge, torch.minimum(bound, b.mass[0, c][(idx + 1).clamp(max=lower.numel() - 1)]), bound)
        assert (bound >= mass * (1 - 1e-9) - 1e-15).all()
        assert float(b.largest()[0, c]) <= float(pair_sums(q).amax(-1)[0, c]) * (1 + 1e-12)


def dense_with_unit_vector(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense spectrum of 2000 eigenvalues and a random unit vector (2000, 1)."""
    gen = torch.Generator().manual_seed(seed)
    lam = dense_spectrum(2000, gen)
    x = torch.randn(2000, 1, generator=gen, dtype=torch.float64)
    return lam, x / x.norm()


def test_tighter_than_pair_sums_on_a_dense_spectrum():
    lam, x = dense_with_unit_vector(1)
    for steps in (32, 64):
        q = run(lam, x, steps)
        chris, pairs = float(point_mass_bounds(q).largest()), float(pair_sums(q).amax())
        assert float((x**2).max()) <= chris <= 0.8 * pairs


def test_largest_is_the_peak_of_the_christoffel_function():
    """The bound is the supremum of λ(t) = 1 / K(t), evaluated rigorously: never below that supremum as
    sampled on a fine grid, and within 0.5% of it (the re-cut pieces; four pieces per gap overstate it)."""
    lam, x = dense_with_unit_vector(4)
    for steps in (24, 48):
        q = run(lam, x, steps)
        largest = float(point_mass_bounds(q).largest())
        K = torch.zeros(200001, dtype=torch.float64)  # K(t) = Σ_(k<=s) p_k(t)², p_k from the recurrence itself
        t = torch.linspace(float(q.nodes.min()), float(q.nodes.max()), K.numel(), dtype=torch.float64)
        alpha, beta = q.alpha[0, 0], torch.cat([q.beta[0, 0], q.beta_last[0]])
        p_prev, p = torch.zeros_like(t), torch.full_like(t, 1 / math.sqrt(float(q.mass[0, 0])))
        K += p * p
        for k in range(steps):
            p_prev, p = p, ((t - alpha[k]) * p - (beta[k - 1] * p_prev if k else 0)) / beta[k]
            K += p * p
        peak = float((1 / K).max())
        assert peak <= largest <= 1.005 * peak


def test_ratio_bound_covers_every_mass_over_its_eigenvalue():
    gen = torch.Generator().manual_seed(2)
    lam = dense_spectrum(800, gen) + 0.05  # bounded away from 0, like the larger side's nonzero part
    X = columns(800, gen)
    q = run(lam, X, 24)
    floor = lam.min().reshape(1)
    bound = point_mass_bounds(q).largest_ratio(floor)[0]
    assert (bound >= (X**2 / lam[:, None]).amax(0) * (1 - 1e-9)).all()


def test_a_run_that_breaks_down_is_the_measure_itself():
    gen = torch.Generator().manual_seed(3)
    lam = torch.linspace(0.1, 2.0, 10, dtype=torch.float64)
    x = torch.rand(10, 1, generator=gen, dtype=torch.float64)
    q = run(lam, x, 16)
    assert float(q.beta_last) == 0.0
    assert torch.allclose(point_mass_bounds(q).largest()[0, 0], (x**2).max(), rtol=1e-10)
