"""The sweep's rough edges: no λ within the budget is a result (exit 1, every point written), --write-picked as an
adapter, `detect --json -`, and lm-eval's spellings of its flags."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from repair.cli import main


def test_no_scale_within_the_budget_is_a_result_not_an_error(llama_base, llama_adapter, mc_task, corpus_file,
                                                              tmp_path, monkeypatch):
    import evals.runners.sweeper
    from evals.measure.results import Score

    def scores(self, label, scale):  # accuracy 1 for the tuned model, 0.5 for every edit
        return {"tiny_add": Score(metric="acc", value=1.0 if scale in (None, 1.0) else 0.5, stderr=0.1)}

    monkeypatch.setattr(evals.runners.sweeper.Evaluator, "_scores", scores)
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--task", str(mc_task),
                                    "--limit", "4", "--forgetting", str(corpus_file), "--scales", "0,0.5",
                                    "--control", "none", "--pick", "max-acc-drop=0.1", "--write-picked",
                                    "--out", str(out)])
    assert res.exit_code == 1, res.output
    report = json.loads((out / "sweep.json").read_text())
    assert report["pick"]["scale"] is None and "0.1" in report["pick"]["reason"]
    assert [p["accuracy"] for p in report["points"]] == [0.5, 0.5]
    assert not (out / "picked").exists() and "No λ picked" in res.output


def test_write_picked_as_an_adapter_is_the_measured_model(llama_base, llama_adapter, mc_task, corpus_file,
                                                          tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--task", str(mc_task),
                                    "--limit", "4", "--forgetting", str(corpus_file), "--scales", "0",
                                    "--control", "none", "--pick", "max-acc-drop=1", "--write-picked",
                                    "--format", "adapter", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "sweep.json").read_text())
    assert (out / "picked" / "adapter_config.json").is_file()
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_base)),
                                    str(out / "picked")).merge_and_unload().state_dict()
    ref = tmp_path / "merged"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale",
                                    f"{report['pick']['scale']:g}", "--out", str(ref)])
    assert res.exit_code == 0, res.output
    want = AutoModelForCausalLM.from_pretrained(str(ref)).state_dict()
    assert max(float((got[k] - w).abs().max()) for k, w in want.items()) < 1e-5


def test_write_picked_as_an_adapter_needs_a_lora_adapter(llama_base, mc_task, tmp_path):
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_base), "--task", str(mc_task),
                                    "--pick", "max-acc-drop=1", "--write-picked", "--format", "adapter",
                                    "--out", str(tmp_path / "sw")])
    assert res.exit_code == 2 and "--format adapter" in res.output and not (tmp_path / "sw").exists()


def test_detect_json_to_stdout(llama_base, llama_adapter, tmp_path):
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(llama_adapter), "--json", "-"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    res2 = CliRunner().invoke(main, ["detect", str(llama_base), str(llama_adapter), "--json",
                                     str(tmp_path / "r.json")])
    written = json.loads((tmp_path / "r.json").read_text())
    assert res2.exit_code == 0
    assert printed["total_intruders"] == written["total_intruders"] > 0
    assert [m["intruders"] for m in printed["matrices"]] == [m["intruders"] for m in written["matrices"]]
    assert "Intruder dimensions" in res.stderr and "Intruder dimensions" not in res.stdout


@pytest.mark.parametrize("command", ["sweep", "release", "compare"])
def test_lm_eval_spellings_are_aliases(command):
    cmd = main.commands[command]
    dash = {"--num-fewshot": "3", "--batch-size": "4", "--gen-kwargs": "temperature=0"}
    under = {k.replace("-", "_").replace("__", "--"): v for k, v in dash.items()}
    base = ["a", "b"] if command != "compare" else ["a"]
    required = {"sweep": ["--out", "o"], "release": ["--out", "o", "--max-acc-drop", "0.1"],
                "compare": ["--tasks", "t"]}[command]

    def parsed(flags: dict[str, str], extra: list[str]) -> dict:
        argv = [*base, *required, *(x for kv in flags.items() for x in kv), *extra]
        return cmd.make_context(command, argv).params

    a = parsed(dash, ["--apply-chat-template", "--log-samples"])
    b = parsed(under, ["--apply_chat_template", "--log_samples"])
    assert a == b and a["num_fewshot"] == 3 and a["apply_chat_template"] and a["batch_size"] == 4
