"""Synthetic matrices with planted intruders: the answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from repair.detection.detector import find_intruders
from repair.spectral.linalg import effective_rank, lowrank_singular_values, svd


def orthonormal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def planted(m=64, n=96, strengths=(30.0, 20.0), seed=0):
    """W0 with a decaying spectrum plus rank-1 updates along mixtures of 16 low-ranked base directions.

    Each planted left vector has |cos| = 0.25 with 16 base vectors and 0 with all others, so
    it is an intruder at any epsilon above about 0.26; they become the top singular vectors.
    """
    gen = torch.Generator().manual_seed(seed)
    U0, V0 = orthonormal(m, gen), orthonormal(n, gen)[:, :m]
    sigma = 10 * 0.85 ** torch.arange(m, dtype=torch.float64)
    W0 = U0 @ torch.diag(sigma) @ V0.T
    tuned = W0.clone()
    for j, s in enumerate(strengths):
        cols = slice(20 + 16 * j, 36 + 16 * j)
        u = U0[:, cols].sum(1) / 4  # unit norm
        v = V0[:, cols].sum(1) / 4
        tuned += s * torch.outer(u, v)
    return W0, tuned, U0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_planted_intruders_found_exactly(dtype):
    W0, tuned, _ = planted()
    found = find_intruders(W0.to(dtype), tuned.to(dtype), top_k=10, epsilon=0.5)
    assert found.intruders == [0, 1]
    if dtype in (torch.float64, torch.float32):  # in half precision the base's smallest directions blur
        assert found.max_cos[:2].max() < 0.3
    assert found.max_cos[2:].min() > 0.9
    assert found.tuned.S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_planted_intruders_right_and_both(dtype):
    W0, tuned, _ = planted()
    for side in ("right", "both"):
        assert find_intruders(W0.to(dtype), tuned.to(dtype), 10, 0.5, side).intruders == [0, 1]


def test_intruder_strength_sets_its_rank():
    W0, tuned, _ = planted(strengths=(5.0,))  # below sigma_0 = 10: lands at a lower rank
    found = find_intruders(W0, tuned, top_k=10, epsilon=0.5)
    assert len(found.intruders) == 1 and found.intruders[0] > 0
    assert abs(found.tuned.S[found.intruders[0]] - 5.0) < 0.5


def test_epsilon_below_planted_similarity_finds_none():
    W0, tuned, _ = planted()
    assert find_intruders(W0, tuned, top_k=10, epsilon=0.2).intruders == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_small_perturbation_has_no_intruders(dtype):
    W0, _, _ = planted()
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(W0.shape, generator=gen, dtype=torch.float64)
    tuned = W0 + 0.01 * W0.norm() * G / G.norm()  # full-fine-tune-like: small, dense, full rank
    assert find_intruders(W0.to(dtype), tuned.to(dtype), top_k=10, epsilon=0.5).intruders == []


def test_identical_matrices_have_no_intruders_and_cos_one():
    W0, _, _ = planted()
    found = find_intruders(W0, W0.clone(), top_k=10, epsilon=0.9)
    assert found.intruders == [] and torch.allclose(found.max_cos, torch.ones(10, dtype=W0.dtype))


def test_svd_signs_are_fixed_and_deterministic():
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    a, b = svd(W), svd(-W)
    rows = a.U.abs().argmax(0)
    assert (a.U[rows, torch.arange(20)] > 0).all()
    assert torch.allclose(a.U, b.U) and torch.allclose(a.Vh, -b.Vh)  # the sign moves to V
    assert torch.allclose(a.U @ torch.diag(a.S) @ a.Vh, W, atol=1e-5)


def test_effective_rank_known_values():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_rank(p * 8) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_lowrank_singular_values_match_dense():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(50, 3, generator=gen), torch.randn(3, 40, generator=gen)
    assert torch.allclose(lowrank_singular_values(B, A), torch.linalg.svdvals(B @ A)[:3], rtol=1e-4)
