"""The certified path against float64 SVDs: the same intruders, and the exact max|cos| inside the bounds.

Every fixture is solved by the certified path alone. Where it returns None (undecided), the detector takes
the exact path; the tests then check that path's answer against float64 instead, so every fixture checks
something, and they check that None is rare on ordinary fixtures (counted independently of test order).
"""

from __future__ import annotations

import pytest
import torch
from test_structured import planted_lowrank, random_lowrank, reference

from repair.spectral.certified import CertifiedProblem, certified_topk_many
from repair.spectral.krylov import Lanczos, top_eigenpairs
from repair.spectral.spectra import compute_spectrum
from repair.spectral.topk import structured_topk
from repair.spectral.truncated import base_tol, compute_truncated, gram_operator, p_for

K, EPS = 10, 0.5
SHAPES = {"square": (96, 96), "tall": (160, 96), "wide": (96, 160),
          "square-big": (300, 300), "tall-big": (400, 200), "wide-big": (200, 400)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = 2e-5  # float32 work on the cast inputs, against float64 on the same cast inputs


def certify(W0, B, A, tuned=None, k=K + 1, sides=("left", "right"), decisions=((EPS, K),)):
    r = 0 if B is None else B.shape[1]
    spec = compute_truncated(W0, p_for(k, r, min(W0.shape)))
    problem = CertifiedProblem(W0, spec, None if B is None else (B, A), tuned)
    return certified_topk_many([problem], k, sides, decisions)[0]


def check(t, W0, Wt, sides=("left", "right")):
    """Same intruder sets as float64 SVDs, and the exact values inside [lo, hi] (degenerate σ excepted)."""
    S, left, right = reference(W0, Wt, K)
    assert torch.allclose(t.S[:K].double(), S, rtol=1e-5, atol=1e-6 * float(S[0]))
    ok = ~t.degenerate[:K]
    for side, exact in zip(("left", "right"), (left, right), strict=True):
        if side not in sides:
            continue
        lo, hi = (b[:K].double() for b in t.bounds(side))
        assert (lo <= hi).all()
        assert ((exact >= lo - TOL) & (exact <= hi + TOL))[ok].all(), (side, lo, hi, exact)
        clear = ok & ((exact - EPS).abs() > TOL)
        assert torch.equal((hi < EPS)[clear], (exact < EPS)[clear]), side


FIXTURES = [(kind, shape, dtype, r) for kind in ("planted", "random") for shape in sorted(SHAPES)
            for dtype in sorted(DTYPES) for r in (1, 4, 16, 64)]


def fixture(kind: str, shape: str, dtype: str, r: int):
    m, n = SHAPES[shape]
    W0, B, A = (planted_lowrank if kind == "planted" else random_lowrank)(m, n, r, seed=r)
    return tuple(x.to(DTYPES[dtype]) for x in (W0, B, A))


DECIDED: dict[tuple, bool] = {}  # fixture -> whether the certified path decided it


def decided(key: tuple) -> bool:
    """Whether the certified path decides this fixture (computed once a run, in whatever order tests run)."""
    if key not in DECIDED:
        DECIDED[key] = certify(*fixture(*key)) is not None
    return DECIDED[key]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("kind", ["planted", "random"])
def test_certified_matches_float64_svd(kind, shape, dtype):
    for r in (1, 4, 16, 64):
        W0, B, A = fixture(kind, shape, dtype, r)
        t = certify(W0, B, A)
        DECIDED[(kind, shape, dtype, r)] = t is not None
        if t is None:  # undecided: what the detector answers instead is the exact path, held to the same oracle
            t = structured_topk(W0, B, A, compute_spectrum(W0), K + 1)
        check(t, W0, W0.double() + B.double() @ A.double())


def test_most_fixtures_are_certified():
    """The planted intruders spread over 16 low-ranked base directions challenge float32 resolution; a few
    of those fall back to the exact path. Ordinary random updates are all certified."""
    outcome = {key: decided(key) for key in FIXTURES}
    assert len(outcome) == 144
    assert all(ok for key, ok in outcome.items() if key[0] == "random")
    assert sum(outcome.values()) >= 130


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_certified_full_checkpoint(shape):
    """No factors: block Krylov on W itself (a full fine-tune: dense small change plus one planted direction)."""
    m, n = SHAPES[shape]
    W0, B, A = planted_lowrank(m, n, 2, seed=3)
    gen = torch.Generator().manual_seed(5)
    Wt = W0 + B @ A + 1e-3 * torch.randn(m, n, generator=gen, dtype=W0.dtype)
    t = certify(W0.float(), None, None, tuned=Wt.float())
    assert t is not None
    check(t, W0.float(), Wt.float().double())


def test_float64_inputs_are_certified_in_float64():
    W0, B, A = planted_lowrank(300, 300, 4, seed=1)
    t = certify(W0, B, A)
    assert t is not None and t.S.dtype == torch.float64
    check(t, W0, W0 + B @ A)


def clustered(eps_offset: float, seed: int = 0):
    """A base whose top 8 singular values agree to 1e-6, and a rank-1 update whose top singular vector
    has max|cos| = 0.5 + eps_offset (float64), reached through one base vector inside the cluster:
    the mixing weight is found by bisection on float64 SVDs."""
    gen = torch.Generator().manual_seed(seed)
    d = 128
    U0 = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    sigma = torch.cat([5 + 1e-6 * torch.arange(8.0, dtype=torch.float64).flip(0),
                       3 * 0.98 ** torch.arange(d - 8.0, dtype=torch.float64)])
    W0 = (U0 * sigma) @ V0.T
    spread, v = U0[:, 40:].sum(1), V0[:, 60:].sum(1)

    def update(c: float):
        u = c * U0[:, 3] + (1 - c**2) ** 0.5 * spread / spread.norm()
        return (8 * u)[:, None], (v / v.norm())[None, :]

    def top_cos(c: float) -> float:
        B, A = update(c)
        return float(reference(W0, W0 + B @ A, 1)[1][0])

    lo, hi = 0.0, 0.95
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top_cos(mid) < 0.5 + eps_offset else (lo, mid)
    return (W0, *update((lo + hi) / 2))


def save_pair(folder, W0, B, A):
    """A one-matrix base checkpoint and a PEFT LoRA adapter (scaling 1) that adds B @ A to it."""
    import json

    from safetensors.torch import save_file

    base, adapter = folder / "base", folder / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": W0.float().contiguous()}, str(base / "model.safetensors"))
    module = "base_model.model.model.layers.0.mlp.down_proj"
    save_file({f"{module}.lora_A.weight": A.float().contiguous(), f"{module}.lora_B.weight": B.float().contiguous()},
              str(adapter / "adapter_model.safetensors"))
    r = B.shape[1]
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["down_proj"], "task_type": "CAUSAL_LM"}))
    return str(base), str(adapter)


