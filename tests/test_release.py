"""`repair release` on a tiny model: the folder to publish (adapter, card, page, release.json), its exit codes,
and what it keeps when a run fails. Oracles: peft's own merge, huggingface_hub's card parser, headless Chromium."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from release_oracles import card_table, external, number, render_page

from repair.cli import main


def release_args(base, adapter, task, corpus, out, *extra):
    return ["release", str(base), str(adapter), "--task", str(task), "--limit", "4", "--forgetting", str(corpus),
            "--max-acc-drop", "1", "--scales", "0,0.5", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def released(llama_base, llama_adapter, mc_task, corpus_file, tmp_path_factory):
    """One release of the tiny adapter, with a model card of its own carried in (a copy: fixtures stay as built)."""
    root = tmp_path_factory.mktemp("release")
    adapter = shutil.copytree(llama_adapter, root / "adapter")
    (adapter / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- math\n---\n\n# Tiny adder\n\nOur notes.\n")
    out = root / "out"
    res = CliRunner().invoke(main, release_args(llama_base, adapter, mc_task, corpus_file, out))
    assert res.exit_code == 0, res.output
    return out, adapter, res.output


def test_the_released_adapter_is_the_patch_at_the_released_scale(released, llama_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, adapter, _ = released
    report = json.loads((out / "release.json").read_text())
    assert report["verdict"] in ("patched", "unchanged") and report["format"] == "adapter"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_base)), str(out))
    got = merged.merge_and_unload().state_dict()
    ref = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(adapter), "--scale", f"{report['scale']:g}",
                                    "--format", "merged", "--out", str(ref)])
    assert res.exit_code == 0, res.output
    want = AutoModelForCausalLM.from_pretrained(str(ref)).state_dict()
    assert set(got) == set(want)
    for k, w in want.items():
        norm = torch.linalg.matrix_norm(w.double(), ord=2) if w.dim() == 2 else w.double().abs().max()
        assert float((got[k].double() - w.double()).abs().max()) <= 1e-6 * max(float(norm), 1.0), k


def test_the_card_parses_and_its_table_is_release_json(released):
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    out, _, _ = released
    report = json.loads((out / "release.json").read_text())
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "peft" and "intruder-repair" in data.tags and "math" in data.tags
    assert data.license == "apache-2.0" and "Our notes." in card.text  # the adapter's own card is kept
    again = ModelCardData(**data.to_dict())  # the metadata round-trips through the hub's own model
    name, results = model_index_to_eval_results(eval_results_to_model_index(data.model_name, data.eval_results))
    assert again.to_dict() == data.to_dict() and name == data.model_name
    released_row = next(r for r in report["rows"] if r["label"] == "released")
    assert {r.dataset_name: r.metric_value for r in results} == pytest.approx(
        {t: s["value"] for t, s in released_row["scores"].items()}, abs=5e-5)
    table = card_table(card.text)
    assert set(table) == {"base", "tuned", "released"}
    for row in report["rows"]:
        cells = table[row["label"]]
        task = next(iter(row["scores"]))
        acc, se = number(cells[1])
        assert acc == pytest.approx(row["scores"][task]["value"], abs=5e-5)
        assert se == pytest.approx(row["scores"][task]["stderr"], abs=5e-5)
        nll, nll_se = number(cells[2])
        assert nll == pytest.approx(row["forgetting_nll"], abs=5e-5)
        assert nll_se == pytest.approx(row["forgetting_stderr"], abs=5e-5)
        removed, _ = number(cells[3])
        assert removed == (None if row["forgetting_removed"] is None else pytest.approx(row["forgetting_removed"],
                                                                                         abs=5e-4))
        assert cells[4] == ("–" if row["intruders_left"] is None else str(row["intruders_left"]))


def test_the_numbers_are_the_sweeps_own(released):
    out, _, _ = released
    report = json.loads((out / "release.json").read_text())
    sweep = json.loads((out / "logs" / "sweep.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["base"]["forgetting_nll"] == sweep["base"]["forgetting_nll"]
    assert rows["tuned"]["forgetting_nll"] == sweep["tuned"]["forgetting_nll"]
    picked = next(p for p in sweep["points"] if p["scale"] == report["scale"])
    assert rows["released"]["forgetting_nll"] == picked["forgetting_nll"]
    assert sweep["pick"]["scale"] == report["scale"]
    assert sorted(p.name for p in (out / "logs" / "points").iterdir()) == ["base.json", "scale=0.5.json",
                                                                          "scale=0.json", "scale=1.json"]
    assert (out / "logs" / "lm-eval" / "base").is_dir() and (out / "logs" / "run.log").is_file()
    assert not (out.parent / ".out.release").exists()  # the work folder goes once the release is published


def test_the_page_is_self_contained_and_renders(released, tmp_path):
    out, _, _ = released
    html = (out / "report.html").read_text()
    assert "<script" not in html and report_sources(html) == {"data"}
    shot, asked = render_page(out / "report.html", tmp_path)
    assert shot.stat().st_size > 20_000 and external(asked) == []
    control = tmp_path / "control.html"  # the check sees a page that does fetch
    control.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    assert external(render_page(control, tmp_path)[1]) == ["http://example.invalid/x.png"]


def report_sources(html: str) -> set[str]:
    import re

    return {m.split(":")[0] for m in re.findall(r'(?:src|href)="([^"]*)"', html)}


def test_a_failed_gate_exits_1_and_keeps_every_point(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    out = tmp_path / "gated"
    res = CliRunner().invoke(main, release_args(llama_base, llama_adapter, mc_task, corpus_file, out,
                                                "--fail-above", "0", "--scales", "1"))
    assert res.exit_code == 1, res.output
    report = json.loads((out / "release.json").read_text())
    assert report["verdict"] == "gate-failed" and not report["ready"] and report["scale"] == 1.0
    assert report["rows"][2]["intruders_left"] > 0
    assert sorted(p.name for p in (out / "logs" / "points").iterdir()) == ["base.json", "scale=1.json"]


@pytest.mark.parametrize("case", ["task", "budget", "format", "gate", "out", "tuned"])
def test_bad_input_exits_2_before_anything_is_loaded_or_written(case, llama_base, llama_adapter, mc_task,
                                                                corpus_file, tmp_path, monkeypatch):
    import evals.release.runner
    import evals.runners.sweeper

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evals.runners.sweeper, "load_model", loaded)
    monkeypatch.setattr(evals.release.runner, "detect", loaded)
    out = tmp_path / "out"
    args = release_args(llama_base, llama_adapter, mc_task, corpus_file, out)
    if case == "task":
        args[args.index("--task") + 1] = str(tmp_path / "missing.yaml")
    elif case == "budget":
        args[args.index("--max-acc-drop") + 1] = "2"
    elif case == "format":
        args[2] = str(llama_base)  # a full checkpoint has no LoRA factors to write as an adapter
        args += ["--format", "adapter"]
    elif case == "gate":
        args += ["--fail-above", "-1"]
    elif case == "out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        args[2] = str(tmp_path / "no-such-adapter")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "missing.yaml") == (["out"] if case == "out"
                                                                                     else [])
    if case == "out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_run_that_fails_after_it_began_exits_1_and_resumes(llama_base, llama_adapter, mc_task, corpus_file,
                                                             tmp_path, monkeypatch):
    import evals.release.runner
    import evals.runners.sweeper
    from repair.errors import RepairError

    real = evals.release.runner._publish

    def broken(*args, **kwargs):
        raise RepairError("format: a late input error")

    monkeypatch.setattr(evals.release.runner, "_publish", broken)
    out = tmp_path / "out"
    args = release_args(llama_base, llama_adapter, mc_task, corpus_file, out)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output  # never 2 once the sweep has begun
    assert "kept" in res.output and not out.exists()
    kept = tmp_path / ".out.release" / "logs" / "points"
    assert sorted(p.name for p in kept.iterdir()) == ["base.json", "scale=0.5.json", "scale=0.json", "scale=1.json"]

    def measured(*args, **kwargs):
        raise AssertionError("a finished point was measured again")

    monkeypatch.setattr(evals.release.runner, "_publish", real)
    monkeypatch.setattr(evals.runners.sweeper.Evaluator, "measure", measured)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert (out / "release.json").is_file() and not (tmp_path / ".out.release").exists()


def test_an_adapter_without_intruders_is_released_unchanged(llama_base, mc_task, corpus_file, tmp_path):
    from conftest import make_adapter, tiny_llama

    weak = make_adapter(tiny_llama, llama_base, tmp_path / "weak", r=4, lora_alpha=8, target_modules=["q_proj"],
                        b_scale=1e-3)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, release_args(llama_base, weak, mc_task, corpus_file, out))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "release.json").read_text())
    assert report["verdict"] == "unchanged" and report["found"]["intruders"] == 0 and report["edited_directions"] == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (weak / name).read_bytes(), name
