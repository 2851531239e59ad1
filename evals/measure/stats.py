"""Standard errors of forgetting measures, with documents as the sampling unit.

Forgetting NLL is a ratio Σ_d x_d / Σ_d n_d (summed NLL over scored tokens). Its standard error, and that of
any ratio of per-document sums, is the delta-method (linearisation) estimate for a ratio over a sample of
documents: SE² = D/(D-1) · Σ_d (x_d - R·y_d)² / (Σ_d y_d)². Differences between two points are paired on the
same documents, so document-to-document variation cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def ratio(x: Sequence[float], y: Sequence[float]) -> tuple[float, float | None]:
    """``(Σx / Σy, its standard error)``; the error is None with fewer than two documents."""
    sx, sy = math.fsum(x), math.fsum(y)
    if sy == 0:
        return math.nan, None
    r = sx / sy
    d = len(x)
    if d < 2:
        return r, None
    resid = math.fsum((a - r * b) ** 2 for a, b in zip(x, y, strict=True))
    return r, math.sqrt(d / (d - 1) * resid) / abs(sy)


def nll(doc_nll: Sequence[float], doc_tokens: Sequence[int]) -> tuple[float, float | None]:
    """Mean NLL per token and its standard error."""
    return ratio(doc_nll, [float(n) for n in doc_tokens])


def paired_difference(a: Sequence[float], b: Sequence[float], doc_tokens: Sequence[int]) -> tuple[float,
                                                                                                  float | None]:
    """NLL per token of ``a`` minus that of ``b`` (same documents), and its standard error."""
    return ratio([p - q for p, q in zip(a, b, strict=True)], [float(n) for n in doc_tokens])


def share_removed(point: Sequence[float], tuned: Sequence[float], base: Sequence[float]) -> tuple[float,
                                                                                                  float | None]:
    """The paper's unit: (NLL_tuned - NLL_point) / (NLL_tuned - NLL_base), paired by document, with its error."""
    return ratio([t - p for t, p in zip(tuned, point, strict=True)], [t - b for t, b in zip(tuned, base, strict=True)])