@pytest.mark.parametrize("offset", [-2e-3, -5e-4, 5e-4, 2e-3])
def test_clustered_base_and_intruder_near_epsilon(offset, tmp_path, monkeypatch):
    """A correct certificate, or a recorded fallback to the exact path: never a wrong answer."""
    from repair.detection.detector import DetectOptions, detect

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    W0, B, A = clustered(offset)
    t = certify(W0.float(), B.float(), A.float(), sides=("left",))
    _, left, _ = reference(W0.float(), W0.float().double() + (B @ A).float().double(), K)
    if t is not None:
        lo, hi = (b[:K].double() for b in t.bounds("left"))
        assert ((left >= lo - TOL) & (left <= hi + TOL)).all()
        assert torch.equal(hi < EPS, left < EPS)
    report = detect(*save_pair(tmp_path, W0, B, A), DetectOptions(method="certified"))
    [m] = report.matrices
    assert m.fallback == (t is None) and report.fallbacks == int(t is None)
    assert m.intruders == torch.nonzero(left < EPS).flatten().tolist()
    assert abs(left[0].item() - 0.5 - offset) < 1e-4  # the planted vector really is this close to ε


def test_figure_counts_at_every_epsilon_are_exact(tmp_path, monkeypatch):
    """Figures ask for decisions at every ε: the counts equal float64's, certified or by fallback."""
    from repair.detection.detector import DetectOptions
    from repair.figures.curves import EPSILONS, collect

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    W0, B, A = random_lowrank(200, 400, 8, seed=2)
    W0, B, A = W0.float(), B.float(), A.float()
    _, left, _ = reference(W0, W0.double() + B.double() @ A.double(), 30)
    [stats] = collect(*save_pair(tmp_path, W0, B, A), K, 30, DetectOptions(method="certified"))
    for e in EPSILONS:
        assert int((stats.max_cos[:K] < e).sum()) == int((left[:K] < e).sum()), e
    assert int((stats.max_cos < EPS).sum()) == int((left < EPS).sum())


