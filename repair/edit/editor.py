"""The editor's arithmetic: rescale intruder singular values of W_tuned = W0 + ΔW.

    W' = W_tuned + Σ_{i ∈ intruders} (λ - 1) σ_i u_i v_iᵀ

computed from the SVD of W_tuned (as in the paper), never of ΔW alone. All matrices are in
(out, in) orientation and float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repair.spectral.linalg import lowrank_fro_norm, lowrank_singular_values


@dataclass(frozen=True)
class MatrixPatch:
    """A rank-|I| correction ``U diag(coeff) Vh`` to add to W_tuned: one λ for every direction (``scale``), or
    one per direction (``scales``, fitted by ``repair fit``; ``scale`` is then unused)."""

    intruders: list[int]  # the directions' indices (among W_tuned's singular vectors, or ΔW's for a fit)
    scale: float
    sigma_old: torch.Tensor  # (|I|,)
    U: torch.Tensor  # (out, |I|)
    Vh: torch.Tensor  # (|I|, in)
    scales: tuple[float, ...] | None = None  # (|I|,) per-direction λ_i
    directions: str = "intruders"  # or "delta": singular directions of ΔW, not of W_tuned

    @property
    def factors(self) -> torch.Tensor:
        """(|I|,) λ of each direction."""
        if self.scales is None:
            return torch.full_like(self.sigma_old, self.scale)
        return torch.tensor(self.scales, dtype=self.sigma_old.dtype)

    @property
    def coeff(self) -> torch.Tensor:
        return (self.factors - 1.0) * self.sigma_old  # (|I|,)

    @property
    def sigma_new(self) -> torch.Tensor:
        """The rescaled singular values: |λ| σ (a negative λ flips the direction's sign, not its σ)."""
        return self.factors.abs() * self.sigma_old

    @property
    def is_noop(self) -> bool:
        if self.scales is not None:
            return not self.intruders or all(s == 1.0 for s in self.scales)
        return not self.intruders or self.scale == 1.0

    def correction(self) -> torch.Tensor:
        """The dense (out, in) correction."""
        return (self.U * self.coeff) @ self.Vh


def make_patch(tuned, intruders: list[int], scale: float) -> MatrixPatch:
    idx = torch.tensor(intruders, dtype=torch.long)
    return MatrixPatch(list(intruders), float(scale), tuned.S[idx], tuned.U[:, idx], tuned.Vh[idx])


def apply_patch(tuned: torch.Tensor, patch: MatrixPatch) -> torch.Tensor:
    """W' in float32 (float64 stays float64); λ = 1 or no intruders returns W_tuned unchanged."""
    W = tuned if tuned.dtype == torch.float64 else tuned.float()
    return W if patch.is_noop else W + patch.correction().to(W.dtype)


def _split(coeff: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-direction factors ``b * a == coeff / scaling`` with equal magnitude."""
    c = coeff / scaling
    root = c.abs().sqrt()
    return torch.sign(c) * root, root


def extend_lora(B: torch.Tensor, A: torch.Tensor, scaling: float, patch: MatrixPatch,
                row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled LoRA factors of rank r + |I| whose update is ``ΔW + correction`` exactly.

    B (out, r) and A (r, in) are the adapter's unscaled factors. For DoRA, ``row_scale`` is the
    per-row factor m / ‖W0 + ΔW‖ that the correction is divided by (see ``dora_patch``).
    """
    if patch.is_noop:
        return B, A
    b, a = _split(patch.coeff, scaling)
    U = patch.U if row_scale is None else patch.U / row_scale[:, None]
    return torch.cat([B, U * b], dim=1), torch.cat([A, a[:, None] * patch.Vh], dim=0)


def dora_row_scale(tuned_unnormalised: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's factor m / ‖W0 + ΔW‖_row (out,), which maps W0 + ΔW to W_tuned."""
    return magnitude / torch.linalg.norm(tuned_unnormalised, dim=1)


def truncation_error(B_scaled: torch.Tensor, A: torch.Tensor, patch: MatrixPatch, rank: int) -> float:
    """Relative Frobenius error of truncating the patched update back to ``rank`` (what peft does).

    The patched update ΔW + correction has rank ≤ r + |I|; its singular values come from the
    small factors, so the error is exact without forming an SVD of the full matrix.
    """
    if patch.is_noop:
        return 0.0
    Bx = torch.cat([B_scaled, patch.U * patch.coeff], dim=1)  # (out, r + |I|)
    Ax = torch.cat([A, patch.Vh], dim=0)  # (r + |I|, in)
    s = lowrank_singular_values(Bx, Ax).double()
    total = s.pow(2).sum()
    return float((s[rank:].pow(2).sum() / total).sqrt()) if total > 0 else 0.0


def rewrite_error(B: torch.Tensor, A: torch.Tensor, scaling: float, B2: torch.Tensor, A2: torch.Tensor,
                  patch: MatrixPatch) -> float:
    """Relative Frobenius error of written unscaled factors (B2, A2) against the patched update.

    W' - W0 = [B s, U c] [A; Vh], compared with B2 s A2 without forming a dense matrix.
    """
    Uc = patch.U * patch.coeff
    update = lowrank_fro_norm(torch.cat([B * scaling, Uc], 1), torch.cat([A, patch.Vh], 0))
    diff = lowrank_fro_norm(torch.cat([B2 * scaling, -B * scaling, -Uc], 1), torch.cat([A2, A, patch.Vh], 0))
    return diff / update if update > 0 else 0.0


def dora_rewrite_error(W0: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor, scaling: float,
                       magnitude: torch.Tensor, W_new: torch.Tensor) -> float:
    """Relative Frobenius error of a written DoRA module (unscaled factors, magnitude) against W', as peft
    will merge it: m / ‖W0 + B2 A2 s‖_row · (W0 + B2 A2 s)."""
    W = W0.float() + (B2 @ A2) * scaling
    W = (magnitude / torch.linalg.norm(W, dim=1))[:, None] * W
    update = (W_new - W0.float()).norm()
    return float((W - W_new).norm() / update) if update > 0 else 0.0
