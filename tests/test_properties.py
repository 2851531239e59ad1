"""Property-based tests (hypothesis) for the linear algebra of detection and patching."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repair.detection.detector import find_intruders
from repair.edit.editor import apply_patch, make_patch
from repair.spectral.linalg import svd

DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def planted_case(draw):
    """W0 = U diag(σ) Vᵀ plus 1-3 rank-1 intruders along mixtures of 16 weak base directions.

    σ falls linearly from 10 to 1, so neighbouring directions stay well separated (gaps ≈ 0.1) even
    after rounding to bfloat16: base singular vectors remain well defined in every dtype.
    """
    m = draw(st.integers(64, 96))
    n = draw(st.integers(64, 96))
    p = min(m, n)
    n_intr = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    sigma = torch.linspace(10.0, 1.0, p, dtype=torch.float64)
    W0 = U[:, :p] @ torch.diag(sigma) @ V[:, :p].T
    tuned = W0.clone()
    strengths = [40.0 - 8 * j for j in range(n_intr)]
    for j, s in enumerate(strengths):
        cols = slice(p - 16 * (j + 1), p - 16 * j)  # |cos| = 1/4 with 16 base directions, 0 with the rest
        tuned += s * torch.outer(U[:, cols].sum(1) / 4, V[:, cols].sum(1) / 4)
    return W0, tuned, n_intr, draw(DTYPES)


@SETTINGS
@given(planted_case())
def test_planted_intruders_are_recovered(case):
    W0, tuned, n_intr, dtype = case
    found = find_intruders(W0.to(dtype), tuned.to(dtype), top_k=10, epsilon=0.5)
    assert found.intruders == list(range(n_intr))


@SETTINGS
@given(planted_case(), st.floats(0.0, 1.0))
def test_scale_one_is_identity_and_other_sigmas_unchanged(case, lam):
    W0, tuned, n_intr, _ = case
    found = find_intruders(W0, tuned, top_k=10, epsilon=0.5, keep=min(tuned.shape))  # every triplet
    t = found.tuned
    assert torch.equal(apply_patch(tuned, make_patch(t, found.intruders, 1.0)), tuned)
    W_new = apply_patch(tuned, make_patch(t, found.intruders, lam))
    expected = t.S.clone()
    expected[found.intruders] *= lam
    got = torch.linalg.svdvals(W_new)
    assert torch.allclose(got, expected.sort(descending=True).values, atol=1e-8 * float(t.S[0]) + 1e-9)


@SETTINGS
@given(planted_case(), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_patching_twice_equals_patching_once_with_the_product(case, l1, l2):
    W0, tuned, n_intr, _ = case
    found = find_intruders(W0, tuned, top_k=10, epsilon=0.5)
    first = apply_patch(tuned, make_patch(found.tuned, found.intruders, l1))
    # λ1 ≥ 0.5 keeps every intruder σ (≥ 12) above the base spectrum (≤ 10): still the top ones, and
    # the detector finds them again in the patched matrix
    again = find_intruders(W0, first, top_k=10, epsilon=0.5)
    assert again.intruders == found.intruders
    twice = apply_patch(first, make_patch(again.tuned, again.intruders, l2))
    once = apply_patch(tuned, make_patch(found.tuned, found.intruders, l1 * l2))
    assert torch.allclose(twice, once, atol=1e-8 * float(tuned.norm()))


@SETTINGS
@given(st.integers(2, 40), st.integers(2, 40), DTYPES, st.integers(0, 2**16))
def test_svd_is_deterministic_with_the_sign_rule(m, n, dtype, seed):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    a, b = svd(W), svd(W.clone())
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    rows = a.U.abs().argmax(0)
    assert (a.U[rows, torch.arange(a.U.shape[1])] >= 0).all()
    assert a.S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