def test_truncated_spectrum_against_float64_svd():
    W0, _, _ = planted_lowrank(160, 300, 1, seed=4)
    spec = compute_truncated(W0.float(), 40)
    U, S, _ = torch.linalg.svd(W0, full_matrices=False)
    p = spec.p
    assert p >= 32 and spec.side == "left" and spec.requested == 40
    assert torch.allclose(spec.S, S[:p], rtol=1e-5)
    assert torch.allclose((spec.Z.double().T @ U[:, :p]).diagonal().abs(), torch.ones(p, dtype=torch.float64),
                          atol=1e-4)
    assert spec.residual <= base_tol(300) * float(S[0]) ** 2
    assert (spec.Z.abs().argmax(0) == spec.Z.argmax(0)).all()  # sign rule: the largest entry is positive
    tall = compute_truncated(W0.float().T, 40)
    assert tall.side == "right" and torch.allclose(tall.S, spec.S, rtol=1e-5)


@pytest.mark.parametrize("shape", [(160, 300), (300, 160)])
def test_coarse_bfloat16_start_changes_nothing_it_certifies(shape, monkeypatch):
    """Forced onto a small matrix, the bfloat16 coarse start runs, and the kept pairs still meet the float32
    tolerance: values as a float64 SVD's, each vector within its recorded error of the true one."""
    from repair.spectral import truncated

    calls = []
    coarse = truncated._coarse_gram
    monkeypatch.setattr(truncated, "COARSE_MIN", 0)
    monkeypatch.setattr(truncated, "_coarse_gram", lambda *a: calls.append(a[0].dtype) or coarse(*a))
    W0, _, _ = planted_lowrank(*shape, 1, seed=4)
    spec = compute_truncated(W0.float(), 40)
    assert calls and calls[0] == torch.bfloat16
    U, S, Vh = torch.linalg.svd(W0.float().double(), full_matrices=False)
    truth = U if shape[0] <= shape[1] else Vh.T  # the smaller side's vectors
    p = spec.p
    assert p == 40 and torch.allclose(spec.S, S[:p], rtol=1e-5)
    Z, u = spec.Z.double(), truth[:, :p]
    away = (Z - u * (u * Z).sum(0)).norm(dim=0)  # the part of z_i off u_i (sin of the angle: no cancellation)
    assert (away <= spec.errors + 1e-6).all()  # each vector within its recorded error
    assert spec.residual <= base_tol(max(shape)) * float(S[0]) ** 2


def test_coarse_start_keeps_certified_answers(monkeypatch):
    """The whole certified path with the coarse start forced on: same intruders and bounds as float64 SVDs."""
    from repair.spectral import truncated

    monkeypatch.setattr(truncated, "COARSE_MIN", 0)
    for r in (1, 16):
        W0, B, A = planted_lowrank(200, 400, r, seed=r)
        W0, B, A = W0.float(), B.float(), A.float()
        t = certify(W0, B, A)
        assert t is not None
        check(t, W0, W0.double() + B.double() @ A.double())


def test_lanczos_quadrature_matches_moments_and_bounds_point_masses():
    """Gauss quadrature reproduces the first 2s moments of the measure, and the pair sums bound every mass."""
    gen = torch.Generator().manual_seed(0)
    d, s = 300, 12
    lam = torch.rand(d, generator=gen, dtype=torch.float64) * 4
    x = torch.randn(d, generator=gen, dtype=torch.float64) * (1 + 5 * (torch.arange(d) == 7))
    q = Lanczos(lambda X: lam[None, :, None] * X, x[None, :, None]).extend(s).quadrature()
    nodes, weights = q.nodes[0, 0], q.weights[0, 0]
    for j in range(2 * s):
        assert torch.allclose((weights * nodes**j).sum(), (x**2 * lam**j).sum(), rtol=1e-8)
    from repair.spectral.christoffel import pair_sums

    assert float(pair_sums(q).amax()) >= float((x**2).max())


