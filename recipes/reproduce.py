"""Regenerate the measured tables and figures of README.md and recipes/README.md, and the JSON they come from.

    python recipes/reproduce.py --only demo            # one target (see --list)
    python recipes/reproduce.py                        # every target, one after another
    python recipes/reproduce.py --check                # no runs: the docs' tables against the stored JSON
    python recipes/reproduce.py --rewrite              # no runs: rewrite the docs' tables from the stored JSON

Each target runs the ``repair`` CLI as a user would, keeps the JSON it wrote under ``recipes/results/``,
and rewrites every region of the docs marked ``<!-- reproduce: <target> -->`` ...
``<!-- /reproduce: <target> -->``. In a sweep target's region the table starting ``| point |`` is replaced
by the table ``evals.measure.results.markdown_table`` prints from that JSON (what ``repair sweep`` prints), and a
line starting ``Against the`` by the control verdict; the other targets' regions are replaced whole by
what their renderer prints from their JSON. ``--check`` (and ``tests/test_docs_tables.py``, in CI)
asserts that every marked region already says exactly that, so no number in the docs can drift from
what the code prints.

Training runs (``repair finetune``) write to ``--runs`` (default: the tool's cache) and are reused when
their ``recipe.json`` equals the recipe asked for, so a target reruns only its measurements. Times on a
2-core CPU: ``demo`` about 2.5 min, each control sweep about 4, ``b-only`` about 8, ``recipes`` its three
sweeps (plus the training runs it has not kept), ``rank-sweep`` about 4 per LoRA run plus about 15 to measure
the 14 fine-tunes, ``continual`` about 30 (8, 9 and 11 on 2026-11-25), ``fit`` about 23 (two runs of about
11); ``--check`` takes a second.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from reproduce_tables import (  # noqa: E402
    CONTINUAL_RUNS,
    FULL_RUN,
    RANK_SWEEP,
    RECIPE_RUNS,
    continual_table,
    fit_table,
    rank_sweep_plots,
    rank_sweep_table,
    recipes_table,
)

RESULTS = ROOT / "recipes" / "results"
DOCS = (ROOT / "README.md", ROOT / "recipes" / "README.md")
SWEEP = ["sweep", "smollm2-135m", "repair/demo", "--task", "addition", "--limit", "200"]
FIT = ["fit", "smollm2-135m", "repair/demo", "--task", "addition", "--limit", "200", "--max-acc-drop", "0.005"]
SWEEP_PIECES = {"table": r"(?s)^\| point \|.*?(?=\n(?!\|)|\Z)", "verdict": r"^Against the .*$"}


@dataclass(frozen=True)
class Target:
    commands: list[list[str]]  # repair CLI arguments, in order; "{out}": a fresh folder, "{runs}": kept runs
    results: dict[str, str]  # stored file under recipes/results/ -> the file (or folder) the commands wrote
    render: Callable[[], dict[str, str]] | None = None  # {"body": region text}; None: a sweep's table and verdict
    after: Callable[[], None] | None = None  # draws figures from the stored results
    pieces: dict[str, str] = field(default_factory=lambda: dict(SWEEP_PIECES))
    terminal: str | None = None  # keep the last command's terminal output (stdout and stderr) as results/<this>


def _finetune(recipe: str, out: str, *sets: str) -> list[str]:
    return ["finetune", recipe, "--out", out, *(a for s in sets for a in ("--set", s))]


def _rank_sweep_commands() -> list[list[str]]:
    runs = [_finetune("recipes/smollm2-addition-lora-sweep.yaml", f"{{runs}}/rank-sweep/{r.name}", *r.sets)
            for r in RANK_SWEEP if r.sets is not None]
    runs.append(_finetune("recipes/smollm2-addition-full.yaml", FULL_RUN))  # the recipes target's own run
    models = [f"{FULL_RUN}/model" if r.sets is None else f"{{runs}}/rank-sweep/{r.name}/adapter" for r in RANK_SWEEP]
    labels = ",".join(r.name for r in RANK_SWEEP)
    return [*runs,
            ["figures", "smollm2-135m", *models, "--labels", labels, "--forgetting", "base-samples:64",
             "--out", "{out}/figures"],
            ["compare", *models, "--base", "smollm2-135m", "--tasks", "addition", "--limit", "200",
             "--out", "{out}/compare"]]


def _stored_sweep(name: str) -> Path:
    return RESULTS / next(iter(TARGETS[name].results))


TARGETS: dict[str, Target] = {
    "demo": Target([["demo", "--out", "{out}"]], {"demo.json": "release.json"}, render=lambda: {"body": demo_output()},
                   pieces={}, terminal="demo.txt"),
    "controls-matched": Target([[*SWEEP, "--control", "matched", "--out", "{out}"]],
                               {"controls-matched.json": "sweep.json"}),
    "controls-neighbour": Target([[*SWEEP, "--control", "neighbour", "--out", "{out}"]],
                                 {"controls-neighbour.json": "sweep.json"}),
    "per-matrix-1": Target([[*SWEEP, "--control", "matched", "--per-matrix", "1", "--out", "{out}"]],
                           {"per-matrix-1.json": "sweep.json"}),
    "b-only": Target([_finetune("recipes/smollm2-addition-lora-r1-a16-b-only.yaml", "{runs}/b-only"),
                      ["sweep", "smollm2-135m", "{runs}/b-only/adapter", "--task", "addition", "--limit", "200",
                       "--scales", "0,1", "--control", "none", "--out", "{out}/sweep"]],
                     {"lora-r1-a16-b-only-sweep.json": "sweep/sweep.json"}),
    "recipes": Target(
        [c for r in RECIPE_RUNS for c in r.commands()],
        {f"{r.stored}.json": f"{r.name}/sweep.json" for r in RECIPE_RUNS},
        render=lambda: {"body": recipes_table(RESULTS)}, pieces={}),
    "rank-sweep": Target(
        _rank_sweep_commands(),
        {"rank-sweep/figures.json": "figures/figures.json", "rank-sweep/compare.json": "compare/compare.json",
         **{f"rank-sweep/{f}.png": f"figures/{f}.png"
            for f in ("intruders_vs_epsilon", "intruders_vs_k", "intruders_vs_forgetting")}},
        render=lambda: {"body": rank_sweep_table(RESULTS / "rank-sweep")},
        after=lambda: rank_sweep_plots(RESULTS / "rank-sweep"), pieces={}),
    "fit": Target(
        [[*FIT, "--directions", d, "--out", f"{{out}}/{d}"] for d in ("intruders", "delta")],
        {**{f"fit-{d}.json": f"{d}/fit.json" for d in ("intruders", "delta")},
         **{f"fit-{d}-front.png": f"{d}/front.png" for d in ("intruders", "delta")}},
        render=lambda: {"body": fit_table(RESULTS)}, pieces={}),
    "continual": Target(
        [["continual", f"recipes/{r.recipe}", "--limit", "200", "--out", f"{{out}}/{r.name}"] for r in CONTINUAL_RUNS],
        {f"continual/{r.name}.json": f"{r.name}/continual.json" for r in CONTINUAL_RUNS},
        render=lambda: {"body": continual_table(RESULTS / "continual")}, pieces={}),
}


DEMO_OUT = "intruder-repair-demo"  # the demo's default --out, as the README shows its output


def demo_output() -> str:
    """The demo's terminal output as stored, in a code block."""
    return "```\n" + (RESULTS / "demo.txt").read_text() + "```"


