"""Linear algebra for intruder analysis: SVD with fixed signs, effective rank, low-rank norms.

Every routine computes in float32 (or float64 when given float64), whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SVD:
    """Thin SVD ``W = U diag(S) Vh`` with deterministic signs."""

    U: torch.Tensor  # (m, p), p = min(m, n)
    S: torch.Tensor  # (p,)
    Vh: torch.Tensor  # (p, n)


def fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the entry of largest magnitude in ``u_i`` is positive.

    Ties between entries of equal magnitude go to the lowest index (``argmax`` rule).
    """
    signs = sign_rule(U)
    return U * signs[..., None, :], Vh * signs[..., :, None]


def sign_rule(U: torch.Tensor) -> torch.Tensor:
    """(..., p) ±1 per column of U (..., d, p): the sign that makes its largest-magnitude entry positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, p)
    signs = torch.sign(torch.gather(U, -2, idx)).squeeze(-2)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def svd(W: torch.Tensor) -> SVD:
    """Thin SVD of a 2-D matrix in float32 (float64 stays float64), with fixed signs."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    # cuSOLVER's default (Jacobi) SVD stops at a looser tolerance than LAPACK; its QR-based gesvd does not
    driver = "gesvd" if W.is_cuda else None
    U, S, Vh = torch.linalg.svd(W.to(_compute_dtype(W)), full_matrices=False, driver=driver)
    U, Vh = fix_signs(U, Vh)
    return SVD(U, S, Vh)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007): ``exp(H(p))`` with ``p = s / sum(s)``.

    Returns 0.0 for an all-zero spectrum (no update at all).
    """
    s = singular_values.to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def lowrank_singular_values(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of ``B @ A`` for B (m, r) and A (r, n) without forming the (m, n) product."""
    dtype = _compute_dtype(B)
    _, R_b = torch.linalg.qr(B.to(dtype))  # (r, r)
    _, R_a = torch.linalg.qr(A.to(dtype).T)  # (r, r)
    return torch.linalg.svdvals(R_b @ R_a.T)  # (r,)


def lowrank_fro_norm(X: torch.Tensor, Y: torch.Tensor) -> float:
    """‖X @ Y‖_F for X (m, R) and Y (R, n) with small R, from the two Gram matrices, in float64.

    Cancellation (X @ Y much smaller than its parts) is resolved to about 1e-8 of the parts' norm.
    """
    Xd, Yd = X.to(torch.float64), Y.to(torch.float64)
    return float(((Xd.T @ Xd) * (Yd @ Yd.T)).sum().clamp_min(0).sqrt())
