"""Parity with peft's reduce_intruder_dimension on a tiny Llama: the same intruders per layer."""

from __future__ import annotations

import re

import torch
from conftest import tiny_llama

from repair.detector import DetectOptions, analyse_pair
from repair.pairs import PairSource
from repair.sources import resolve


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
    for pair in pairs:
        report, found = analyse_pair(pair, opts)
        assert (found.max_cos - eps).abs().min() > 1e-3, "too close to the threshold for a stable comparison"
        assert len(report.intruders) == counts[pair.name], pair.name
        total += len(report.intruders)
        if not report.intruders:
            continue
        # The same set: rebuild peft's mitigated update (rank-r truncation) from our intruders.
        t, idx = found.tuned_svd, report.intruders
        W_mit = pair.tuned + (lam - 1) * (t.U[:, idx] * t.S[idx]) @ t.Vh[idx]
        U, S, Vh = torch.linalg.svd(W_mit - pair.base.float(), full_matrices=False)
        r = pair.factors[0].shape[1]
        ours = (U[:, :r] * S[:r]) @ Vh[:r]
        ref = peft_deltas[pair.name]
        assert (ours - ref).norm() / ref.norm() < 1e-4, pair.name
    assert total > 0 and any(c == 0 for c in counts.values())  # both cases are exercised
