"""Load a model reference (folder, hub id, embedded name, or LoRA adapter) into memory for evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from repair.errors import RepairError
from repair.sources import ModelSource, resolve

logger = logging.getLogger(__name__)

# Architecture suffix -> transformers auto class; causal LM is the default.
AUTO_CLASS_BY_SUFFIX = {"ForMaskedLM": "AutoModelForMaskedLM"}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _auto_class(folder: Path):
    import transformers

    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    for suffix, cls in AUTO_CLASS_BY_SUFFIX.items():
        if any(a.endswith(suffix) for a in archs):
            return getattr(transformers, cls)
    return transformers.AutoModelForCausalLM


def is_masked_lm(model) -> bool:
    return any(type(model).__name__.endswith(s) for s in AUTO_CLASS_BY_SUFFIX)


def load_model(ref: str, base: str | None = None):
    """``(model, tokenizer, source)`` in eval mode; an adapter is merged onto ``base`` (or its recorded base)."""
    from transformers import AutoTokenizer

    src = resolve(ref)
    if not src.is_adapter:
        return _load_full(src), AutoTokenizer.from_pretrained(str(src.path)), src
    base_ref = base or json.loads((src.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise RepairError(f"{ref}: is a LoRA adapter with no recorded base model; pass --base.")
    from peft import PeftModel

    base_src = resolve(base_ref)
    model = PeftModel.from_pretrained(_load_full(base_src), str(src.path)).merge_and_unload()
    tok_dir = src.path if (src.path / "tokenizer_config.json").is_file() else base_src.path
    return model.eval(), AutoTokenizer.from_pretrained(str(tok_dir)), src


def _load_full(src: ModelSource):
    if not (src.path / "config.json").is_file():
        raise RepairError(f"{src.ref}: {src.path} has no config.json; expected a transformers checkpoint folder.")
    try:  # trust_remote_code stays False: a checkpoint's own Python code is never run
        model = _auto_class(src.path).from_pretrained(str(src.path), dtype="auto", trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise RepairError(f"{src.ref}: transformers could not load it without running remote code "
                          f"({str(e).splitlines()[0]}).") from e
    return model.to(device()).eval()