def region(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- reproduce: {re.escape(name)} -->\n)(.*?)(<!-- /reproduce: {re.escape(name)} -->)",
                      re.DOTALL)


def rendered(name: str) -> dict[str, str]:
    """What the region for ``name`` must say, piece by piece, printed from the stored JSON."""
    target = TARGETS[name]
    if target.render is not None:
        return {k: v + "\n" for k, v in target.render().items()}
    from evals.measure.results import SweepReport, control_verdict, markdown_table

    report = SweepReport.model_validate_json(_stored_sweep(name).read_text())
    verdict = control_verdict(report)
    return {"table": markdown_table(report), **({"verdict": verdict} if verdict is not None else {})}


def pieces_of(body: str, name: str) -> dict[str, str]:
    """The pieces of one region's text (its whole text as ``body`` for non-sweep targets)."""
    patterns = TARGETS[name].pieces
    if not patterns:
        return {"body": body}
    found = {k: re.search(p, body, re.MULTILINE) for k, p in patterns.items()}
    return {k: m[0] for k, m in found.items() if m is not None}


def rewrite(text: str, name: str) -> str:
    """``text`` with every region marked for ``name`` as rendered now."""
    want, patterns = rendered(name), TARGETS[name].pieces

    def fill(m: re.Match[str]) -> str:
        if not patterns:
            return m[1] + want["body"] + m[3]
        body = m[2]
        for k, p in patterns.items():
            if k in want:
                body = re.sub(p, lambda _, k=k: want[k], body, count=1, flags=re.MULTILINE)
        return m[1] + body + m[3]

    return region(name).sub(fill, text)


