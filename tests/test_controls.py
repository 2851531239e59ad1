"""The causal control: which directions it scales, that it removes the same Frobenius mass as the repair, and the
statistics the sweep reports (checked against float64 SVDs and a jackknife)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama

from evals.measure import stats
from repair.cli import main
from repair.detection.detector import DetectOptions
from repair.edit.inplace import InPlacePatcher


def _patcher(base, adapter, control, per_matrix=None):
    model = tiny_llama()
    opts = DetectOptions()
    return model, InPlacePatcher(model, opts.pairs(str(base), str(adapter)), opts, per_matrix, control)


def _weights(model, patcher) -> dict[str, torch.Tensor]:
    return {e.name: model.get_parameter(e.name).detach().double().clone() for e in patcher.entries}


@pytest.mark.parametrize("kind", ["matched", "neighbour"])
def test_control_directions_are_certain_non_intruders_of_the_chosen_sigma(llama_base, llama_adapter, kind):
    """Against a float64 SVD of each W_tuned and the full base basis: every control direction has max|cos| ≥ ε,
    its σ is W_tuned's σ at that rank, and it is the free non-intruder closest in σ (matched) or in rank."""
    model, patcher = _patcher(llama_base, llama_adapter, kind)
    W0 = tiny_llama().state_dict()
    assert patcher.entries and any(e.controls for e in patcher.entries)
    for e in patcher.entries:
        U, S, _ = torch.linalg.svd(e.tuned.double())
        U0 = torch.linalg.svd(W0[e.name].double())[0]
        cos = (U.T @ U0).abs().max(1).values  # (n,) max |cos| of each tuned left vector over all base vectors
        n = 2 * DetectOptions().top_k
        non_intruders = [j for j in range(n) if cos[j] >= 0.5]
        for c in e.controls:
            assert cos[c.control] >= 0.5 and cos[c.intruder] < 0.5
            assert c.sigma_control == pytest.approx(float(S[c.control]), rel=1e-5)
        free = list(non_intruders)
        for c in e.controls:  # the choice, replayed on the oracle's spectrum
            i = c.intruder
            keys = {j: (abs(j - i), j < i) if kind == "neighbour" else (abs(float(S[j] - S[i])), j) for j in free}
            assert c.control == min(free, key=keys.__getitem__)
            free.remove(c.control)


@pytest.fixture(scope="module")
def moderate_adapter(llama_base, tmp_path_factory):
    """Intruders whose σ are comparable to the base's: the matched control can carry their Frobenius mass."""
    from conftest import make_adapter

    return make_adapter(tiny_llama, llama_base, tmp_path_factory.mktemp("moderate") / "adapter", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj"], b_scale=0.1,
                        scales={"layers.0.": 1.0, "layers.1.": 1e-3})


def _lost(model, patcher, scale, control):
    """‖W_tuned‖_F² - ‖W'‖_F² per matrix, from the weights the model holds (float64)."""
    patcher.restore()
    before = {k: float(v.norm() ** 2) for k, v in _weights(model, patcher).items()}
    patcher.apply(scale, control=control)
    after = {k: float(v.norm() ** 2) for k, v in _weights(model, patcher).items()}
    patcher.restore()
    return {k: before[k] - after[k] for k in before}


def test_matched_control_changes_the_frobenius_norm_as_the_repair_does(llama_base, moderate_adapter):
    """Every matrix loses the same ‖W‖_F² under the matched control as under the repair, for each λ."""
    model, patcher = _patcher(llama_base, moderate_adapter, "matched")
    tuned = _weights(model, patcher)
    assert patcher.entries
    for scale in (0.0, 0.25, 0.75):
        repair, control = _lost(model, patcher, scale, False), _lost(model, patcher, scale, True)
        for name, lost in repair.items():
            assert control[name] == pytest.approx(lost, rel=1e-3, abs=1e-5), (name, scale)
        assert patcher.frobenius_removed(scale, control=True) == pytest.approx(patcher.frobenius_removed(scale),
                                                                                 rel=1e-6)
    assert all(torch.equal(v, tuned[k]) for k, v in _weights(model, patcher).items())  # restored exactly


def test_matched_control_short_of_mass_removes_all_it_has(llama_base, llama_adapter):
    """Intruders far above every non-intruder (the strong fixture at λ = 0): the control zeroes every candidate
    direction it keeps, and reports the smaller mass it removed."""
    model, patcher = _patcher(llama_base, llama_adapter, "matched")
    repair, control = _lost(model, patcher, 0.0, False), _lost(model, patcher, 0.0, True)
    short = [e for e in patcher.entries if float((e.control_patch.sigma_old.double() ** 2).sum()) < repair[e.name]]
    assert short
    for e in short:
        available = float((e.control_patch.sigma_old.double() ** 2).sum())
        assert control[e.name] == pytest.approx(available, rel=1e-3) and control[e.name] < repair[e.name]
    assert patcher.frobenius_removed(0.0, control=True) < patcher.frobenius_removed(0.0)


