"""The measured sweep tables in README.md and recipes/README.md equal what the code prints from their JSON.

``recipes/reproduce.py`` runs each target and keeps its sweep JSON under ``recipes/results/``; here its
``--check`` logic renders every marked region's table and control verdict from that JSON with
``evals.measure.results.markdown_table`` (what ``repair sweep`` prints) and compares them with the docs, so a
number edited by hand, or a renderer change not carried into the docs, fails CI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "recipes" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_marked_table_equals_its_json():
    assert reproduce().check() == []


def test_a_table_edited_by_hand_is_caught_and_rewritten(tmp_path, monkeypatch):
    r = reproduce()
    want = r.rendered("controls-matched")
    table, verdict = want["table"], want["verdict"]
    lines = table.splitlines()
    tampered = "\n".join([*lines[:2], lines[2].replace("|", "| 0.0001", 1), *lines[3:]])  # one cell edited
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n\n<!-- reproduce: controls-matched -->\n{tampered}\n\n{verdict}\n"
                   f"<!-- /reproduce: controls-matched -->\nafter\n")
    monkeypatch.setattr(r, "DOCS", (doc,))
    monkeypatch.setattr(r, "ROOT", tmp_path)
    problems = [p for p in r.check() if "controls-matched" in p]
    assert problems == ["doc.md [controls-matched]: the table differs from results/controls-matched.json"]
    doc.write_text(r.rewrite(doc.read_text(), "controls-matched"))
    assert [p for p in r.check() if "controls-matched" in p and "differs" in p] == []
    assert doc.read_text().startswith("intro\n\n<!-- reproduce") and doc.read_text().endswith("after\n")


def test_a_whole_region_target_is_caught_and_rewritten(tmp_path, monkeypatch):
    r = reproduce()
    body = r.rendered("recipes")["body"]
    doc = tmp_path / "doc.md"
    doc.write_text(f"<!-- reproduce: recipes -->\n{body.replace('| 47 |', '| 46 |')}<!-- /reproduce: recipes -->\n")
    monkeypatch.setattr(r, "DOCS", (doc,))
    monkeypatch.setattr(r, "ROOT", tmp_path)
    assert [p for p in r.check() if p.startswith("doc.md [recipes]")] == [
        "doc.md [recipes]: the table differs from results/lora-r1-sweep.json, results/lora-r1-a16-sweep.json, "
        "results/full-sweep.json"]
    doc.write_text(r.rewrite(doc.read_text(), "recipes"))
    assert doc.read_text() == f"<!-- reproduce: recipes -->\n{body}<!-- /reproduce: recipes -->\n"


def test_a_finished_training_run_is_reused_only_for_the_same_recipe(tmp_path):
    from repair.train.recipe import load_recipe

    r = reproduce()
    recipe = "recipes/smollm2-addition-lora-sweep.yaml"
    sets = ["name=lora-r4-a16", "lora.r=4", "lora.alpha=16"]
    out = tmp_path / "run"
    args = ["finetune", recipe, "--out", str(out), *(a for s in sets for a in ("--set", s))]
    assert not r._reusable(args)  # nothing there yet
    out.mkdir()
    (out / "recipe.json").write_text(load_recipe(ROOT / recipe, sets).model_dump_json())
    assert r._reusable(args)
    assert not r._reusable([*args, "--set", "lora.r=8"])  # another rank: retrained
    assert not r._reusable(["sweep", "smollm2-135m", str(out)])


def test_the_rank_sweep_trains_what_its_labels_say():
    from repair.train.recipe import load_recipe

    r = reproduce()
    runs = [c for c in r.TARGETS["rank-sweep"].commands if c[0] == "finetune" and "--set" in c]
    assert len(runs) == 13
    trained = [run for run in r.RANK_SWEEP if run.sets is not None]  # the full fine-tune is the recipes target's
    assert len(trained) == len(r.RANK_SWEEP) - 1
    for cmd, run in zip(runs, trained, strict=True):
        recipe = load_recipe(ROOT / cmd[1], [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"])
        scaling = recipe.lora.lora_alpha / (recipe.lora.r ** 0.5 if recipe.lora.rslora else recipe.lora.r)
        assert recipe.name == run.name and f"r={recipe.lora.r}," in run.label and f"(scaling {scaling:g}" in run.label
        assert ("; lr " in run.label) == (recipe.train.learning_rate not in (5e-3, 3e-3))


def test_the_demo_output_is_its_release_json():
    """The README shows the demo's terminal output verbatim; its evidence table and verdict are the ones the
    stored release.json prints."""
    from evals.release.card import evidence_table
    from evals.release.model import ReleaseReport

    report = ReleaseReport.model_validate_json((ROOT / "recipes" / "results" / "demo.json").read_text())
    shown = (ROOT / "recipes" / "results" / "demo.txt").read_text()
    assert report.found.intruders == 47 and report.tuned.endswith("demo") and report.command == "repair demo"
    assert "\n".join(evidence_table(report)) in shown
    assert f"Release {report.verdict}: {report.reason}" in shown
    assert len(shown.splitlines()) <= 60 and "lm_eval" not in shown and "WARNING" not in shown


