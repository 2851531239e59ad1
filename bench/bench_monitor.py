"""Overhead of IntruderMonitor on a LoRA training run of the demo recipe on the embedded default.

Runs `repair finetune` on the demo adapter's recipe (repair/demo/recipe.yaml: SmolLM2-135M, rank-1 LoRA
on all 7 linear modules, batch 16) twice per repeat, interleaved, as whole processes: once with the
monitor counting intruders every --every steps (and at step 0 and the end), once without it
(`intruders_every: null`). Both runs save no intermediate checkpoints, so the monitor is the only
difference. The spectra cache is warm (one `repair detect` of the demo pair first), as it is for anyone
who detected before training; a cold cache adds one computation of the base spectra at step 0, also printed.

It prints the wall time of each run, their ratio per repeat, and the monitor's own seconds from its history.

    python bench/bench_monitor.py [--steps 300] [--every 25] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from common import ROOT, ratio, repair, run, summary


def recipe_file(folder: Path, steps: int | None, every: int | None) -> Path:
    data = yaml.safe_load((ROOT / "repair" / "demo" / "recipe.yaml").read_text())
    data["train"]["save_steps"] = []
    data["train"]["intruders_every"] = every
    if steps is not None:
        data["train"]["steps"] = steps
    path = folder / f"recipe-{'on' if every else 'off'}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        work = Path(tmp)
        on, off = recipe_file(work, args.steps, args.every), recipe_file(work, args.steps, None)
        cache = {"INTRUDER_REPAIR_CACHE": str(work / "cache")}
        shutil.copytree(Path.home() / ".cache" / "intruder-repair" / "models", work / "cache" / "models")
        demo = str(ROOT / "repair" / "demo")
        cold, _ = run(repair("detect", "smollm2-135m", demo), cache)  # fills the spectra cache
        rows: dict[str, list[float]] = {"with monitor": [], "without": []}
        monitor: list[float] = []
        for i in range(args.repeats):
            for label, recipe in (("with monitor", on), ("without", off)):
                print(f"[repeat {i + 1}/{args.repeats}] {label} ...", file=sys.stderr, flush=True)
                out = work / f"out-{i}-{label.split()[0]}"
                rows[label].append(run(repair("finetune", str(recipe), "--out", str(out)), cache)[0])
                if label == "with monitor":
                    history = json.loads((out / "intruders.json").read_text())["steps"]
                    monitor.append(sum(h["seconds"] for h in history))
                    counts = [(h["step"], int(h["intruders/total"])) for h in history]
                shutil.rmtree(out)
    steps = args.steps or yaml.safe_load((ROOT / "repair" / "demo" / "recipe.yaml").read_text())["train"]["steps"]
    print(f"repair finetune, demo recipe, {steps} steps, monitor every {args.every} steps; "
          f"{args.repeats} interleaved repeat(s), whole processes, warm spectra cache")
    for label, vals in rows.items():
        print(f"  {label:13} {summary(vals)} s")
    over = [100 * (w / o - 1) for w, o in zip(rows["with monitor"], rows["without"], strict=True)]
    print(f"  with / without: {ratio(rows['with monitor'], rows['without'])}; overhead {summary(over)} %")
    print(f"  monitor's own time (its history): {summary(monitor)} s over {len(counts)} counts "
          f"= {100 * statistics.median(monitor) / statistics.median(rows['without']):.2f}% of a run without it")
    print(f"  intruders counted (step: total): {', '.join(f'{s}: {n}' for s, n in counts)}")
    print(f"  (cold spectra cache: whole-process repair detect of the demo pair, spectra computed: {cold:.1f} s)")


if __name__ == "__main__":
    main()