def test_per_matrix_keeps_the_top_ranked_intruder(llama_base, llama_adapter, tmp_path):
    """--per-matrix 1: `repair patch` edits, in each matrix, only the intruder of lowest rank that detection
    reports; the plan written with --per-matrix 1 lists the same."""
    from transformers import AutoModelForCausalLM

    from repair.detection.detector import detect

    report = detect(str(llama_base), str(llama_adapter))
    expected = {m.name: [min(m.intruders)] for m in report.matrices if m.intruders}
    assert any(len(m.intruders) > 1 for m in report.matrices)  # the fixture has matrices with several
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--per-matrix", "1",
                                    "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    edits = json.loads((tmp_path / "p" / "repair_report.json").read_text())["matrices"]
    assert {e["name"]: e["intruders"] for e in edits} == expected
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(llama_adapter), "--plan-out",
                                    str(tmp_path / "plan.json"), "--per-matrix", "1"])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "plan.json").read_text())["matrices"]
    assert {k: v["intruders"] for k, v in plan.items()} == expected
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--per-matrix", "0",
                                    "--out", str(tmp_path / "q")])
    assert res.exit_code == 2 and "--per-matrix: expected a positive integer" in res.output
    # the sweep's in-place editor: the same directions, all intruders still counted as found
    model, patcher = _patcher(llama_base, llama_adapter, "none", per_matrix=1)
    assert patcher.total_intruders == report.total_intruders
    assert {e.name: e.patch.intruders for e in patcher.entries} == expected
    patcher.apply(0.0)
    written = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")).state_dict()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, written[name], rtol=1e-5, atol=1e-6), name
    # the live path edits the same directions: merged in memory, it equals the written checkpoint
    from peft import PeftModel

    import repair

    live = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_base)), str(llama_adapter))
    merged, report = repair.patch_model(live, 0.0, merge=True, per_matrix=1, cache=False)
    assert {m.name: m.intruders for m in report.matrices} == expected
    written = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")).state_dict()
    for name, value in merged.state_dict().items():
        assert torch.allclose(value, written[name], rtol=1e-5, atol=1e-6), name


def _jackknife_ratio_se(x, y):
    d = len(x)
    loo = [(sum(x) - a) / (sum(y) - b) for a, b in zip(x, y, strict=True)]
    mean = sum(loo) / d
    return math.sqrt((d - 1) / d * sum((v - mean) ** 2 for v in loo))


def test_ratio_standard_error_agrees_with_a_jackknife():
    rng = random.Random(0)
    tokens = [rng.randint(20, 64) for _ in range(400)]
    nll = [n * (2.0 + rng.gauss(0, 0.4)) for n in tokens]
    value, se = stats.nll(nll, tokens)
    assert value == pytest.approx(sum(nll) / sum(tokens))
    assert se == pytest.approx(_jackknife_ratio_se(nll, [float(n) for n in tokens]), rel=0.02)
    base = [v - n * 0.5 for v, n in zip(nll, tokens, strict=True)]
    tuned = [v + n * rng.gauss(1.0, 0.2) for v, n in zip(nll, tokens, strict=True)]
    assert stats.share_removed(tuned, tuned, base)[0] == 0.0 and stats.share_removed(base, tuned, base)[0] == 1.0
    share, se = stats.share_removed(nll, tuned, base)
    x = [t - p for t, p in zip(tuned, nll, strict=True)]
    y = [t - b for t, b in zip(tuned, base, strict=True)]
    assert share == pytest.approx(sum(x) / sum(y)) and se == pytest.approx(_jackknife_ratio_se(x, y), rel=0.02)


def test_sweep_reports_the_control_series_and_the_verdict(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--task", str(mc_task), "--limit",
                                    "4", "--forgetting", str(corpus_file), "--scales", "0,0.5", "--control",
                                    "neighbour", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "sweep.json").read_text())
    control = report["control"]
    assert control["kind"] == "neighbour" and [p["label"] for p in control["points"]] == ["control=0", "control=0.5"]
    assert control["directions"] and all(d["intruder"] != d["control"] for ds in control["directions"].values()
                                         for d in ds["pairs"])
    by_scale = {p["scale"]: p for p in report["points"]}
    tuned_nll, base_nll = report["tuned"]["forgetting_nll"], report["base"]["forgetting_nll"]
    for c in control["comparisons"]:
        p, q = by_scale[c["scale"]], next(x for x in control["points"] if x["scale"] == c["scale"])
        assert c["difference"] == pytest.approx(q["forgetting_nll"] - p["forgetting_nll"], rel=1e-9, abs=1e-12)
        assert p["forgetting_removed"] == pytest.approx((tuned_nll - p["forgetting_nll"]) / (tuned_nll - base_nll))
        assert c["beyond_two_stderr"] == (abs(c["difference"]) > 2 * c["difference_stderr"])
    assert "Against the neighbour control at λ=0:" in res.output
    assert "| control=0 | 0 |" in (out / "sweep.md").read_text()
