"""The CUDA paths against the CPU and float64: certified solves, the commands, and sweeps on a model
spread over the GPU and the CPU. Marked ``gpu``: skipped where no CUDA device is present (CI has none)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_certified import DTYPES, EPS, SHAPES, K, check
from test_structured import planted_lowrank, random_lowrank

from repair.cli import main
from repair.spectral.certified import CertifiedProblem, certified_topk_many
from repair.spectral.truncated import compute_truncated, p_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("kind", ["planted", "random"])
def test_certified_on_cuda_matches_float64_svd(kind, shape, dtype):
    """Base top-p, tuned top-k and the bounds in float32 on the GPU: float64 SVDs' intruders, inside the bounds."""
    m, n = SHAPES[shape]
    decided = 0
    for r in (1, 4, 16, 64):
        W0, B, A = (planted_lowrank if kind == "planted" else random_lowrank)(m, n, r, seed=r)
        W0, B, A = (x.to(DTYPES[dtype]) for x in (W0, B, A))
        spec = compute_truncated(W0.cuda(), p_for(K + 1, r, min(m, n)), device="cuda")  # kept on the CPU
        problem = CertifiedProblem(W0.cuda(), spec, (B.cuda(), A.cuda()))
        t = certified_topk_many([problem], K + 1, ("left", "right"), ((EPS, K),))[0]
        if t is not None:
            decided += 1
            check(t.cpu(), W0, W0.double() + B.double() @ A.double())
    assert decided >= (4 if kind == "random" else 2)


def _detect(base, adapter, out, *extra):
    res = CliRunner().invoke(main, ["detect", str(base), str(adapter), "--json", str(out), *extra])
    assert res.exit_code == 0, res.output
    return {m["name"]: m for m in json.loads(out.read_text())["matrices"]}


@pytest.mark.parametrize("method", ["certified", "exact"])
def test_detect_and_patch_on_cuda_equal_the_cpu(llama_base, llama_adapter, tmp_path, monkeypatch, method):
    """`repair detect` and `repair patch --format merged` with --device cuda give the CPU's answers."""
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    flags = ["--exact"] if method == "exact" else []
    gpu = _detect(llama_base, llama_adapter, tmp_path / "gpu.json", "--device", "cuda", *flags)
    cpu = _detect(llama_base, llama_adapter, tmp_path / "cpu.json", "--device", "cpu", "--no-cache", *flags)
    assert set(gpu) == set(cpu) and sum(len(m["intruders"]) for m in gpu.values()) > 0
    for name, m in gpu.items():
        assert m["intruders"] == cpu[name]["intruders"], name
        assert m["max_cos"] == pytest.approx(cpu[name]["max_cos"], abs=1e-4), name
    written = {}
    for dev in ("cuda", "cpu"):
        res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0.25", "--format",
                                        "merged", "--device", dev, "--out", str(tmp_path / dev), *flags])
        assert res.exit_code == 0, res.output
        written[dev] = load_file(str(tmp_path / dev / "model.safetensors"))
    assert set(written["cuda"]) == set(written["cpu"])
    for key, t in written["cuda"].items():
        assert torch.allclose(t.float(), written["cpu"][key].float(), rtol=1e-5, atol=1e-6), key


def _split_over_cuda_and_cpu(self, folder):
    """Embeddings and layer 0 on the GPU, the rest on the CPU: a model that accelerate has spread."""
    from evals.measure.models import DTYPES as DT

    layout = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
              "model.norm": "cpu", "lm_head": "cpu"}
    return {"dtype": DT[self.dtype], "device_map": layout}


def test_sweep_on_cuda_and_on_a_split_model_equal_the_cpu(llama_base, llama_adapter, mc_task, corpus_file, tmp_path,
                                                          monkeypatch):
    """In-place λ edits and the measurements on one GPU, and on a model spread over the GPU and the CPU."""
    from evals.measure.models import Placement

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    points = {}
    for label, dev in (("cpu", "cpu"), ("cuda", "cuda"), ("split", "cuda")):
        if label == "split":
            monkeypatch.setattr(Placement, "kwargs", _split_over_cuda_and_cpu)
        out = tmp_path / label
        res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--scales", "0,0.5", "--task",
                                        str(mc_task), "--forgetting", str(corpus_file), "--out", str(out),
                                        "--device", dev, "--dtype", "float32"])
        assert res.exit_code == 0, (label, res.output)
        report = json.loads((out / "sweep.json").read_text())
        points[label] = [report["base"], report["tuned"], *report["points"]]
    for label in ("cuda", "split"):
        for want, got in zip(points["cpu"], points[label], strict=True):
            assert got["scale"] == want["scale"] and got["intruders"] == want["intruders"], label
            assert got["accuracy"] == want["accuracy"], label
            assert got["forgetting_nll"] == pytest.approx(want["forgetting_nll"], rel=1e-4), label


def test_fit_on_cuda_equals_the_cpu(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    """`repair fit --device cuda`: the λ path, the measured points and the written checkpoint are the CPU's, to
    float32 noise (the hooks, λ and the directions all on the GPU, the checkpoint written from the CPU)."""
    from test_fit import _calibration_file, _fit_args

    calib = _calibration_file(tmp_path / "calib.jsonl")
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        args = _fit_args(llama_base, llama_adapter, mc_task, corpus_file, calib, out, "--device", device)
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        reports[device] = (json.loads((out / "fit.json").read_text()), load_file(out / "fitted" / "model.safetensors"))
    (cpu, w_cpu), (gpu, w_gpu) = reports["cpu"], reports["cuda"]
    for a, b in zip(cpu["fronts"], gpu["fronts"], strict=True):
        assert a["point"]["forgetting_nll"] == pytest.approx(b["point"]["forgetting_nll"], rel=1e-4)
        if a["scales"] is not None:
            assert max(abs(x - y) for x, y in zip(a["scales"], b["scales"], strict=True)) < 1e-3
    for name, t in w_cpu.items():
        assert torch.allclose(t, w_gpu[name], atol=1e-4), name
