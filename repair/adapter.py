"""PEFT LoRA adapters: per-module factors and the fine-tuned weight they imply.

Everything here is expressed in the (out_features, in_features) orientation of ``nn.Linear``;
``fan_in_fan_out`` (GPT-2's Conv1D) is handled where base weights are read.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .errors import CheckpointError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?(?:\.weight|\.bias)?$"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its tensors live and how they combine."""

    module: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    keys: dict[str, str]  # part (lora_A, lora_B, ...) -> tensor name in the adapter file
    rank: int
    scaling: float

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.keys

    @property
    def is_dora(self) -> bool:
        return "lora_magnitude_vector" in self.keys


def load_lora_config(path: Path):
    """Parse ``adapter_config.json`` with peft and check it is a LoRA adapter."""
    from peft import LoraConfig, PeftConfig

    cfg_file = path / ADAPTER_CONFIG
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - peft raises ValueError, TypeError, JSONDecodeError...
        raise CheckpointError(f"{cfg_file}: not a valid PEFT adapter config ({e}).") from e
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "LORA" or not isinstance(config, LoraConfig):
        raise CheckpointError(f"{cfg_file}: peft_type {peft_type!r} is not supported; expected 'LORA'.")
    if getattr(config, "layer_replication", None):
        raise CheckpointError(f"{cfg_file}: layer_replication is not supported.")
    return config


def _rank_and_scaling(config, module: str) -> tuple[int, float]:
    """Per-module r and scaling exactly as peft resolves ``rank_pattern``/``alpha_pattern``."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return int(r), float(scaling)


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily tensor by tensor."""

    def __init__(self, path: Path | str, allow_pickle: bool = False):
        self.path = Path(path)
        self.config = load_lora_config(self.path)
        self.reader = CheckpointReader(self.path, prefix="adapter_model", allow_pickle=allow_pickle)
        self.modules: dict[str, LoraModule] = self._parse_modules()
        if not self.modules:
            raise CheckpointError(f"{self.path}: the adapter holds no LoRA weights.")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.fan_in_fan_out)

    def _parse_modules(self) -> dict[str, LoraModule]:
        parts: dict[str, dict[str, str]] = {}
        self.replaced: dict[str, str] = {}  # modules_to_save: model tensor name -> adapter key
        for name in self.reader.names():
            m = _LORA_KEY.match(name)
            if m is None:
                self.replaced[name.removeprefix("base_model.model.")] = name
            elif name.endswith(".bias"):
                logger.warning("%s: LoRA bias %s changes a bias, not a weight matrix; it is kept as is",
                               self.path, name)
            else:
                parts.setdefault(m["module"], {})[m["part"]] = name
        return {mod: self._module(mod, keys) for mod, keys in sorted(parts.items())}

    def _module(self, module: str, keys: dict[str, str]) -> LoraModule:
        a_key = keys.get("lora_A") or keys.get("lora_embedding_A")
        b_key = keys.get("lora_B") or keys.get("lora_embedding_B")
        if a_key is None or b_key is None:
            raise CheckpointError(f"{self.path}: module {module} has only one of its lora_A/lora_B factors.")
        r, scaling = _rank_and_scaling(self.config, module)
        stored_r = self.reader.shape(a_key)[0]
        if stored_r != r:
            raise CheckpointError(
                f"{self.path}: {a_key} has rank {stored_r}, but {ADAPTER_CONFIG} implies r={r} for {module}."
            )
        lm = LoraModule(module, keys, r, scaling)
        if lm.is_dora and lm.is_embedding:
            raise CheckpointError(f"{self.path}: DoRA on embedding module {module} is not supported.")
        return lm

    def raw_factors(self, lm: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled ``(B, A)``, B (out, r) and A (r, in) in (out, in) orientation, float32."""
        A = self.reader.get(lm.keys.get("lora_A") or lm.keys["lora_embedding_A"]).float()
        B = self.reader.get(lm.keys.get("lora_B") or lm.keys["lora_embedding_B"]).float()
        if lm.is_embedding:  # peft stores A (r, num_embeddings), B (dim, r); delta = (B @ A).T
            A, B = B.T, A.T
        return B, A

    def factors(self, lm: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B * scaling, A)``: ``delta = B_scaled @ A`` in (out, in) orientation, float32."""
        B, A = self.raw_factors(lm)
        return B * lm.scaling, A

    def delta(self, lm: LoraModule) -> torch.Tensor:
        """``(B @ A) * scaling`` in (out, in) orientation and float32, in peft's order of operations."""
        B, A = self.raw_factors(lm)
        return (B @ A) * lm.scaling

    def tuned_weight(self, lm: LoraModule, W0: torch.Tensor) -> torch.Tensor:
        """W_tuned in (out, in) orientation from the base weight W0 (out, in), float32."""
        delta = self.delta(lm)
        if delta.shape != W0.shape:
            raise CheckpointError(
                f"{self.path}: the LoRA factors of {lm.module} imply a {tuple(delta.shape)} update, "
                f"but the base weight is {tuple(W0.shape)}; was the adapter trained for another base?"
            )
        W = W0.float() + delta  # (out, in)
        if lm.is_dora:
            W = (self.magnitude(lm) / torch.linalg.norm(W, dim=1))[:, None] * W
        return W

    def magnitude(self, lm: LoraModule) -> torch.Tensor:
        """DoRA's magnitude vector, float32 (out,)."""
        return self.reader.get(lm.keys["lora_magnitude_vector"]).float().reshape(-1)

    def merged_weight(self, lm: LoraModule, stored: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The merged tensor in the base's stored layout and dtype, as ``merge_and_unload()`` computes it.

        Plain LoRA is bit-exact with peft: ``W0 + (B @ A * scaling).to(dtype)``.
        """
        if lm.is_dora:
            W = self.tuned_weight(lm, stored.T if transposed else stored)
            return (W.T if transposed else W).to(stored.dtype).contiguous()
        delta = self.delta(lm)
        return stored + (delta.T if transposed else delta).to(stored.dtype)

    def stored_factors(self, lm: LoraModule, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adapter tensors for unscaled factors B (out, r') and A (r', in), in the adapter's dtype."""
        dtype = self.reader.get(lm.keys.get("lora_A") or lm.keys["lora_embedding_A"]).dtype
        if lm.is_embedding:
            return {lm.keys["lora_embedding_A"]: B.T.to(dtype).contiguous(),
                    lm.keys["lora_embedding_B"]: A.T.to(dtype).contiguous()}
        return {lm.keys["lora_A"]: A.to(dtype), lm.keys["lora_B"]: B.to(dtype)}
