"""Quantized checkpoints: recognised and refused, because their stored tensors are not the weights.

A GPTQ, AWQ, bitsandbytes, compressed-tensors or FP8 checkpoint stores packed integers and scales
instead of the weight matrices that intruder dimensions are defined on, and a QLoRA adapter is
trained against the unquantized base (it only runs on a quantized copy of it). So BASE and a full
TUNED must be unquantized. A checkpoint is recognised by the ``quantization_config`` transformers
writes into ``config.json`` (its ``quant_method``) or, for a bare safetensors file, by the tensor
names these formats store; both are data here, not code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from repair.errors import CheckpointError

# name suffix -> the format that stores it (bitsandbytes 4-bit keeps its quant state next to the packed weight)
QUANTIZED_TENSOR_SUFFIXES = {
    ".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".g_idx": "GPTQ",
    ".weight.absmax": "bitsandbytes 4-bit", ".weight.quant_map": "bitsandbytes 4-bit",
    ".weight.quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
    ".weight.quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit",
    ".SCB": "bitsandbytes 8-bit", ".weight_format": "bitsandbytes 8-bit",
    ".weight_packed": "compressed-tensors", ".weight_scale_inv": "FP8 (block scales)",
}


def quant_method(folder: Path) -> str | None:
    """``quantization_config.quant_method`` of a checkpoint folder's config.json, if it has one."""
    cfg = folder / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None  # no config (a bare file) or one transformers would refuse itself: nothing claimed here
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict):
        return None
    method = quant.get("quant_method")
    if method is None and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
        method = "bitsandbytes"  # configs written before quant_method existed
    return str(method or "unknown")


def refuse_quantized(path: Path, names: Iterable[str], role: str) -> None:
    """Raise one sentence if the checkpoint at ``path`` (holding tensors ``names``) is quantized."""
    folder = path if path.is_dir() else path.parent
    method = quant_method(folder) if path.is_dir() else None
    if method is not None:
        raise CheckpointError(
            f"{folder / 'config.json'}: {role} is quantized (quant_method {method!r}); pass the unquantized "
            f"model instead: its packed tensors are not the weights, and a QLoRA adapter is trained against "
            f"the unquantized base.")
    for name in names:
        for suffix, fmt in QUANTIZED_TENSOR_SUFFIXES.items():
            if name.endswith(suffix):
                raise CheckpointError(
                    f"{path}: {role} is quantized ({fmt}: it stores {name!r}); pass the unquantized model "
                    f"instead: its packed tensors are not the weights, and a QLoRA adapter is trained against "
                    f"the unquantized base.")
