"""Load a model reference (folder, hub id, embedded name, or LoRA adapter) into memory for evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from repair.errors import RepairError
from repair.io.sources import HubOptions, ModelSource, resolve
from repair.runtime.pipeline import resolve_device

logger = logging.getLogger(__name__)

# Architecture suffix -> transformers auto class; causal LM is the default.
AUTO_CLASS_BY_SUFFIX = {"ForMaskedLM": "AutoModelForMaskedLM"}
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIT_SHARE = 0.9  # a model fits a device when its weights take at most this share of the free memory


@dataclass(frozen=True)
class Placement:
    """Where evaluated models live and in which dtype.

    ``device_map="auto"`` lets accelerate spread the layers over the GPUs (then the CPU); it is
    chosen by itself when the weights do not fit the one device asked for. In-place λ edits and
    forgetting scores work on such a model as on one device.
    """

    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    device_map: str | None = None  # "auto": accelerate decides

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise RepairError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.device_map not in (None, "auto"):
            raise RepairError(f"device_map: expected auto, got {self.device_map!r}.")
        resolve_device(self.device)

    def kwargs(self, folder: Path) -> dict:
        """``from_pretrained`` keyword arguments for the checkpoint in ``folder``."""
        dev = resolve_device(self.device)
        device_map = self.device_map
        if device_map is None and dev.type == "cuda" and not _fits(folder, dev):
            logger.info("%s does not fit %s; placing it with device_map='auto'", folder, dev)
            device_map = "auto"
        return {"dtype": DTYPES[self.dtype], "device_map": device_map or str(dev)}


def _fits(folder: Path, dev: torch.device) -> bool:
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return size <= FIT_SHARE * torch.cuda.mem_get_info(dev)[0]


def _auto_class(folder: Path):
    import transformers

    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    for suffix, cls in AUTO_CLASS_BY_SUFFIX.items():
        if any(a.endswith(suffix) for a in archs):
            return getattr(transformers, cls)
    return transformers.AutoModelForCausalLM


def is_masked_lm(model) -> bool:
    return any(type(model).__name__.endswith(s) for s in AUTO_CLASS_BY_SUFFIX)


def load_model(ref: str, base: str | None = None, placement: Placement | None = None, hub: HubOptions | None = None):
    """``(model, tokenizer, source)`` in eval mode; an adapter is merged onto ``base`` (or its recorded base).

    ``hub`` fetches hub ids as the detector did (its revision and token), so both see the same weights.
    """
    from transformers import AutoTokenizer

    placement = placement or Placement()
    src = resolve(ref, hub)
    if not src.is_adapter:
        return _load_full(src, placement), AutoTokenizer.from_pretrained(str(src.path)), src
    base_ref = base or json.loads((src.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise RepairError(f"{ref}: is a LoRA adapter with no recorded base model; pass --base.")
    from peft import PeftModel

    base_src = resolve(base_ref, hub)
    model = PeftModel.from_pretrained(_load_full(base_src, placement), str(src.path)).merge_and_unload()
    tok_dir = src.path if (src.path / "tokenizer_config.json").is_file() else base_src.path
    return model.eval(), AutoTokenizer.from_pretrained(str(tok_dir)), src


def _load_full(src: ModelSource, placement: Placement):
    if not (src.path / "config.json").is_file():
        raise RepairError(f"{src.ref}: {src.path} has no config.json; expected a transformers checkpoint folder.")
    try:  # trust_remote_code stays False: a checkpoint's own Python code is never run
        model = _auto_class(src.path).from_pretrained(str(src.path), trust_remote_code=False,
                                                      **placement.kwargs(src.path))
    except (OSError, ValueError, KeyError) as e:
        raise RepairError(f"{src.ref}: transformers could not load it without running remote code "
                          f"({str(e).splitlines()[0]}).") from e
    return model.eval()


AUTO_FORGETTING_BATCH = 8  # documents per forward pass when lm-eval picks its own batch size


def check_batch_size(batch_size: int | str) -> None:
    """Documents per forward pass (and lm-eval's batch size): a positive integer, or ``auto`` (lm-eval's own
    detection; forgetting then scores 8 documents per pass)."""
    if batch_size == "auto":
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RepairError(f"batch_size: expected a positive integer or auto, got {batch_size!r}.")


def forgetting_batch(batch_size: int | str) -> int:
    return AUTO_FORGETTING_BATCH if batch_size == "auto" else int(batch_size)


def source_fingerprint(src: ModelSource) -> list:
    """Identity of a checkpoint for caches: its path and each file's size and modification time."""
    files = sorted(p for p in src.path.rglob("*") if p.is_file()) if src.path.is_dir() else [src.path]
    return [str(src.path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
