"""Control edits for the causal test: scale non-intruder directions of W_tuned instead of the intruders.

``neighbour`` (the paper's control, arXiv 2410.21228 v2): for each intruder, the non-intruder singular
direction of W_tuned nearest in rank (the next one down on a tie), scaled by the same λ.
``matched`` (stricter): for each intruder, the non-intruder direction whose σ is closest, scaled by the λ_c
that removes the same Frobenius mass, (1 - λ_c²) σ_c² = (1 - λ²) σ_i², so the matrix's ‖W‖_F changes by
exactly as much as under the repair (λ_c = λ when the σ are equal). When that direction's σ is too small to
carry the mass (λ_c would be imaginary), it is removed (λ_c = 0) and the rest is removed from the other free
non-intruders, largest σ first, then from what the other paired directions keep; only when all of them are
removed is the control short of the repair's mass (the report shows both masses). Candidates are directions certified not to be intruders (lower bound of
max|cos| ≥ ε) among the triplets the sweep keeps; each is used once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ControlKind = Literal["neighbour", "matched", "none"]
CONTROL_KINDS: tuple[str, ...] = ("matched", "neighbour", "none")


@dataclass(frozen=True)
class ControlPair:
    intruder: int  # rank of the intruder among W_tuned's singular vectors (0 = largest)
    control: int  # rank of the control direction
    sigma_intruder: float
    sigma_control: float


def choose_controls(S: torch.Tensor, non_intruder: torch.Tensor, intruders: list[int],
                    kind: ControlKind) -> list[ControlPair]:
    """One control direction per intruder (in intruder rank order); an intruder without a free candidate gets
    none. ``S`` (n,) are W_tuned's leading singular values, ``non_intruder`` (n,) the certified non-intruders."""
    free = [j for j in range(S.shape[0]) if bool(non_intruder[j])]
    pairs = []
    for i in sorted(intruders):
        if not free:
            break
        if kind == "neighbour":
            j = min(free, key=lambda c: (abs(c - i), c < i))
        else:
            j = min(free, key=lambda c: (abs(float(S[c]) - float(S[i])), c))
        free.remove(j)
        pairs.append(ControlPair(i, j, float(S[i]), float(S[j])))
    return pairs


def spill_order(S: torch.Tensor, non_intruder: torch.Tensor, pairs: list[ControlPair]) -> list[int]:
    """The free non-intruders left after pairing, largest σ first: where ``matched`` removes what a paired
    direction cannot carry."""
    used = {p.control for p in pairs}
    free = [j for j in range(S.shape[0]) if bool(non_intruder[j]) and j not in used]
    return sorted(free, key=lambda j: (-float(S[j]), j))


def control_factors(scale: float, pairs: list[ControlPair], spill_sigma: list[float], kind: ControlKind) -> list[float]:
    """The factor of each control direction at this λ: the paired directions, then the spill directions."""
    if kind == "neighbour":
        return [scale] * len(pairs) + [1.0] * len(spill_sigma)
    factors, leftover = [], 0.0
    for p in pairs:
        need = (1.0 - scale * scale) * p.sigma_intruder ** 2  # Frobenius mass the repair removes here
        if p.sigma_control > 0 and need <= p.sigma_control ** 2:
            factors.append(math.copysign(math.sqrt(1.0 - need / p.sigma_control ** 2), scale))
        else:
            factors.append(0.0)
            leftover += need - p.sigma_control ** 2
    for sigma in spill_sigma:
        take = min(sigma * sigma, max(leftover, 0.0))
        factors.append(math.sqrt(1.0 - take / (sigma * sigma)) if sigma > 0 else 1.0)
        leftover -= take
    for i, p in enumerate(pairs):  # what is still missing: the paired directions' spare mass
        kept = factors[i] ** 2 * p.sigma_control ** 2
        take = min(kept, max(leftover, 0.0))
        if take > 0:
            factors[i] = math.copysign(math.sqrt((kept - take) / p.sigma_control ** 2), scale)
            leftover -= take
    return factors
