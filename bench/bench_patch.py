"""Whole-process `repair patch --format adapter` against peft's `reduce_intruder_dimension`.

On the embedded default (SmolLM2-135M) with two adapters: the bundled demo adapter (r=1, α=16) and a
seeded random r=8 adapter on every linear layer. Each repeat runs, side by side:
  peft   bench/peft_patch.py (transformers + PEFT load, reduce_intruder_dimension, save)
  cold   repair patch after `repair cache clear` (spectra, adapter settings, file hashes all empty)
  warm   repair patch again (everything cached)
and prints median (min, max) seconds and peak RSS, and the ratios peft / ours per repeat.

    python bench/bench_patch.py [--repeats 3] [--scale 0.75]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import ROOT, ratio, repair, run, summary


def random_adapter(base_dir: Path, out: Path, r: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter on every linear layer of the base, with seeded random A and B (B nonzero)."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if ".layers." in name and name.endswith("proj.weight"):
                out_f, in_f = f.get_slice(name).get_shape()
                module = name.removesuffix(".weight")
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / in_f**0.5
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear").save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted({n.split(".")[-3] for n in tensors})  # explicit names: peft needs no model
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def bench(name: str, base_dir: Path, adapter: Path, repeats: int, scale: float, work: Path) -> dict:
    rows: dict[str, list[tuple[float, float]]] = {"peft": [], "cold": [], "warm": []}
    ours = repair("patch", "smollm2-135m", str(adapter), "--format", "adapter", "--scale", str(scale),
                  "--overwrite", "--out")
    for i in range(repeats):
        print(f"[{name}] repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
        rows["peft"].append(run([sys.executable, str(ROOT / "bench" / "peft_patch.py"), str(base_dir), str(adapter),
                                 str(work / "peft"), "--scale", str(scale)]))
        run(repair("cache", "clear", "--yes"))
        rows["cold"].append(run([*ours, str(work / "cold")]))
        rows["warm"].append(run([*ours, str(work / "warm")]))
    print(f"\n{name}: seconds and peak RSS over {repeats} interleaved repeats")
    for label, vals in rows.items():
        print(f"  {label:5} {summary([v[0] for v in vals])} s   {summary([v[1] for v in vals])} MiB")
    peft = [v[0] for v in rows["peft"]]
    for label in ("cold", "warm"):
        print(f"  speed-up {label}: {ratio(peft, [v[0] for v in rows[label]])}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.75)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from repair.io.sources import ensure_embedded

    base_dir = ensure_embedded("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters = {"demo adapter (r=1, 210 modules)": ROOT / "repair" / "demo",
                    "random r=8 all-linear": random_adapter(base_dir, work / "r8")}
        for name, adapter in adapters.items():
            bench(name, base_dir, adapter, args.repeats, args.scale, work)


if __name__ == "__main__":
    main()
