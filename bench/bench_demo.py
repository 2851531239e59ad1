"""`repair demo` as a new user meets it: first run on a fresh machine (empty cache: the embedded model is fetched
from PyPI and dequantized, the base samples generated, every spectrum computed), then warm; wall time, peak RSS and
the terminal output (its lines, and whether any other library's log or bar reached it). Peer, on the same warm
cache: the three commands the demo replaces (`repair detect`, `repair sweep --pick --write-picked` on the same
points, `repair patch --format adapter` at the picked λ).

    python bench/bench_demo.py [--skip-fresh] [--repeats 1]

Targets (issue 26): <= 300 s fresh, <= 180 s warm, <= 60 lines, no lm-eval warning on the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAUNCHER, OFFLINE, repair  # noqa: E402

FOREIGN = re.compile(r"lm_eval|lm-eval|transformers|WARNING|Warning|it/s\]|s/it\]|%\|")


def run_shown(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str, int]:
    """(wall s, peak RSS MiB, what the terminal showed: stdout and stderr together, exit code)."""
    read, write = os.pipe()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(write), *cmd], env={**os.environ, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=(write,))
    wall = time.perf_counter() - start
    os.close(write)
    with os.fdopen(read) as f:
        peak = int(f.read() or 0) / 1024
    return wall, peak, proc.stdout, proc.returncode


def demo(cache: Path, out: Path) -> tuple[float, float, str]:
    env = {"INTRUDER_REPAIR_CACHE": str(cache), "HF_HOME": str(cache / "hf")}
    wall, peak, shown, code = run_shown(repair("demo", "--out", str(out)), env)
    if code != 0:
        sys.exit(f"repair demo failed ({code}):\n{shown[-3000:]}")
    return wall, peak, shown


def peer(cache: Path, out: Path) -> tuple[float, float]:
    """detect, sweep (the demo's own points and pick), patch --format adapter: three processes, summed."""
    from repair.io.sources import demo_dir

    env = {**OFFLINE, "INTRUDER_REPAIR_CACHE": str(cache), "HF_HOME": str(cache / "hf")}
    steps = [repair("detect", "smollm2-135m", str(demo_dir()), "--json", str(out / "detect.json")),
             repair("sweep", "smollm2-135m", str(demo_dir()), "--task", "addition", "--limit", "100",
                    "--scales", "0,0.5,1", "--control", "none", "--pick", "max-acc-drop=0.02", "--out",
                    str(out / "sweep"))]
    wall = peak = 0.0
    for cmd in steps:
        w, p, shown, code = run_shown(cmd, env)
        if code != 0:
            sys.exit(f"{' '.join(cmd)} failed ({code}):\n{shown[-3000:]}")
        wall, peak = wall + w, max(peak, p)
    scale = json.loads((out / "sweep" / "sweep.json").read_text())["pick"]["scale"]
    w, p, shown, code = run_shown(repair("patch", "smollm2-135m", str(demo_dir()), "--scale", f"{scale:g}",
                                         "--format", "adapter", "--out", str(out / "adapter")), env)
    if code != 0:
        sys.exit(f"repair patch failed ({code}):\n{shown[-3000:]}")
    return wall + w, max(peak, p)


def report(label: str, wall: float, peak: float, shown: str, target: float) -> None:
    lines = shown.rstrip("\n").splitlines()
    foreign = [x for x in lines if FOREIGN.search(x)]
    print(f"{label:<28}{wall:8.1f} s (target {target:.0f} s: {'met' if wall <= target else 'MISSED'})"
          f"{peak:9.0f} MiB peak RSS   {len(lines)} lines (target 60)   {len(foreign)} foreign lines")
    for x in foreign[:5]:
        print(f"    foreign: {x[:120]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-fresh", action="store_true", help="only the warm runs (a cache of ~/.cache is used)")
    ap.add_argument("--repeats", type=int, default=1, help="warm demo and peer runs, interleaved")
    ap.add_argument("--show", type=Path, default=None, help="also write the warm run's terminal output here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    cache = root / "cache" if not args.skip_fresh else Path(os.environ.get(
        "INTRUDER_REPAIR_CACHE", Path.home() / ".cache" / "intruder-repair"))
    try:
        if not args.skip_fresh:
            wall, peak, shown = demo(cache, root / "fresh")
            report("repair demo, fresh machine", wall, peak, shown, 300)
        for i in range(args.repeats):
            wall, peak, shown = demo(cache, root / f"warm{i}")
            report("repair demo, warm", wall, peak, shown, 180)
            if args.show is not None:
                args.show.write_text(shown)
            p_wall, p_peak = peer(cache, root / f"peer{i}")
            print(f"{'peer: detect+sweep+patch':<28}{p_wall:8.1f} s{'':27}{p_peak:9.0f} MiB peak RSS   "
                  f"demo/peer {wall / p_wall:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
