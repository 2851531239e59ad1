"""Inputs that cannot be analysed exactly are refused: quantized checkpoints and adapters trained on a mutated base.

Each case is built with transformers or peft themselves (their quantization configs, peft's PiSSA
initialisation and its conversion), and each refusal is one sentence, exit 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from repair.cli import main
from repair.errors import CheckpointError

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(base: Path, tuned: Path, root: Path, *words: str) -> None:
    """detect and patch both exit 2 with one sentence holding ``words``; nothing is written under ``root``."""
    before = _snapshot(root)
    out = root / "out"
    for cmd in (["detect", str(base), str(tuned)], ["patch", str(base), str(tuned), "--scale", "0", "--out", str(out)]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 2, res.output
        assert res.output.startswith("Error: ") and res.output.count("\n") == 1 and "Traceback" not in res.output
        assert all(w in res.output for w in words), res.output
    assert _snapshot(root) == before and not out.exists()


def _quantized_copy(base: Path, dst: Path, quant_config: dict | None, packed: dict[str, torch.Tensor]) -> Path:
    """A copy of ``base`` whose q_proj of layer 0 is replaced by ``packed`` tensors, with ``quant_config``
    (written by transformers' own config class) in config.json when given."""
    shutil.copytree(base, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors[Q_PROJ]
    tensors.update({Q_PROJ.removesuffix(".weight") + k: v for k, v in packed.items()})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    if quant_config is not None:
        cfg["quantization_config"] = quant_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _gptq_tensors(out_f: int = 64, in_f: int = 64, group: int = 32) -> dict[str, torch.Tensor]:
    return {".qweight": torch.zeros(in_f // 8, out_f, dtype=torch.int32),
            ".qzeros": torch.zeros(in_f // group, out_f // 8, dtype=torch.int32),
            ".scales": torch.ones(in_f // group, out_f, dtype=torch.float16),
            ".g_idx": torch.arange(in_f, dtype=torch.int32) // group}


def _bnb4_tensors(out_f: int = 64, in_f: int = 64) -> dict[str, torch.Tensor]:
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [out_f, in_f]})
    return {".weight": torch.zeros(out_f * in_f // 2, 1, dtype=torch.uint8),
            ".weight.absmax": torch.ones(out_f * in_f // 64), ".weight.quant_map": torch.linspace(-1, 1, 16),
            ".weight.quant_state.bitsandbytes__nf4": torch.tensor(list(state.encode()), dtype=torch.uint8)}


def _case(kind: str, base: Path, tmp: Path) -> tuple[Path, str]:
    """(quantized checkpoint, words the refusal must contain)."""
    from transformers import BitsAndBytesConfig, GPTQConfig

    if kind == "gptq":
        cfg = GPTQConfig(bits=4, group_size=32).to_dict()
        return _quantized_copy(base, tmp / "gptq", cfg, _gptq_tensors()), "quant_method 'gptq'"
    if kind == "bitsandbytes":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
        return _quantized_copy(base, tmp / "bnb", cfg, _bnb4_tensors()), "quant_method 'bitsandbytes'"
    if kind == "gptq-no-config":
        return _quantized_copy(base, tmp / "bare", None, _gptq_tensors()), "is quantized (GPTQ"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gptq", "bitsandbytes", "gptq-no-config"])
def test_quantized_base_is_refused(kind, llama_base, llama_adapter, tmp_path):
    quantized, words = _case(kind, llama_base, tmp_path)
    assert_refused(quantized, llama_adapter, tmp_path, "BASE is quantized", words, "unquantized")


def test_quantized_full_checkpoint_is_refused_as_tuned(llama_base, tmp_path):
    quantized, words = _case("bitsandbytes", llama_base, tmp_path)
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(quantized)])
    assert res.exit_code == 2 and "TUNED is quantized" in res.output and words in res.output, res.output


def test_quantized_live_model_is_refused(llama_base):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    from repair.api import detect_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.base_model.model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes'"):
        detect_model(model)


def _pissa(base: Path, tmp: Path) -> tuple[Path, Path]:
    """(unconverted PiSSA adapter, the same converted by peft to a plain LoRA of the original base)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights="pissa"))
    init = tmp / "pissa-init"
    model.peft_config["default"].init_lora_weights = True  # how peft's docs save the initial adapter
    model.save_pretrained(str(init))
    model.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp / "pissa"))
    model.save_pretrained(str(tmp / "converted"), path_initial_model_for_weight_conversion=str(init))
    return tmp / "pissa", tmp / "converted"


def test_unconverted_pissa_is_refused_and_converted_is_read(llama_base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    pissa, converted = _pissa(llama_base, work)
    assert json.loads((pissa / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    assert_refused(llama_base, pissa, tmp_path, "(PiSSA)", "path_initial_model_for_weight_conversion")

    res = CliRunner().invoke(main, ["detect", str(llama_base), str(converted), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert {m["name"] for m in report["matrices"]} == {f"model.layers.{i}.self_attn.{p}.weight"
                                                      for i in range(2) for p in ("q_proj", "v_proj")}
