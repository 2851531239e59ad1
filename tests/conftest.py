"""Shared fixtures: tiny in-process models and LoRA adapters (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def save_model(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def make_adapter(base_model_fn, base_path: Path, out: Path, seed: int = 1, b_scale: float = 1.0,
                 scales: dict[str, float] | None = None, **lora_kwargs) -> Path:
    """Save a LoRA adapter with random (non-zero) factors for the model saved at ``base_path``.

    ``scales`` multiplies lora_B of modules whose name contains a key, to plant strong or weak updates.
    """
    from peft import LoraConfig, get_peft_model

    model = base_model_fn()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                factor = b_scale
                for key, s in (scales or {}).items():
                    if key in name:
                        factor *= s
                p.mul_(factor)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    peft_model.save_pretrained(str(out))
    return out


def merged_state(base_model_fn, adapter_path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``merge_and_unload()`` on the adapter, peft's own merge."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model_fn(), str(adapter_path)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return save_model(tiny_llama(), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    return save_model(tiny_gpt2(), tmp_path_factory.mktemp("gpt2") / "base")


@pytest.fixture(scope="session")
def llama_adapter(llama_base, tmp_path_factory) -> Path:
    """r=4 LoRA on attention and MLP; layer 0 strong (intruders), layer 1 weak (none)."""
    out = tmp_path_factory.mktemp("llama") / "adapter"
    return make_adapter(tiny_llama, llama_base, out, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj"],
                        scales={"layers.0.": 1.0, "layers.1.": 1e-3})