def test_block_krylov_top_eigenpairs():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(200, 200, generator=gen, dtype=torch.float64)
    M = M @ M.T
    res = top_eigenpairs(lambda X: M @ X, torch.randn(1, 200, 5, generator=gen, dtype=torch.float64), 6, 1e-10,
                         max_dim=80, max_products=4000)
    evals = torch.linalg.eigvalsh(M).flip(0)
    assert res.converged and torch.allclose(res.theta[0, :6], evals[:6], rtol=1e-9)
    assert (res.residual[0, :6] <= 1e-10 * evals[0]).all()



def test_block_krylov_stops_where_rounding_stalls_it():
    """float32 cannot reach a 1e-10 residual: without ``accept`` the solver spends its whole budget; with it,
    it stops once the residuals stop falling, within ``accept``, and its pairs are those of float64's."""
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(300, 300, generator=gen, dtype=torch.float64) * (1 + torch.arange(300) / 10) ** -0.5
    M = G @ G.T
    M32 = M.float()
    start = torch.randn(1, 300, 6, generator=gen)
    solve = dict(max_dim=120, max_products=3000, expand_all=False)
    budget = top_eigenpairs(lambda X: M32 @ X, start, 6, 1e-10, **solve)
    stalled = top_eigenpairs(lambda X: M32 @ X, start, 6, 1e-10, accept=1e-5, **solve)
    assert not budget.converged and budget.products >= 3000
    assert not stalled.converged and stalled.products < 300
    evals, evecs = torch.linalg.eigh(M)
    evals, evecs = evals.flip(0)[:6], evecs.flip(1)[:, :6]
    assert (stalled.residual[0, :6] <= 1e-5 * evals[0]).all()
    assert torch.allclose(stalled.theta[0, :6], evals, rtol=1e-5)
    cos = (evecs.T @ stalled.Y[0, :, :6].double()).diagonal().abs()
    assert (cos > 1 - 1e-6).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cols", [1, 2, 3])
def test_gram_operator_against_float64(side, cols):
    """Every block width (two columns run as two matrix-vector products) gives W Wᵀ X or Wᵀ W X."""
    gen = torch.Generator().manual_seed(cols)
    W = torch.randn(1, 60, 90, generator=gen)
    d = 60 if side == "left" else 90
    X = torch.randn(1, d, cols, generator=gen)
    W64, X64 = W.double(), X.double()
    want = W64 @ (W64.mT @ X64) if side == "left" else W64.mT @ (W64 @ X64)
    assert torch.allclose(gram_operator(W, side)(X).double(), want, rtol=1e-5, atol=1e-4)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_certified_on_cuda_matches_cpu_and_float64(tmp_path, monkeypatch):
    """The certified path in float32 on CUDA: the same answers as on the CPU, checked against float64."""
    from repair.detection.detector import DetectOptions, detect

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    W0, B, A = (x.float() for x in random_lowrank(400, 200, 8, seed=1))
    spec = compute_truncated(W0.cuda(), p_for(K + 1, 8, 200), device="cuda")
    t = certified_topk_many([CertifiedProblem(W0.cuda(), spec, (B.cuda(), A.cuda()))], K + 1, ("left", "right"),
                            ((EPS, K),))[0]
    assert t is not None and t.S.is_cuda
    check(t.cpu(), W0, W0.double() + B.double() @ A.double())
    base, adapter = save_pair(tmp_path, W0, B, A)
    on_gpu = detect(base, adapter, DetectOptions(method="certified", device="cuda"))
    on_cpu = detect(base, adapter, DetectOptions(method="certified", device="cpu", cache=False))
    assert [m.intruders for m in on_gpu.matrices] == [m.intruders for m in on_cpu.matrices]
