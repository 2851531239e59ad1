"""The editor's arithmetic on synthetic matrices with planted intruders."""

from __future__ import annotations

import pytest
import torch
from test_linalg_detector import planted

from repair.detection.detector import find_intruders
from repair.edit.editor import apply_patch, extend_lora, make_patch, truncation_error


@pytest.fixture()
def case():
    W0, tuned, _ = planted()
    W0, tuned = W0.float(), tuned.float()
    found = find_intruders(W0, tuned, top_k=10, epsilon=0.5, keep=min(tuned.shape))  # every triplet
    assert found.intruders == [0, 1]
    return W0, tuned, found


def test_scale_zero_removes_planted_intruders(case):
    W0, tuned, found = case
    W_new = apply_patch(tuned, make_patch(found.tuned, found.intruders, 0.0))
    assert find_intruders(W0, W_new, top_k=10, epsilon=0.5).intruders == []


def test_scale_half_halves_sigma_and_leaves_the_rest(case):
    W0, tuned, found = case
    t = found.tuned
    W_new = apply_patch(tuned, make_patch(t, found.intruders, 0.5))
    expected = t.S.clone()
    expected[[0, 1]] *= 0.5
    after = torch.linalg.svdvals(W_new)
    assert torch.allclose(after, expected.sort(descending=True).values, atol=1e-4)
    # every other singular direction is untouched: W' v_j = σ_j u_j for j outside the intruders
    for j in range(2, 20):
        assert torch.allclose(W_new @ t.Vh[j], t.S[j] * t.U[:, j], atol=1e-4)
    for i in (0, 1):
        assert torch.allclose(W_new @ t.Vh[i], 0.5 * t.S[i] * t.U[:, i], atol=1e-4)


def test_scale_one_is_the_identity(case):
    _, tuned, found = case
    assert torch.equal(apply_patch(tuned, make_patch(found.tuned, found.intruders, 1.0)), tuned)


def test_scales_compose(case):
    W0, tuned, found = case
    once = apply_patch(tuned, make_patch(found.tuned, [0, 1], 0.3 * 0.6))
    first = apply_patch(tuned, make_patch(found.tuned, [0, 1], 0.3))
    again = find_intruders(W0, first, top_k=10, epsilon=0.5)  # the same two, now lower in rank
    assert len(again.intruders) == 2 and again.intruders != [0, 1]
    twice = apply_patch(first, make_patch(again.tuned, again.intruders, 0.6))
    assert torch.allclose(once, twice, atol=1e-4)


@pytest.mark.parametrize("scaling", [2.0, 0.25])
def test_extended_lora_reproduces_the_patch_exactly(scaling):
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(48, 40, generator=gen) * 0.05
    B, A = torch.randn(48, 3, generator=gen), torch.randn(3, 40, generator=gen)
    tuned = W0 + (B @ A) * scaling
    found = find_intruders(W0, tuned, top_k=10, epsilon=0.5)
    assert found.intruders
    patch = make_patch(found.tuned, found.intruders, 0.2)
    B2, A2 = extend_lora(B, A, scaling, patch)
    assert B2.shape[1] == 3 + len(found.intruders)
    W_new = apply_patch(tuned, patch)
    assert ((W0 + (B2 @ A2) * scaling) - W_new).norm() / W_new.norm() < 1e-6
    # what truncating back to rank 3 would lose, measured densely
    U, S, Vh = torch.linalg.svd(W_new - W0)
    lost = float(S[3:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
    assert truncation_error(B * scaling, A, patch, 3) == pytest.approx(lost, abs=1e-5)
