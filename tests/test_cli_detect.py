"""`repair detect` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from repair.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


def test_detect_table_json_and_gate(runner, llama_base, llama_adapter, tmp_path):
    out = tmp_path / "report.json"
    res = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "q_proj" in res.output and "Worst matrices" in res.output
    report = json.loads(out.read_text())
    for key in ("schema_version", "base", "tuned", "top_k", "epsilon", "total_intruders", "matrices"):
        assert key in report
    assert report["top_k"] == 10 and report["epsilon"] == 0.5
    names = [m["name"] for m in report["matrices"]]
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == 6
    m = report["matrices"][0]
    assert len(m["max_cos"]) == 10 and len(m["sigma"]) == 10 and m["effective_rank_delta"] > 0
    total = report["total_intruders"]
    assert total == sum(len(m["intruders"]) for m in report["matrices"]) > 0
    # layer 0 got strong updates, layer 1 weak ones
    assert all(not m["intruders"] for m in report["matrices"] if ".layers.1." in m["name"])

    gated = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--fail-above", str(total - 1)])
    assert gated.exit_code == 1
    assert runner.invoke(main, ["detect", str(llama_base), str(llama_adapter),
                                "--fail-above", str(total)]).exit_code == 0


def oracle(base, adapter, top_k: int) -> dict[str, tuple]:
    """Per adapted matrix, from peft's merge and float64 SVDs: σ, max|cos| on the left and on the right."""
    from conftest import merged_state, tiny_llama
    from safetensors.torch import load_file

    W0s, merged = load_file(base / "model.safetensors"), merged_state(tiny_llama, adapter)
    out = {}
    for name, W0 in W0s.items():
        if W0.ndim != 2 or torch.equal(W0, merged[name]) or "embed" in name:
            continue
        U, S, Vh = torch.linalg.svd(merged[name].double(), full_matrices=False)
        U0, _, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
        out[name] = (S[:top_k], (U[:, :top_k].T @ U0).abs().amax(1), (Vh[:top_k] @ V0h.T).abs().amax(1))
    return out


def test_detect_options_change_the_answer(runner, llama_base, llama_adapter, tmp_path):
    """--modules, --top-k, --side and --epsilon against float64 SVDs of peft's merge: the matrices, σ and both
    sides' max|cos| are the oracle's, and the intruders are exactly the oracle's at each ε."""
    truth = {n: v for n, v in oracle(llama_base, llama_adapter, 3).items() if "q_proj" in n}
    assert len(truth) == 2
    for eps, side in ((0.5, "both"), (0.9, "left"), (0.2, "right")):
        out = tmp_path / f"r{eps}.json"
        res = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--modules", r"q_proj",
                                   "--top-k", "3", "--side", side, "--epsilon", str(eps), "--json", str(out)])
        assert res.exit_code == 0, res.output
        report = json.loads(out.read_text())
        assert report["side"] == side and {m["name"] for m in report["matrices"]} == set(truth)
        for m in report["matrices"]:
            S, left, right = truth[m["name"]]
            exact = {"left": left, "right": right, "both": torch.maximum(left, right)}[side]  # the decisive value
            lo, hi = torch.tensor(m["max_cos"]).double(), torch.tensor(m["max_cos_upper"]).double()
            assert m["sigma"] == pytest.approx(S.tolist(), rel=1e-5)
            assert ((lo <= exact + 1e-5) & (exact <= hi + 1e-5)).all(), (m["name"], lo, exact, hi)
            for got, want in ((m["max_cos_left"], left), (m["max_cos_right"], right)):
                assert got is None or (torch.tensor(got).double() <= want + 1e-5).all()
            assert (m["max_cos_left"] is None) == (side == "right")
            assert (m["max_cos_right"] is None) == (side == "left")
            assert (exact - eps).abs().min() > 1e-3  # so the oracle's answer is not a rounding question
            assert m["intruders"] == torch.nonzero(exact < eps).flatten().tolist(), (eps, side, m["name"])


def test_detect_full_checkpoint_against_itself(runner, llama_base, tmp_path):
    """A model against itself: every max|cos| is 1 (float64 says so trivially), so there are no intruders."""
    out = tmp_path / "self.json"
    res = runner.invoke(main, ["detect", str(llama_base), str(llama_base), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "total" in res.output and "Worst matrices" not in res.output
    report = json.loads(out.read_text())
    assert report["matrices"] and report["total_intruders"] == 0
    assert all(not m["intruders"] and min(m["max_cos"]) > 1 - 1e-5 for m in report["matrices"])


@pytest.mark.parametrize("args, message", [
    (["detect", "/no/such/base", "/no/such/tuned"], "no such file or folder"),
    (["detect", "BASE", "ADAPTER", "--epsilon", "1.5"], "--epsilon"),
    (["detect", "BASE", "ADAPTER", "--top-k", "0"], "--top-k"),
    (["detect", "BASE", "ADAPTER", "--modules", "nothing_matches_this"], "matched no weight matrix"),
    (["detect", "BASE", "ADAPTER", "--modules", "(unclosed"], "not a valid regular expression"),
    (["detect", "ADAPTER", "BASE"], "BASE is a LoRA adapter"),
])
def test_detect_bad_input_exits_2(runner, llama_base, llama_adapter, args, message):
    args = [str(llama_base) if a == "BASE" else str(llama_adapter) if a == "ADAPTER" else a for a in args]
    res = runner.invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
