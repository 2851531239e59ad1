"""Time against matrix size with a warm spectra cache: the structured top-k against a full SVD.

Synthetic square layers of width 1024 to 8192 with a rank-8 LoRA update. The base W0 = Z diag(σ) V0ᵀ is
built from Kronecker products of small orthogonal matrices, so its spectrum is known and goes straight
into the cache (decomposing an 8192-wide matrix would take minutes). Per width it times, over repeats:
  ours   read the cached spectrum + structured top-k triplets + cosines (what a warm `repair detect` does)
  full   torch.linalg.svd of W_tuned, the per-matrix cost of peft's function (twice per layer there)
and prints median (min, max) seconds, the ratio, and each time divided by m·n·k and by m·n·min(m, n).

    python bench/bench_scaling.py [--widths 1024,2048,4096,8192] [--full-max 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, summary

sys.path.insert(0, str(ROOT))
from repair.spectral.spectra import BaseSpectrum  # noqa: E402
from repair.spectral.store import SpectraCache  # noqa: E402
from repair.spectral.topk import structured_topk  # noqa: E402

K, R = 10, 8


def kron_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    a = 2 ** (n.bit_length() // 2)
    q1 = torch.linalg.qr(torch.randn(a, a, generator=gen))[0]
    q2 = torch.linalg.qr(torch.randn(n // a, n // a, generator=gen))[0]
    return torch.kron(q1, q2)  # (n, n) orthogonal


def layer(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    Z, V0 = kron_orthogonal(n, gen), kron_orthogonal(n, gen)
    S = 10 * (1 + torch.arange(n, dtype=torch.float64)) ** -0.5  # a slowly decaying, trained-like spectrum
    W0 = (Z * S.float()) @ V0.T
    B = torch.randn(n, R, generator=gen) * 0.5
    A = torch.randn(R, n, generator=gen) / n**0.5
    return W0, B, A, BaseSpectrum(S, Z, "left", (n, n))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="1024,2048,4096,8192")
    ap.add_argument("--full-max", type=int, default=4096, help="Largest width given a full SVD (8192: minutes).")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = SpectraCache(Path(tmp))
        for n in (int(w) for w in args.widths.split(",")):
            W0, B, A, spec = layer(n)
            cache.put(f"w{n}", spec)

            def ours(n=n, W0=W0, B=B, A=A):
                t = structured_topk(W0, B, A, cache.get(f"w{n}"), K + 1)
                return t.cos_left.amax(1)

            t_ours = timed(ours, args.repeats)
            W = W0 + B @ A
            t_full = timed(lambda W=W: torch.linalg.svd(W, full_matrices=False), 1 if n >= 4096 else args.repeats) \
                if n <= args.full_max else None
            rows.append((n, t_ours, t_full))
            print(f"width {n}: ours {summary(t_ours)} s" + (f", full SVD {summary(t_full)} s" if t_full else ""),
                  file=sys.stderr, flush=True)
            cache.path(f"w{n}").unlink()
    print(f"\nWarm-cache time per {R}-rank layer, top-{K} (median, min, max over repeats; threads: "
          f"{torch.get_num_threads()})")
    print(f"{'width':>6} {'ours s':>28} {'full SVD s':>28} {'speed-up':>9} {'ours/(mnk) ns':>14} {'full/(mn·n) ns':>15}")
    for n, t_ours, t_full in rows:
        o = statistics.median(t_ours)
        f = statistics.median(t_full) if t_full else None
        print(f"{n:>6} {summary(t_ours):>28} {summary(t_full) if t_full else 'not run':>28} "
              f"{(f'{f / o:.0f}x' if f else '-'):>9} {o / (n * n * K) * 1e9:>14.3f} "
              f"{(f'{f / n**3 * 1e9:.3f}' if f else '-'):>15}")


if __name__ == "__main__":
    main()
