"""`repair detect` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
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


def test_detect_options_change_the_answer(runner, llama_base, llama_adapter, tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--modules", r"q_proj",
                               "--top-k", "3", "--side", "both", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["side"] == "both" and {m["module_type"] for m in report["matrices"]} == {"q_proj"}
    assert all(len(m["max_cos"]) == 3 and m["max_cos_right"] is not None for m in report["matrices"])


def test_detect_full_checkpoint_against_itself(runner, llama_base):
    res = runner.invoke(main, ["detect", str(llama_base), str(llama_base)])
    assert res.exit_code == 0, res.output
    assert "total" in res.output and "Worst matrices" not in res.output


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
