"""Peak RSS against model size: `repair detect` and `repair patch --format adapter` stream a checkpoint.

Synthetic base checkpoints stack 2048x2048 float32 layers to about 0.1, 1 and 4 GB, each with a rank-8
LoRA adapter on every layer. The layers share one base matrix, so a single spectrum is decomposed
(once per size) and then read back from the cache per layer, exactly as distinct layers would be; the
adapter factors are all different. The peer, run side by side, is a process that loads the whole
base checkpoint with safetensors (a lower bound for any tool that holds the model in memory, as peft's
function does). The embedded default (SmolLM2-135M with the demo adapter) is measured too.

    python bench/bench_memory.py [--sizes-gb 0.1,1,4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, repair, run

sys.path.insert(0, str(ROOT))
from repair.io.writer import TensorWriter  # noqa: E402

WIDTH, R = 2048, 8
LAYER_BYTES = WIDTH * WIDTH * 4


def synthetic(folder: Path, n_layers: int) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    W0 = torch.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5
    writer = TensorWriter(base, "model", max_shard_size=2**30)  # 1 GiB shards and an index, as published models
    for i in range(n_layers):
        writer.save(f"model.layers.{i}.mlp.proj.weight", W0.clone())
    writer.finalize()
    lora = {}
    for i in range(n_layers):
        lora[f"base_model.model.model.layers.{i}.mlp.proj.lora_A.weight"] = torch.randn(R, WIDTH, generator=gen) / 45
        lora[f"base_model.model.model.layers.{i}.mlp.proj.lora_B.weight"] = torch.randn(WIDTH, R, generator=gen) / 4
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["proj"], "task_type": "CAUSAL_LM"}))
    return base, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", default="0.1,1,4")
    args = ap.parse_args()
    rows = []
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    env = {"INTRUDER_REPAIR_CACHE": cache}
    load = [sys.executable, "-c", "import sys, pathlib; from safetensors.torch import load_file; "
            "state = [load_file(f) for f in sorted(pathlib.Path(sys.argv[1]).glob('*.safetensors'))]; "
            "[float(t.sum()) for s in state for t in s.values()]"]  # touch every page, as using the model does
    demo = run(repair("detect", "smollm2-135m", str(ROOT / "repair" / "demo")))  # the user's cache: model there
    for gb in (float(g) for g in args.sizes_gb.split(",")):
        n_layers = max(1, round(gb * 1e9 / LAYER_BYTES))
        with tempfile.TemporaryDirectory() as tmp:
            base, adapter = synthetic(Path(tmp), n_layers)
            size = n_layers * LAYER_BYTES / 2**20
            run(repair("cache", "clear", "--yes"), env)
            detect = run(repair("detect", str(base), str(adapter)), env)
            patch = run(repair("patch", str(base), str(adapter), "--format", "adapter", "--scale", "0.5",
                               "--out", str(Path(tmp) / "out")), env)
            peer = run([*load, str(base)], env)
            rows.append((size, n_layers, detect, patch, peer))
            print(f"{size:.0f} MiB done", file=sys.stderr, flush=True)
    print(f"\nembedded default (SmolLM2-135M, 517 MiB float32, demo adapter): repair detect peak RSS "
          f"{demo[1]:.0f} MiB in {demo[0]:.1f} s")
    print(f"\n{'model MiB':>10} {'layers':>7} {'detect RSS':>11} {'patch RSS':>10} {'load-all RSS':>13} "
          f"{'load-all/detect':>16} {'detect s':>9}")
    for size, n, detect, patch, peer in rows:
        print(f"{size:>10.0f} {n:>7} {detect[1]:>11.0f} {patch[1]:>10.0f} {peer[1]:>13.0f} "
              f"{peer[1] / detect[1]:>15.1f}x {detect[0]:>9.1f}")
    growth = rows[-1][2][1] / rows[0][2][1]
    print(f"\ndetect RSS grows {growth:.2f}x while the model grows {rows[-1][0] / rows[0][0]:.0f}x")


if __name__ == "__main__":
    main()