def check() -> list[str]:
    """Every marked region that differs from its JSON, one line each; and targets no region shows."""
    problems = []
    for name in TARGETS:
        missing = [s for s in TARGETS[name].results if s.endswith(".json") and not (RESULTS / s).is_file()]
        if missing:
            problems.append(f"{name}: results/{missing[0]} is missing; run `python recipes/reproduce.py --only {name}`")
            continue
        want = rendered(name)
        found = [(doc, m[2]) for doc in DOCS for m in region(name).finditer(doc.read_text())]
        if not found:
            problems.append(f"{name}: no region of {' or '.join(str(d.relative_to(ROOT)) for d in DOCS)} is marked for it")
        stored = ", ".join(f"results/{s}" for s in TARGETS[name].results if s.endswith(".json"))
        for doc, body in found:
            have = pieces_of(body, name)
            for piece, text in want.items():
                if have.get(piece) != text:
                    what = "table" if piece in ("table", "body") else piece
                    problems.append(f"{doc.relative_to(ROOT)} [{name}]: the {what} differs from {stored}")
    return problems


def _reusable(args: list[str]) -> bool:
    """A ``finetune`` whose --out already holds a finished run of the same recipe (with the same --set)."""
    if args[0] != "finetune":
        return False
    from pydantic import ValidationError

    from repair.train.recipe import Recipe, load_recipe

    out = Path(args[args.index("--out") + 1])
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    done = out / "recipe.json"
    if not done.is_file():
        return False
    try:
        kept = Recipe.model_validate_json(done.read_text())
    except ValidationError:  # written by an older schema: retrain
        return False
    return kept.model_dump() == load_recipe(ROOT / args[1], sets).model_dump()


def run(name: str, runs: Path) -> None:
    """Run one target, keep its results, and rewrite the docs' regions for it."""
    target = TARGETS[name]
    with tempfile.TemporaryDirectory(prefix=f"reproduce-{name}-") as tmp:
        out = Path(tmp) / "out"
        for args in target.commands:
            args = [a.replace("{out}", str(out)).replace("{runs}", str(runs)) for a in args]
            if _reusable(args):
                print(f"$ repair {' '.join(args)}  # reused: the run is already there", flush=True)
                continue
            print(f"$ repair {' '.join(args)}", flush=True)
            overwrite = ["--overwrite"] if args[0] == "finetune" and Path(args[args.index("--out") + 1]).exists() else []
            shown = subprocess.run([sys.executable, "-m", "repair.cli", *args, *overwrite], cwd=ROOT, check=True,
                                   stdout=subprocess.PIPE if target.terminal else None,
                                   stderr=subprocess.STDOUT if target.terminal else None, text=True).stdout
            if target.terminal:
                print(shown, flush=True)
                from repair.io.sources import demo_dir

                shown = shown.replace(str(out), DEMO_OUT).replace(str(demo_dir()), "<package>/repair/demo")
                (RESULTS / target.terminal).write_text(shown)
        for stored, made in target.results.items():
            (RESULTS / stored).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / made, RESULTS / stored)
    if target.after is not None:
        target.after()
    write_docs(name)


def write_docs(name: str) -> None:
    for doc in DOCS:
        text = doc.read_text()
        if (new := rewrite(text, name)) != text:
            doc.write_text(new)
            print(f"  {doc.relative_to(ROOT)}: updated", flush=True)


def main() -> None:
    from repair.runtime.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(TARGETS), help="run only this target (repeatable)")
    ap.add_argument("--check", action="store_true", help="run nothing; compare the docs with the stored JSON")
    ap.add_argument("--rewrite", action="store_true", help="run nothing; rewrite the docs from the stored JSON")
    ap.add_argument("--list", action="store_true", help="print the targets and their commands")
    ap.add_argument("--runs", type=Path, default=cache_dir() / "reproduce", help="where training runs are kept")
    args = ap.parse_args()
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:20} " + "; ".join("repair " + " ".join(a) for a in t.commands))
        return
    for name in args.only or TARGETS:
        if args.rewrite:
            if TARGETS[name].after is not None:
                TARGETS[name].after()
            write_docs(name)
        elif not args.check:
            run(name, args.runs)
    problems = check()
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
