"""Parity with peft's reduce_intruder_dimension on a tiny Llama: the same intruders per layer."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_llama

from repair.adapters.pairs import PairSource
from repair.detection.detector import DetectOptions, analyse
from repair.io.sources import resolve

# the oracle: peft's own function, first shipped in peft 0.19 (the runtime floor is lower; see pyproject.toml)
pytest.importorskip("peft.tuners.lora.intruders", reason="peft's reduce_intruder_dimension needs peft >= 0.19")


def peft_intruder_counts(adapter_path, top_k, epsilon, lam):
    """Run peft's function; return its per-layer counts and its mitigated delta weights."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_path))
    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=epsilon, mitigation_lambda=lam,
                              logging_sink=lines.append)
    counts = {}
    for line in lines:
        if m := re.match(r"base_model\.model\.(.+): (?:No intruders|Intruders: (\d+))$", line):
            counts[m[1] + ".weight"] = int(m[2] or 0)
    deltas = {name.removeprefix("base_model.model.") + ".weight": layer.get_delta_weight("intruder_reduced")
              for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    return counts, deltas


def test_intruder_sets_equal_peft(llama_base, llama_adapter):
    top_k, eps, lam = 10, 0.5, 0.0
    counts, peft_deltas = peft_intruder_counts(llama_adapter, top_k, eps, lam)
    pairs = PairSource(resolve(str(llama_base)), resolve(str(llama_adapter)))
    opts = DetectOptions(top_k=top_k, epsilon=eps)
    assert set(counts) == set(pairs.names)
    total = 0
    for pair, report, found in analyse(pairs, opts, precise=True):  # as `repair patch` runs it
        assert (found.max_cos - eps).abs().min() > 1e-3, "too close to the threshold for a stable comparison"
        assert len(report.intruders) == counts[pair.name], pair.name
        total += len(report.intruders)
        if not report.intruders:
            continue
        # The same set: rebuild peft's mitigated update (rank-r truncation) from our intruders.
        t, idx = found.tuned, report.intruders
        W_mit = pair.tuned + (lam - 1) * (t.U[:, idx] * t.S[idx]) @ t.Vh[idx]
        U, S, Vh = torch.linalg.svd(W_mit - pair.base.float(), full_matrices=False)
        r = pair.factors[0].shape[1]
        ours = (U[:, :r] * S[:r]) @ Vh[:r]
        ref = peft_deltas[pair.name]
        assert (ours - ref).norm() / ref.norm() < 1e-4, pair.name
    assert total > 0 and any(c == 0 for c in counts.values())  # both cases are exercised


def peft_patched_state(model_fn, adapter_path, top_k, epsilon, lam):
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model = PeftModel.from_pretrained(model_fn(), str(adapter_path))
    reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=epsilon, mitigation_lambda=lam,
                              logging_sink=None)
    return model.merge_and_unload().state_dict()


def planted_llama():
    """Tiny Llama whose q_proj weights have 16 tiny (but distinct) trailing singular values."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.model.layers:
            U0, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
            V0, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
            sigma = torch.cat([0.9 ** torch.arange(48.0), 1e-3 * 0.9 ** torch.arange(16.0)])
            layer.self_attn.q_proj.weight.copy_(U0 @ torch.diag(sigma) @ V0.T)
            layer.self_attn.q_proj._planted = (U0[:, 48:].sum(1) / 4, V0[:, 48:].sum(1) / 4)
    return model


def test_adapter_output_equals_peft_where_truncation_is_lossless(tmp_path):
    """ΔW lies in the base's near-null block, so peft's rank-r truncation loses (almost) nothing."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    planted_llama().save_pretrained(str(base))
    model = get_peft_model(planted_llama(), LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for layer in model.base_model.model.model.layers:
            q = layer.self_attn.q_proj
            u, v = q.base_layer._planted
            q.lora_B["default"].weight.copy_(u[:, None] * 2.0)  # scaling 2: ΔW = 4 u vᵀ
            q.lora_A["default"].weight.copy_(v[None, :] * 0.5)  # 2 * (2 u)(0.5 v)ᵀ = 2 u vᵀ
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))

    from peft import PeftModel

    from repair.edit.patcher import PatchOptions, patch

    report = patch(str(base), str(adapter), PatchOptions(out=tmp_path / "ours", scale=0.5, format="adapter"))
    assert report.patched_matrices == 2 and all(m.intruders == [0] for m in report.matrices)
    assert all(m.peft_truncation_error < 1e-4 for m in report.matrices)
    ours = PeftModel.from_pretrained(planted_llama(), str(tmp_path / "ours")).merge_and_unload().state_dict()
    theirs = peft_patched_state(planted_llama, adapter, 10, 0.5, 0.5)
    for m in report.matrices:
        assert (ours[m.name] - theirs[m.name]).norm() / theirs[m.name].norm() < 1e-5, m.name


def test_report_measures_peft_truncation_gap(llama_base, llama_adapter, tmp_path):
    """Where peft's truncation is lossy, the report's figure equals the error peft really makes."""
    from repair.edit.patcher import PatchOptions, patch

    lam = 0.5
    report = patch(str(llama_base), str(llama_adapter), PatchOptions(out=tmp_path / "o", scale=lam, format="adapter"))
    theirs = peft_patched_state(tiny_llama, llama_adapter, 10, 0.5, lam)
    pairs = PairSource(resolve(str(llama_base)), resolve(str(llama_adapter)))
    lossy = 0
    for m in report.matrices:
        pair = pairs.pair(m.name)
        found = tuned_svd_of(pair)
        W_new = pair.tuned + (lam - 1) * (found.U[:, m.intruders] * found.S[m.intruders]) @ found.Vh[m.intruders]
        measured = float((theirs[m.name] - W_new).norm() / (W_new - pair.base).norm())
        assert m.peft_truncation_error == pytest.approx(measured, abs=1e-4), m.name
        lossy += m.peft_truncation_error > 0.01
    assert lossy > 0


def tuned_svd_of(pair):
    from repair.spectral.linalg import svd

    return svd(pair.tuned)
