"""The structured top-k path against the exact full SVD (float64), on random and planted matrices."""

from __future__ import annotations

import pytest
import torch

from repair.adapters.pairs import MatrixPair
from repair.detection.detector import find_intruders, tuned_topks
from repair.spectral.spectra import compute_spectrum
from repair.spectral.topk import DENSE_SIZE, dense_topk, structured_topk, structured_topk_many

K = 10
SHAPES = {"square": (96, 96), "tall": (160, 96), "wide": (96, 160),
          "square-iterative": (240, 240), "tall-iterative": (400, 200), "wide-iterative": (200, 400)}


def reference(W0: torch.Tensor, Wt: torch.Tensor, k: int):
    """σ and the decisive max|cos| on both sides from full float64 SVDs: the ground truth."""
    U, S, Vh = torch.linalg.svd(Wt.double(), full_matrices=False)
    U0, _, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
    left = (U[:, :k].T @ U0).abs().amax(1)
    right = (Vh[:k] @ V0h.T).abs().amax(1)
    return S[:k], left, right


def planted_lowrank(m: int, n: int, r: int, seed: int, n_intruders: int = 2):
    """W0 with a decaying spectrum; B A adds ``n_intruders`` strong directions spread over 16 low-ranked
    base directions (intruders by construction) and r - n_intruders along the top base directions."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U0 = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0][:, :p]
    V0 = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0][:, :p]
    W0 = (U0 * (10 * 0.97 ** torch.arange(p, dtype=torch.float64))) @ V0.T
    B, A = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
    for j in range(r):
        if j < n_intruders:
            cols = slice(p // 3 + 16 * j, p // 3 + 16 * (j + 1))
            B[:, j], A[j] = (30 - 7 * j) * U0[:, cols].sum(1) / 4, V0[:, cols].sum(1) / 4
        else:
            B[:, j], A[j] = 0.5 * U0[:, j], V0[:, j]
    return W0, B, A


def random_lowrank(m: int, n: int, r: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    B = torch.randn(m, r, generator=gen, dtype=torch.float64) * 0.6
    A = torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5
    return W0, B, A


def check_against_reference(W0, B, A, dtype, epsilon=0.5):
    W0c, Bc, Ac = W0.to(dtype), B.to(dtype), A.to(dtype)
    spec = compute_spectrum(W0c)
    t = structured_topk(W0c, Bc, Ac, spec, K + 1)
    assert t is not None and t.method == "structured"
    S, left, right = reference(W0c, W0c.double() + Bc.double() @ Ac.double(), K)
    assert torch.allclose(t.S[:K].double(), S, rtol=1e-5, atol=1e-6 * float(S[0]))
    ok = ~t.degenerate[:K]
    for got, want in ((t.cos_left[:K].amax(1), left), (t.cos_right[:K].amax(1), right)):
        assert (got.double() - want)[ok].abs().max() < 1e-4
    found = find_intruders(W0c, lambda: W0c + Bc @ Ac, K, epsilon, spectrum=spec, factors=(Bc, Ac))
    clear = (left - epsilon).abs() > 1e-4  # a cosine within the tolerance of ε may fall either way
    expected = [i for i in range(K) if left[i] < epsilon]
    assert [i for i in found.intruders if clear[i]] == [i for i in expected if clear[i]]
    return t, found


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("r", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planted_matches_full_svd(shape, r, dtype):
    m, n = SHAPES[shape]
    t, found = check_against_reference(*planted_lowrank(m, n, r, seed=r), dtype)
    planted = list(range(min(2, r)))  # the planted directions lead the spectrum
    assert found.intruders[: len(planted)] == planted
    assert not t.degenerate[: len(planted)].any()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("r", [1, 4, 16])
def test_random_matches_full_svd(shape, r):
    m, n = SHAPES[shape]
    check_against_reference(*random_lowrank(m, n, r, seed=10 + r), torch.float32)


@pytest.mark.parametrize("shape", ["square-iterative", "tall-iterative", "wide-iterative"])
@pytest.mark.parametrize("make", [planted_lowrank, random_lowrank])
def test_iterative_solver_converges_without_the_dense_fallback(shape, make, monkeypatch):
    import repair.spectral.topk as topk

    m, n = SHAPES[shape]
    assert min(m, n) > DENSE_SIZE

    def no_dense(*args):
        raise AssertionError("fell back to the dense eigensolver")

    monkeypatch.setattr(topk, "_dense_eigs", no_dense)
    check_against_reference(*make(m, n, 4, seed=5), torch.float32)


def test_equal_singular_values_are_flagged_degenerate():
    gen = torch.Generator().manual_seed(3)
    U0 = torch.linalg.qr(torch.randn(96, 96, generator=gen, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(160, 160, generator=gen, dtype=torch.float64))[0][:, :96]
    sigma = 10 * 0.97 ** torch.arange(96, dtype=torch.float64)
    sigma[1] = sigma[0]  # σ_0 = σ_1: their singular vectors are any rotation of each other
    W0 = (U0 * sigma) @ V0.T
    B, A = torch.zeros(96, 2, dtype=torch.float64), torch.randn(2, 160, generator=gen, dtype=torch.float64)
    t = structured_topk(W0, B, A, compute_spectrum(W0), K + 1)
    assert t.degenerate[0] and t.degenerate[1] and not t.degenerate[5]
    found = find_intruders(W0, W0, K, 0.5, spectrum=compute_spectrum(W0), factors=(B, A))
    assert found.degenerate == [0, 1]


def test_batched_equals_one_at_a_time():
    problems = [planted_lowrank(200, 400, 4, seed=s) for s in range(3)] + [random_lowrank(400, 200, 4, seed=9)]
    from repair.spectral.topk import LowRankProblem

    batch = structured_topk_many([LowRankProblem(W0, B, A, compute_spectrum(W0)) for W0, B, A in problems], K)
    for (W0, B, A), t in zip(problems, batch, strict=True):
        one = structured_topk(W0, B, A, compute_spectrum(W0), K)
        assert torch.allclose(t.S, one.S, rtol=1e-10)
        assert torch.allclose(t.cos_left, one.cos_left, atol=1e-8)


def test_vectors_are_singular_vectors_with_fixed_signs():
    W0, B, A = planted_lowrank(160, 96, 4, seed=1)
    t = structured_topk(W0, B, A, compute_spectrum(W0), K)
    W = W0 + B @ A
    assert torch.allclose(W @ t.Vh.T, t.U * t.S, atol=1e-8)
    assert torch.allclose(t.U.T @ t.U, torch.eye(K, dtype=W.dtype), atol=1e-5)  # residual tolerance / gap
    rows = t.U.abs().argmax(0)
    assert (t.U[rows, torch.arange(K)] > 0).all()
    dense = dense_topk(W, W0, compute_spectrum(W0), K)
    assert torch.allclose(t.U, dense.U, atol=1e-5) and torch.allclose(t.Vh, dense.Vh, atol=1e-5)


def test_zero_update_and_rank_deficient_base_fall_back_or_agree():
    W0, B, A = planted_lowrank(96, 160, 2, seed=2)
    t = structured_topk(W0, B * 0, A, compute_spectrum(W0), K)
    S0 = torch.linalg.svdvals(W0)[:K]
    assert torch.allclose(t.S, S0, rtol=1e-8) and torch.allclose(t.cos_left.amax(1), torch.ones(K, dtype=W0.dtype))
    low = W0.clone()
    low[:, 5:] = 0  # rank 5: the top 10 of W0 + 0 include zero singular values
    assert structured_topk(low, B * 0, A[:, :], compute_spectrum(low), K) is None
    pair = MatrixPair("x", tuple(low.shape), False, low, low.clone(), (B * 0, A))
    assert tuned_topks([pair], [compute_spectrum(low)], K)[0].method == "dense"  # the exact path takes over


def test_full_checkpoint_pairs_take_the_exact_path():
    W0, B, A = random_lowrank(96, 160, 2, seed=4)
    pair = MatrixPair("x", tuple(W0.shape), False, W0, W0 + B @ A)
    t = tuned_topks([pair], [compute_spectrum(W0)], K)[0]
    S, left, _ = reference(W0, W0 + B @ A, K)
    assert t.method == "dense" and torch.allclose(t.S, S) and torch.allclose(t.cos_left.amax(1), left, atol=1e-8)
