"""PEFT LoRA adapters: per-module factors and the fine-tuned weight they imply.

Everything here is expressed in the (out_features, in_features) orientation of ``nn.Linear``;
``fan_in_fan_out`` (GPT-2's Conv1D) is handled where base weights are read.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from repair.adapters.settings import (
    ADAPTER_CONFIG,
    AdapterSettings,
    cached_settings,
    load_lora_config,
    refuse_mutated_base,
    resolve_with_peft,
    settings_key,
    store_settings,
)
from repair.errors import CheckpointError
from repair.io.checkpoint import CheckpointReader

logger = logging.getLogger(__name__)

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?(?:\.weight|\.bias)?$"
)


_TOKENS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.token_adapter\.trainable_tokens_delta$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its tensors live and how they combine."""

    module: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    keys: dict[str, str]  # part (lora_A, lora_B, ...) -> tensor name in the adapter file
    rank: int
    scaling: float
    divisor: float | None = None  # AdaLoRA: peft divides the update by ranknum + 1e-5

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.keys

    @property
    def is_dora(self) -> bool:
        return "lora_magnitude_vector" in self.keys

    @property
    def is_adalora(self) -> bool:
        """AdaLoRA: ΔW = B·(A ⊙ E)·scaling / divisor, its singular values E a (r, 1) vector."""
        return "lora_E" in self.keys

    @property
    def bias_key(self) -> str | None:
        """The adapter tensor of ``lora_bias=True`` (lora_B's bias), if any."""
        return self.keys.get("lora_B.bias")


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily tensor by tensor.

    Module names come from the tensor names alone; ranks and scalings need the config, which
    peft resolves on first use (``settings``), from the cache when it has seen this config before.
    """

    def __init__(self, path: Path | str, allow_pickle: bool = False, settings_cache: Path | None = None):
        self.path = Path(path)
        cfg = self.path / ADAPTER_CONFIG
        try:  # a syntax check now; peft parses it on first use of ``settings``
            raw = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg}: not a valid PEFT adapter config ({e}).") from e
        if isinstance(raw, dict) and "init_lora_weights" in raw:  # before any work; peft's parse checks it again
            refuse_mutated_base(raw["init_lora_weights"], str(cfg))
        self.reader = CheckpointReader(self.path, prefix="adapter_model", allow_pickle=allow_pickle)
        self.module_keys: dict[str, dict[str, str]] = self._parse_keys()
        if not self.module_keys:
            load_lora_config(self.path)  # a config peft rejects is the better explanation
            raise CheckpointError(f"{self.path}: the adapter holds no LoRA weights.")
        self.settings_cache = settings_cache
        self._settings: AdapterSettings | None = None
        self._modules: dict[str, LoraModule] | None = None
        self._lock = threading.Lock()

    @property
    def settings_known(self) -> bool:
        """Whether the settings are resolved or remembered, so ``settings`` will not import peft."""
        if self._settings is None:
            self._settings = cached_settings(self.settings_cache, self._settings_key)
        return self._settings is not None

    @functools.cached_property
    def _settings_key(self) -> str:
        return settings_key(self.path, list(self.module_keys))

    @property
    def settings(self) -> AdapterSettings:
        with self._lock:  # a background thread may be resolving them already
            if not self.settings_known:
                self._settings = resolve_with_peft(self.path, list(self.module_keys))
                store_settings(self.settings_cache, self._settings_key, self._settings)
            return self._settings

    @functools.cached_property
    def config(self):
        """The peft ``LoraConfig`` (imports peft), parsed once."""
        return load_lora_config(self.path)

    @property
    def fan_in_fan_out(self) -> bool:
        return self.settings.fan_in_fan_out

    @property
    def modules(self) -> dict[str, LoraModule]:
        if self._modules is None:
            self._modules = {mod: self._module(mod, keys) for mod, keys in self.module_keys.items()}
        return self._modules

    def _parse_keys(self) -> dict[str, dict[str, str]]:
        parts: dict[str, dict[str, str]] = {}
        self.replaced: dict[str, str] = {}  # modules_to_save: model tensor name -> adapter key
        self.token_rows: dict[str, str] = {}  # trainable tokens: embedding tensor name -> adapter key of its rows
        for name in self.reader.names():
            m = _LORA_KEY.match(name)
            if (t := _TOKENS_KEY.match(name)) is not None:
                self.token_rows[t["module"] + ".weight"] = name
            elif m is None:
                self.replaced[name.removeprefix("base_model.model.")] = name
            elif name.endswith(".bias"):  # lora_bias=True: merged into the base bias (``merged_bias``)
                parts.setdefault(m["module"], {})[f"{m['part']}.bias"] = name
            else:
                parts.setdefault(m["module"], {})[m["part"]] = name
        empty = [mod for mod, keys in parts.items() if "lora_A" in keys and self.reader.shape(keys["lora_A"])[0] == 0]
        return {mod: keys for mod, keys in sorted(parts.items()) if mod not in empty}  # AdaLoRA's rank 0: no update

    def _module(self, module: str, keys: dict[str, str]) -> LoraModule:
        a_key = keys.get("lora_A") or keys.get("lora_embedding_A")
        b_key = keys.get("lora_B") or keys.get("lora_embedding_B")
        if a_key is None or b_key is None:
            raise CheckpointError(f"{self.path}: module {module} has only one of its lora_A/lora_B factors.")
        r, scaling = self.settings.modules[module]
        stored_r = self.reader.shape(a_key)[0]
        if stored_r != r:
            raise CheckpointError(
                f"{self.path}: {a_key} has rank {stored_r}, but {ADAPTER_CONFIG} implies r={r} for {module}."
            )
        lm = LoraModule(module, keys, r, scaling, self.settings.divisors.get(module))
        if lm.is_dora and lm.is_embedding:
            raise CheckpointError(f"{self.path}: DoRA on embedding module {module} is not supported.")
        return lm

    def raw_factors(self, lm: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled ``(B, A)``, B (out, r) and A (r, in) in (out, in) orientation, float32."""
        A = self.reader.get(lm.keys.get("lora_A") or lm.keys["lora_embedding_A"]).float()
        B = self.reader.get(lm.keys.get("lora_B") or lm.keys["lora_embedding_B"]).float()
        if lm.is_embedding:  # peft stores A (r, num_embeddings), B (dim, r); delta = (B @ A).T
            A, B = B.T, A.T
        if lm.is_adalora:
            A = A * self.reader.get(lm.keys["lora_E"]).float()  # (r, in) * (r, 1): P·Λ
        return B, A

    def factors(self, lm: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B * scaling, A)``: ``delta = B_scaled @ A`` in (out, in) orientation, float32."""
        B, A = self.raw_factors(lm)
        return B * (lm.scaling if lm.divisor is None else lm.scaling / lm.divisor), A

    def delta(self, lm: LoraModule) -> torch.Tensor:
        """``(B @ A) * scaling`` (AdaLoRA: ``/ divisor`` after) in (out, in) orientation and float32, in peft's
        order of operations."""
        B, A = self.raw_factors(lm)
        delta = (B @ A) * lm.scaling
        return delta if lm.divisor is None else delta / lm.divisor

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

        Plain LoRA is bit-exact with peft's ``weight += delta``: peft loads half-precision adapter weights as
        float32 (``autocast_adapter_dtype``), so the float32 delta is added in float32 and the sum rounded once
        to the base's dtype (not the delta rounded first).
        """
        if lm.is_dora:
            W = self.tuned_weight(lm, stored.T if transposed else stored)
            return (W.T if transposed else W).to(stored.dtype).contiguous()
        delta = self.delta(lm)
        return (stored + (delta.T if transposed else delta)).to(stored.dtype)

    def merged_bias(self, lm: LoraModule, stored: torch.Tensor) -> torch.Tensor:
        """The base bias after ``merge_and_unload()`` of a ``lora_bias`` module, bit-exact with peft's in-place
        ``bias += lora_B.bias * scaling`` (computed in the promoted dtype, stored in the base's)."""
        lora_bias = self.reader.get(lm.bias_key)
        if lora_bias.dtype in (torch.float16, torch.bfloat16):
            lora_bias = lora_bias.float()  # peft loads half-precision adapter weights as float32 (autocast_adapter_dtype)
        return (stored + lora_bias * lm.scaling).to(stored.dtype)

    def replacement(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """The tuned tensor ``name`` that the adapter stores whole (``modules_to_save``) or row by row (trainable
        tokens: the base with those rows replaced, as peft's ``merge()`` does with ``index_copy``)."""
        if name in self.replaced:
            return self.reader.get(self.replaced[name])
        rows = self.reader.get(self.token_rows[name])  # (tokens, dim)
        index = torch.tensor(self.token_indices(name), dtype=torch.long)
        if rows.shape[0] != len(index) or rows.shape[1:] != stored.shape[1:] or not len(index) \
                or int(index.min()) < 0 or int(index.max()) >= stored.shape[0]:
            raise CheckpointError(f"{self.path}: the trainable tokens of {name} ({tuple(rows.shape)}, indices "
                                  f"{index.tolist()}) do not fit the base tensor {tuple(stored.shape)}; was the "
                                  "adapter trained for another base?")
        return stored.index_copy(0, index, rows.to(stored.dtype))

    def token_indices(self, name: str) -> list[int]:
        """The token ids of ``trainable_token_indices`` for the embedding tensor ``name`` (peft's config)."""
        value = self.config.trainable_token_indices
        if isinstance(value, dict):
            module = name.removesuffix(".weight")
            found = [v for k, v in value.items() if module == k or module.endswith("." + k)]
            if len(found) != 1:
                raise CheckpointError(f"{self.path / ADAPTER_CONFIG}: trainable_token_indices names no single "
                                      f"entry for {module} (keys: {sorted(value)}).")
            return _ints(found[0], self.path / ADAPTER_CONFIG)
        if not value:
            raise CheckpointError(f"{self.path / ADAPTER_CONFIG}: the adapter holds trainable tokens for {name}, "
                                  "but trainable_token_indices is empty.")
        return _ints(value, self.path / ADAPTER_CONFIG)

    def stored_factors(self, lm: LoraModule, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adapter tensors for unscaled factors B (out, r') and A (r', in), in the adapter's dtype."""
        dtype = self.reader.get(lm.keys.get("lora_A") or lm.keys["lora_embedding_A"]).dtype
        if lm.is_embedding:
            return {lm.keys["lora_embedding_A"]: B.T.to(dtype).contiguous(),
                    lm.keys["lora_embedding_B"]: A.T.to(dtype).contiguous()}
        return {lm.keys["lora_A"]: A.to(dtype), lm.keys["lora_B"]: B.to(dtype)}


def _ints(value, where: Path) -> list[int]:
    if not isinstance(value, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise CheckpointError(f"{where}: trainable_token_indices must list token ids (integers), got {value!r}.")
    return list(value)
