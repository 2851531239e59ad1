"""The cost of `repair fit` against a default five-point `repair sweep` (λ in {0, 0.25, 0.5, 0.75, 1} with the
matched control: ten measured points), measured side by side in one run, interleaved, on the embedded default
and the demo adapter; the same task, limit and forgetting corpus. Warm cache: the base samples of both seeds
and the spectra are computed by a first, untimed pass.

    python bench/bench_fit.py [--repeats 1] [--limit 200] [--directions delta] [--skip-warm]

Target (issue 27): the fit with its evaluation costs at most twice the sweep (ratio fit / sweep <= 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import repair, run, summary  # noqa: E402

TASK = ["smollm2-135m", "repair/demo", "--task", "addition"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--directions", default="delta", help="comma-separated: delta, intruders")
    ap.add_argument("--skip-warm", action="store_true", help="the cache already holds both seeds' base samples")
    args = ap.parse_args()
    limit = ["--limit", str(args.limit)]
    kinds = args.directions.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        sweep = lambda out: repair("sweep", *TASK, *limit, "--out", out)  # noqa: E731
        fit = lambda out, d: repair("fit", *TASK, *limit, "--max-acc-drop", "0.02", "--directions", d,  # noqa: E731
                                    "--out", out)
        if not args.skip_warm:
            print("warming the cache (untimed): base samples of both seeds, spectra", flush=True)
            run(fit(f"{tmp}/warm", kinds[0]))
        times: dict[str, list[float]] = {"sweep": [], **{f"fit {d}": [] for d in kinds}}
        for i in range(args.repeats):
            wall, _ = run(sweep(f"{tmp}/sweep{i}"))
            times["sweep"].append(wall)
            print(f"  sweep (10 points)          {wall:7.1f} s", flush=True)
            for d in kinds:
                wall, _ = run(fit(f"{tmp}/{d}{i}", d))
                times[f"fit {d}"].append(wall)
                report = json.loads(Path(f"{tmp}/{d}{i}/fit.json").read_text())
                print(f"  fit --directions {d:<10} {wall:7.1f} s (fitting itself {report['fit_seconds']:.0f} s, "
                      f"{2 + len(report['fronts'])} points)", flush=True)
    print(f"\n{'command':<28}{'wall s':>10}   ratio to the sweep")
    for name, values in times.items():
        ratios = [v / s for v, s in zip(values, times["sweep"], strict=True)]
        print(f"{name:<28}{summary(values)}   {summary(ratios)}")


if __name__ == "__main__":
    main()
