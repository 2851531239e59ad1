"""Regenerate the measured sweep tables of README.md and recipes/README.md, and the JSON they come from.

    python recipes/reproduce.py --only demo            # one target (see --list)
    python recipes/reproduce.py                        # every target, one after another
    python recipes/reproduce.py --check                # no runs: the docs' tables against the stored JSON

Each target runs the ``repair`` CLI as a user would, keeps the sweep JSON it wrote as
``recipes/results/<target>.json``, and rewrites every region of the docs marked
``<!-- reproduce: <target> -->`` ... ``<!-- /reproduce: <target> -->``: the table starting ``| point |``
inside it is replaced by the table ``evals.results.markdown_table`` prints from that JSON (the same
function ``repair sweep`` prints with), and a line starting ``Against the`` by the control verdict.
``--check`` (and ``tests/test_docs_tables.py``, in CI) asserts that every marked region already says
exactly that, so no number in the docs can drift from what the code prints. Runs take minutes each
on a 2-core CPU (``demo`` about 5, the control sweeps about 4, ``b-only`` about 8 with its training run);
``--check`` takes a second.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "recipes" / "results"
DOCS = (ROOT / "README.md", ROOT / "recipes" / "README.md")
SWEEP = ["sweep", "smollm2-135m", "repair/demo", "--task", "addition", "--limit", "200"]


@dataclass(frozen=True)
class Target:
    commands: list[list[str]]  # repair CLI arguments, run in order; "{out}" is a fresh output folder
    result: str  # the sweep JSON, relative to that folder
    stored: str = ""  # its name under recipes/results/ (default: <target>.json)


TARGETS: dict[str, Target] = {
    "demo": Target([["demo", "--out", "{out}"]], "sweep/sweep.json"),
    "controls-matched": Target([[*SWEEP, "--control", "matched", "--out", "{out}"]], "sweep.json"),
    "controls-neighbour": Target([[*SWEEP, "--control", "neighbour", "--out", "{out}"]], "sweep.json"),
    "per-matrix-1": Target([[*SWEEP, "--control", "matched", "--per-matrix", "1", "--out", "{out}"]], "sweep.json"),
    "b-only": Target([["finetune", "recipes/smollm2-addition-lora-r1-a16-b-only.yaml", "--out", "{out}/run"],
                      ["sweep", "smollm2-135m", "{out}/run/adapter", "--task", "addition", "--limit", "200",
                       "--scales", "0,1", "--control", "none", "--out", "{out}/sweep"]],
                     "sweep/sweep.json", "lora-r1-a16-b-only-sweep.json"),
}


def stored(name: str) -> Path:
    return RESULTS / (TARGETS[name].stored or f"{name}.json")


def region(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- reproduce: {re.escape(name)} -->\n)(.*?)(<!-- /reproduce: {re.escape(name)} -->)",
                      re.DOTALL)


def rendered(name: str) -> tuple[str, str | None]:
    """The table and the control verdict (None without a control) printed from ``results/<name>.json``."""
    from evals.results import SweepReport, control_verdict, markdown_table

    report = SweepReport.model_validate_json(stored(name).read_text())
    return markdown_table(report), control_verdict(report)


def rewrite(text: str, name: str) -> str:
    """``text`` with the table (and verdict line) of every region marked for ``name`` as rendered now."""
    table, verdict = rendered(name)

    def fill(m: re.Match[str]) -> str:
        body = re.sub(r"^\| point \|.*?(?=\n(?!\|)|\Z)", lambda _: table, m[2], count=1, flags=re.DOTALL | re.MULTILINE)
        if verdict is not None:
            body = re.sub(r"^Against the .*$", lambda _: verdict, body, count=1, flags=re.MULTILINE)
        return m[1] + body + m[3]

    return region(name).sub(fill, text)


def regions(text: str, name: str) -> list[tuple[str, str | None]]:
    """(table, verdict line or None) of every region marked for ``name`` in ``text``."""
    out = []
    for m in region(name).finditer(text):
        table = re.search(r"^\| point \|.*?(?=\n(?!\|)|\Z)", m[2], re.DOTALL | re.MULTILINE)
        verdict = re.search(r"^Against the .*$", m[2], re.MULTILINE)
        out.append((table[0] if table else "", verdict[0] if verdict else None))
    return out


def check() -> list[str]:
    """Every marked region whose table or verdict differs from its JSON, as one line each; and targets
    that no region shows."""
    problems = []
    for name in TARGETS:
        table, verdict = rendered(name)
        found = [(doc, r) for doc in DOCS for r in regions(doc.read_text(), name)]
        if not found:
            problems.append(f"{name}: no region of {', '.join(d.name for d in DOCS)} is marked for it")
        for doc, (t, v) in found:
            if t != table:
                problems.append(f"{doc.relative_to(ROOT)} [{name}]: the table differs from results/{stored(name).name}")
            if verdict is not None and v != verdict:
                problems.append(f"{doc.relative_to(ROOT)} [{name}]: the verdict differs from results/{stored(name).name}")
    return problems


def run(name: str) -> None:
    """Run one target, keep its JSON, and rewrite the docs' regions for it."""
    target = TARGETS[name]
    with tempfile.TemporaryDirectory(prefix=f"reproduce-{name}-") as tmp:
        out = Path(tmp) / "out"
        for args in target.commands:
            cmd = [sys.executable, "-m", "repair.cli", *(a.replace("{out}", str(out)) for a in args)]
            print("$ repair", " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / target.result, stored(name))
    for doc in DOCS:
        text = doc.read_text()
        if (new := rewrite(text, name)) != text:
            doc.write_text(new)
            print(f"  {doc.relative_to(ROOT)}: updated", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(TARGETS), help="run only this target (repeatable)")
    ap.add_argument("--check", action="store_true", help="run nothing; compare the docs with the stored JSON")
    ap.add_argument("--list", action="store_true", help="print the targets and their commands")
    args = ap.parse_args()
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:20} " + "; ".join("repair " + " ".join(args) for args in t.commands))
        return
    if not args.check:
        for name in args.only or TARGETS:
            run(name)
    problems = check()
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
