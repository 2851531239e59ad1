"""Synthetic Llama-shaped checkpoints for ``bench_scale.py``: real layer shapes, realistic spectra, LoRA adapters.

Base weights are not plain Gaussian noise: each matrix is G · D + Σ s_i x_i y_iᵀ, with G Gaussian,
D a diagonal decaying like (1 + j/64)^-0.6 over the input dimension (a smoothly decaying bulk) and
16 spikes s_i ~ 3 σ_bulk · (1 + i)^-0.7 (the few large directions trained weights have). The LoRA
adapter (all 7 linear modules, α = 2r) has update directions of decaying strength, scaled per
module so that some reach the base's top 10 and others stay below it. Everything is seeded.

    python bench/scale_models.py OUT --shape 8b --layers 2 [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # hidden, MLP, attention heads, kv heads (head dim 128)
    "8b": (4096, 14336, 32, 8),
    "70b": (8192, 28672, 64, 8),
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 1024  # embeddings are not analysed; a small vocabulary keeps the checkpoint about the layers
STRENGTH = {"q_proj": 1.5, "k_proj": 0.4, "v_proj": 1.0, "o_proj": 0.6, "gate_proj": 1.2, "up_proj": 2.0,
            "down_proj": 0.8}  # how far each module's update reaches into the base's top singular values


def module_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear module of one decoder layer."""
    h, mlp, heads, kv = SHAPES[shape]
    kv_dim = kv * h // heads
    return {"q_proj": (h, h), "k_proj": (kv_dim, h), "v_proj": (kv_dim, h), "o_proj": (h, h),
            "gate_proj": (mlp, h), "up_proj": (mlp, h), "down_proj": (h, mlp)}


def base_matrix(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """A (out_f, in_f) bfloat16 matrix with a decaying bulk and 16 spikes."""
    decay = (1 + torch.arange(in_f, dtype=torch.float32) / 64) ** -0.6
    W = torch.randn(out_f, in_f, generator=gen) * (decay / in_f**0.5)
    bulk = float(decay.pow(2).mean().sqrt()) * (1 + (in_f / out_f) ** 0.5) * (out_f / in_f) ** 0.5
    for i in range(16):
        x, y = torch.randn(out_f, generator=gen), torch.randn(in_f, generator=gen)
        W.add_(torch.outer(x / x.norm(), y / y.norm()), alpha=3 * bulk * (1 + i) ** -0.7)
    return W.to(torch.bfloat16)


def write_base(folder: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """A transformers-loadable LlamaForCausalLM checkpoint of ``layers`` layers, sharded at 2 GB."""
    sys.path.insert(0, str(ROOT))
    from repair.io.writer import TensorWriter

    h, mlp, heads, kv = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    writer = TensorWriter(folder, "model", max_shard_size=2 * 10**9)
    writer.save("model.embed_tokens.weight", (torch.randn(VOCAB, h, generator=gen) * 0.02).to(torch.bfloat16))
    shapes = module_shapes(shape)
    for i in range(layers):
        for name in MODULES:
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            writer.save(f"model.layers.{i}.{group}.{name}.weight", base_matrix(*shapes[name], gen))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            writer.save(f"model.layers.{i}.{norm}.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.save("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.save("lm_head.weight", (torch.randn(VOCAB, h, generator=gen) * 0.02).to(torch.bfloat16))
    writer.finalize()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": mlp, "num_attention_heads": heads, "num_key_value_heads": kv,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_adapter(folder: Path, base: Path, shape: str, layers: int, r: int = 16, seed: int = 1) -> Path:
    """A PEFT LoRA adapter (float32 factors, α = 2r) on all 7 linear modules of every layer."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    strength = (1 + torch.arange(r, dtype=torch.float32)) ** -1.0  # decaying update directions
    tensors = {}
    for i in range(layers):
        for name, (out_f, in_f) in module_shapes(shape).items():
            group = "self_attn" if name in MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{group}.{name}"
            A = torch.randn(r, in_f, generator=gen) / in_f**0.5
            B = torch.randn(out_f, r, generator=gen) / out_f**0.5 * strength * STRENGTH[name] * (1 + i % 2) / 2
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": list(MODULES), "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    base = write_base(args.out / "base", args.shape, args.layers)
    write_adapter(args.out / "adapter", base, args.shape, args.layers, args.rank)


if __name__ == "__main__":
    main()
