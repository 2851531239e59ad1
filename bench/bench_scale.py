"""Scale: certified against exact detection, and against peft, on Llama-3-8B- and 70B-shaped layers.

Builds (``scale_models.py``) Llama-3-8B-shaped checkpoints (hidden 4096, MLP 14336, 32 heads, 8 kv
heads, bfloat16, decaying spectra) and a LoRA adapter (r=16, all 7 linear modules), plus one
Llama-3-70B-shaped layer (hidden 8192, MLP 28672). In one run, interleaved, whole processes:

  8B, --layers layers, each repeat:
    certified cold   repair detect after clearing the cache (truncated base spectra computed)
    certified warm   repair detect again
    exact cold       repair detect --exact after clearing the cache (complete decompositions)
    exact warm       repair detect --exact again
    patch cold/warm  repair patch --format adapter (certified), cold and warm
    peft             bench/peft_patch.py: transformers + PEFT load, reduce_intruder_dimension, save
  8B, --rss-layers layers: certified cold detect, peak RSS
  70B, one layer: certified cold and exact cold on q_proj and down_proj (the square and the widest shape),
    then on the whole layer, all 7 modules (complete 70B decompositions take about a minute per matrix
    on this machine); the whole layer's certified time is extrapolated to 80 layers

It prints medians (min, max), ratios per repeat, the cache size as a share of the model's bytes,
peak RSS, the intruder sets of both paths (they must agree), and the extrapolation to 32 and 80 layers.

    python bench/bench_scale.py [--layers 1] [--repeats 2] [--rss-layers 4] [--skip-70b] [--device cpu]

``--device cuda`` runs every command's linear algebra (and peft's) on the GPU; ``--rss-layers 0`` skips
the memory run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, ratio, repair, run, summary
from scale_models import write_adapter, write_base

MODULES_70B = r"layers\.0\.(self_attn\.q_proj|mlp\.down_proj)"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def intruders(report: Path) -> dict[str, list[int]]:
    return {m["name"]: m["intruders"] for m in json.loads(report.read_text())["matrices"]}


def timed(label: str, rows: dict, cmd: list[str], env: dict, clear: bool = False) -> None:
    if clear:
        shutil.rmtree(env["INTRUDER_REPAIR_CACHE"], ignore_errors=True)
    print(f"  {label} ...", file=sys.stderr, flush=True)
    rows.setdefault(label, []).append(run(cmd, env))


def bench_8b(work: Path, layers: int, repeats: int, device: str) -> dict:
    base = write_base(work / "8b" / "base", "8b", layers)
    adapter = write_adapter(work / "8b" / "adapter", base, "8b", layers)
    env = {"INTRUDER_REPAIR_CACHE": str(work / "cache")}
    cert, exact = work / "cert.json", work / "exact.json"
    detect = repair("detect", str(base), str(adapter), "--device", device, "--json")
    patch = repair("patch", str(base), str(adapter), "--device", device, "--format", "adapter", "--scale", "0.5",
                   "--overwrite", "--out")
    rows: dict[str, list[tuple[float, float]]] = {}
    for i in range(repeats):
        print(f"[8b x{layers}] repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
        timed("certified cold", rows, [*detect, str(cert)], env, clear=True)
        spectra = folder_bytes(work / "cache" / "spectra")
        timed("certified warm", rows, [*detect, str(cert)], env)
        timed("exact cold", rows, [*detect, str(exact), "--exact"], env, clear=True)
        timed("exact warm", rows, [*detect, str(exact), "--exact"], env)
        timed("patch cold", rows, [*patch, str(work / "patched")], env, clear=True)
        timed("patch warm", rows, [*patch, str(work / "patched")], env)
        timed("peft", rows, [sys.executable, str(ROOT / "bench" / "peft_patch.py"), str(base), str(adapter),
                             str(work / "peft"), "--scale", "0.5", "--device", device], env)
    model = folder_bytes(base)
    print(f"\n8B-shaped, {layers} layer(s), {model / 2**20:.0f} MiB bfloat16, LoRA r=16 on 7 modules; "
          f"{repeats} interleaved repeats; --device {device}")
    for label, vals in rows.items():
        print(f"  {label:15} {summary([v[0] for v in vals])} s   peak RSS {summary([v[1] for v in vals])} MiB")
    secs = {label: [v[0] for v in vals] for label, vals in rows.items()}
    print(f"  certified vs exact, cold:  {ratio(secs['exact cold'], secs['certified cold'])}")
    print(f"  certified vs exact, warm:  {ratio(secs['exact warm'], secs['certified warm'])}")
    print(f"  peft vs certified detect, cold: {ratio(secs['peft'], secs['certified cold'])}")
    print(f"  peft vs certified patch, cold:  {ratio(secs['peft'], secs['patch cold'])}")
    print(f"  peft vs certified patch, warm:  {ratio(secs['peft'], secs['patch warm'])}")
    print(f"  spectra cache: {spectra / 2**20:.1f} MiB = {100 * spectra / model:.2f}% of the model's bytes")
    same = intruders(cert) == intruders(exact)
    print(f"  intruder sets, certified == exact: {same} ({sum(map(len, intruders(cert).values()))} intruders)")
    cold = statistics.median(secs["certified cold"]) / layers
    print(f"  extrapolated certified cold detect, 32 layers (Llama-3-8B): {32 * cold / 60:.1f} min "
          f"(exact: {32 * statistics.median(secs['exact cold']) / layers / 60:.1f} min)")
    return secs


def bench_rss(work: Path, layers: int) -> None:
    base = write_base(work / "rss" / "base", "8b", layers)
    adapter = write_adapter(work / "rss" / "adapter", base, "8b", layers)
    env = {"INTRUDER_REPAIR_CACHE": str(work / "cache-rss")}
    secs, rss = run(repair("detect", str(base), str(adapter), "--json", str(work / "rss.json")), env)
    print(f"\n8B-shaped, {layers} layers ({folder_bytes(base) / 2**30:.2f} GiB): certified cold detect "
          f"{secs:.1f} s, peak RSS {rss:.0f} MiB")
    shutil.rmtree(work / "rss")


def bench_70b(work: Path, device: str) -> None:
    base = write_base(work / "70b" / "base", "70b", 1)
    adapter = write_adapter(work / "70b" / "adapter", base, "70b", 1)
    env = {"INTRUDER_REPAIR_CACHE": str(work / "cache-70b")}
    rows: dict[str, list[tuple[float, float]]] = {}
    cert, exact = work / "cert70.json", work / "exact70.json"
    detect = repair("detect", str(base), str(adapter), "--device", device, "--modules", MODULES_70B, "--json")
    timed("certified cold", rows, [*detect, str(cert)], env, clear=True)
    timed("exact cold", rows, [*detect, str(exact), "--exact"], env, clear=True)
    whole = repair("detect", str(base), str(adapter), "--device", device, "--json")
    timed("certified cold, all 7 modules", rows, [*whole, str(work / "all70.json")], env, clear=True)
    timed("exact cold, all 7 modules", rows, [*whole, str(work / "all70-exact.json"), "--exact"], env, clear=True)
    print("\n70B-shaped layer, q_proj (8192 x 8192) and down_proj (8192 x 28672), bfloat16, LoRA r=16; cold cache; "
          f"--device {device}")
    for label, vals in rows.items():
        print(f"  {label:29} {vals[0][0]:8.1f} s   peak RSS {vals[0][1]:.0f} MiB")
    print(f"  certified vs exact (q_proj, down_proj): {rows['exact cold'][0][0] / rows['certified cold'][0][0]:.1f}x")
    print(f"  intruder sets, certified == exact: {intruders(cert) == intruders(exact)}")
    whole_ratio = rows["exact cold, all 7 modules"][0][0] / rows["certified cold, all 7 modules"][0][0]
    print(f"  certified vs exact (the whole layer, all 7 modules): {whole_ratio:.1f}x")
    print(f"  intruder sets, certified == exact: "
          f"{intruders(work / 'all70.json') == intruders(work / 'all70-exact.json')}")
    print(f"  extrapolated certified cold detect, 80 layers (Llama-3-70B): "
          f"{80 * rows['certified cold, all 7 modules'][0][0] / 60:.0f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-layers", type=int, default=4)
    ap.add_argument("--skip-70b", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where every command's linear algebra runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        bench_8b(work, args.layers, args.repeats, args.device)
        shutil.rmtree(work / "8b")
        if args.rss_layers:
            bench_rss(work, args.rss_layers)
        if not args.skip_70b:
            bench_70b(work, args.device)


if __name__ == "__main__":
    main()
