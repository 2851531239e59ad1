"""The measured sweep tables in README.md and recipes/README.md equal what the code prints from their JSON.

``recipes/reproduce.py`` runs each target and keeps its sweep JSON under ``recipes/results/``; here its
``--check`` logic renders every marked region's table and control verdict from that JSON with
``evals.results.markdown_table`` (what ``repair sweep`` prints) and compares them with the docs, so a
number edited by hand, or a renderer change not carried into the docs, fails CI.
"""

from __future__ import annotations

import importlib.util
import json
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
    table, verdict = r.rendered("controls-matched")
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


def test_the_demo_json_is_the_demo_adapters_sweep():
    data = json.loads((ROOT / "recipes" / "results" / "demo.json").read_text())
    assert data["total_intruders"] == 47 and data["arguments"]["tuned"].endswith("demo")
