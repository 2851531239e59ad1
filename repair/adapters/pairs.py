"""Pair each base weight matrix with its fine-tuned counterpart, one matrix at a time."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from repair.adapters.lora import LoraAdapter, LoraModule
from repair.adapters.merged import MergedAdapter
from repair.adapters.settings import ADAPTER_CONFIG, MERGED_TYPES
from repair.errors import CheckpointError, RepairError
from repair.io.archs import EXCLUDED_MATRICES, transposed_pattern
from repair.io.checkpoint import CheckpointReader
from repair.io.experts import ExpertView, expert_layouts, split_expert_name
from repair.io.quantized import refuse_quantized
from repair.io.readers import TensorReader, TensorShapes
from repair.io.sources import ModelSource
from repair.runtime.pipeline import LARGE_BYTES, in_background, ordered_map
from repair.spectral.spectra import BaseSpectrum, tensor_key
from repair.spectral.store import SpectraCache
from repair.spectral.truncated import TruncatedSpectrum

logger = logging.getLogger(__name__)


@dataclass
class MatrixPair:
    """A base matrix and its tuned version, both in (out, in) orientation.

    ``tuned`` may be given as a function: a LoRA pair builds the dense W_tuned only when asked,
    since the structured path needs just the factors.
    """

    name: str  # base tensor name
    shape: tuple[int, ...]  # stored shape in the base checkpoint
    transposed: bool  # stored as (in, out), e.g. GPT-2 Conv1D
    base: torch.Tensor  # (out, in), source dtype
    tuned_or_fn: torch.Tensor | Callable[[], torch.Tensor] = field(repr=False)  # (out, in)
    factors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # delta = B @ A

    @property
    def tuned(self) -> torch.Tensor:
        if callable(self.tuned_or_fn):
            self.tuned_or_fn = self.tuned_or_fn()
        return self.tuned_or_fn


@runtime_checkable
class MatrixPairSource(Protocol):
    """Where detection and editing get matrix pairs: ``PairSource`` (checkpoint folders) or
    ``live.LivePairSource`` (a PeftModel in memory). Both give pairs by base tensor name, in (out, in)
    orientation, and base spectra through a ``SpectraCache``."""

    names: list[str]  # the selected base tensor names, in checkpoint order
    base: TensorShapes  # the base weights' shapes (batching by memory)
    spectra: SpectraCache

    def __len__(self) -> int: ...

    def pair(self, name: str) -> MatrixPair: ...

    def raw_rank(self, name: str) -> int: ...  # the stored LoRA rank updating ``name``; 0 for full tensors

    def spectrum(self, pair: MatrixPair) -> BaseSpectrum: ...

    def truncated(self, pair: MatrixPair, p: int, device="cpu") -> TruncatedSpectrum: ...

    def prefetch_spectra(self, workers: int, p_of: Callable[[str], int | None] | None = None,
                         device="cpu") -> None: ...


def model_type(folder: Path) -> str | None:
    """``model_type`` from a checkpoint folder's config.json, if there is one."""
    cfg = folder / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}).") from e


def match_base_name(module: str, base_names: set[str]) -> str | None:
    """The base tensor for an adapter module, tolerating a differing leading prefix."""
    target = f"{module}.weight"
    if target in base_names:
        return target
    parts = target.split(".")
    for i in range(1, len(parts) - 1):
        if (cand := ".".join(parts[i:])) in base_names:
            return cand
    hits = [n for n in base_names if n.endswith("." + target)]
    return hits[0] if len(hits) == 1 else None


class PairSource:
    """Yields ``MatrixPair`` for a base checkpoint and a tuned checkpoint or LoRA adapter."""

    def __init__(self, base: ModelSource, tuned: ModelSource, modules: str | None = None,
                 allow_pickle: bool = False, spectra: SpectraCache | None = None, settings_dir: Path | None = None):
        """``settings_dir``: where adapter configs as peft resolved them are remembered (None: nowhere)."""
        self.base_source, self.tuned_source = base, tuned
        if base.is_adapter:
            raise CheckpointError(f"{base.path}: BASE is a LoRA adapter; expected a full model checkpoint.")
        self.spectra = spectra or SpectraCache(None)
        self._keys: dict[str, str] = {}  # base tensor name -> content hash, once computed
        self.base: TensorReader = CheckpointReader(base.path, prefix="model",
                                                                     allow_pickle=allow_pickle)
        refuse_quantized(base.path, self.base.names(), "BASE")
        peft_type = _config_field(tuned.path, "peft_type") if tuned.is_adapter else None
        fused_lora = tuned.is_adapter and bool(_config_field(tuned.path, "target_parameters"))  # peft's ParamWrapper
        merged = isinstance(peft_type, str) and (peft_type.upper() in MERGED_TYPES or fused_lora)
        self.adapter = LoraAdapter(tuned.path, allow_pickle, settings_dir) if tuned.is_adapter and not merged else None
        self.tuned: TensorReader | None = None
        if merged:  # merged by peft per module, then read as a full checkpoint
            self.tuned = MergedAdapter(tuned.path, self.base, match_base_name, allow_pickle)
        elif self.adapter is None:
            self.tuned = CheckpointReader(tuned.path, "model", allow_pickle)
        if self.tuned is not None:
            refuse_quantized(tuned.path, self.tuned.names(), "TUNED")
        self.transposed = transposed_pattern(model_type(base.path) if base.path.is_dir() else None)
        self.modules = compile_modules(modules)
        self.lora_names: dict[str, str] = {}  # base tensor name -> adapter module path (LoRA adapters)
        self.lora_biases: dict[str, str] = {}  # base bias name -> adapter module with lora_bias=True
        self._replaced: dict[str, str] = {}  # base tensor name -> adapter key replacing it whole
        if isinstance(self.tuned, CheckpointReader | MergedAdapter):  # each expert of a fused tensor is a matrix
            self._split_experts()
        self.names = self._select()
        if not self.names:
            what = f"modules {modules!r}" if modules else "the default selection"
            raise RepairError(f"{what}: matched no weight matrix to compare in {tuned.path}.")

    def _split_experts(self) -> None:
        """Show fused 3-D expert tensors one expert at a time (``experts``), where transformers orients them."""
        fused = {n: self.base.shape(n) for n in self.base.names() if len(self.base.shape(n)) == 3 and self._wanted(n)}
        if not fused or not self.base_source.path.is_dir():
            return
        layouts = expert_layouts(self.base_source.path, fused)
        if layouts:
            self.base, self.tuned = ExpertView(self.base, layouts), ExpertView(self.tuned, layouts)

    @property
    def merged_adapter(self) -> MergedAdapter | None:
        """TUNED when it is an adapter that peft merges module by module (see ``merged_adapter``)."""
        inner = self.tuned.reader if isinstance(self.tuned, ExpertView) else self.tuned
        return inner if isinstance(inner, MergedAdapter) else None

    def _wanted(self, name: str) -> bool:
        if self.modules is not None:
            return bool(self.modules.search(name))
        return not EXCLUDED_MATRICES.search(name)

    def _select(self) -> list[str]:
        if self.adapter is not None:
            base_names = set(self.base.names())
            for module in self.adapter.module_keys:
                name = match_base_name(module, base_names)
                if name is None:
                    raise CheckpointError(
                        f"{self.tuned_source.path}: adapter module {module} has no weight in base "
                        f"{self.base_source.path}; was it trained for another base model?"
                    )
                self.lora_names[name] = module
            self.lora_biases = self._lora_biases(base_names)
            whole = {**self.adapter.replaced, **self.adapter.token_rows}  # tensors the adapter replaces, not adds to
            self._replaced = {n: key for n, key in whole.items() if n in base_names and len(self.base.shape(n)) == 2}
            order = {n: i for i, n in enumerate(self.base.names())}
            return sorted((n for n in [*self.lora_names, *self._replaced] if self._wanted(n)), key=order.__getitem__)
        merged = self.merged_adapter
        targeted = set(merged.targets) if merged is not None else None  # the rest is the base's
        if targeted is not None:
            targeted |= {n for n in self.base.names() if (split := split_expert_name(n)) and split[0] in targeted}
        fused = [n for n in self.base.names() if len(self.base.shape(n)) == 3 and self._wanted(n)]
        if fused:
            logger.warning("%s: %d 3-D tensors (e.g. %s) are not analysed: no transformers experts class of this "
                           "checkpoint's config.json owns them, so their layout is unknown (experts stored one by "
                           "one, or fused in a tensor such a class declares, are analysed per expert)",
                           self.base_source.path, len(fused), fused[0])
        return [n for n in self.base.names() if (split_expert_name(n) is not None or n.endswith(".weight"))
                and len(self.base.shape(n)) == 2 and self._wanted(n) and (targeted is None or n in targeted)]

    def _lora_biases(self, base_names: set[str]) -> dict[str, str]:
        """Base bias tensor name -> adapter module, for modules trained with ``lora_bias=True``."""
        out: dict[str, str] = {}
        for name, module in self.lora_names.items():
            if "lora_B.bias" not in self.adapter.module_keys[module]:
                continue
            bias = name.removesuffix(".weight") + ".bias"
            if bias not in base_names:
                raise CheckpointError(f"{self.tuned_source.path}: module {module} has a LoRA bias (lora_bias=True), "
                                      f"but base {self.base_source.path} has no {bias} to merge it into.")
            out[bias] = module
        return out

    def is_transposed(self, name: str) -> bool:
        if isinstance(self.base, ExpertView) and (expert := self.base.transposed(name)) is not None:
            return expert  # the experts class's own layout
        if self.transposed is not None:
            return bool(self.transposed.search(name))
        return bool(self.adapter is not None and self.adapter.fan_in_fan_out)

    def lora_module(self, name: str) -> LoraModule:
        """The adapter module that updates base tensor ``name`` (resolves the adapter settings)."""
        return self.adapter.modules[self.lora_names[name]]

    def spectrum(self, pair: MatrixPair) -> BaseSpectrum:
        """The base spectrum of a pair, in its (out, in) orientation: cached, or computed and stored."""
        stored = pair.base.T if pair.transposed else pair.base
        return self.spectra.spectrum(stored, pair.transposed, self._keys.get(pair.name))

    def truncated(self, pair: MatrixPair, p: int, device="cpu") -> TruncatedSpectrum:
        """The top-``p`` base spectrum of a pair, in its (out, in) orientation: cached, or computed and stored."""
        stored = pair.base.T if pair.transposed else pair.base
        return self.spectra.truncated(stored, p, pair.transposed, self._keys.get(pair.name), device)

    def raw_rank(self, name: str) -> int:
        """The stored LoRA rank of the module updating ``name`` (0 for full tensors), without the config."""
        if self.adapter is None or name not in self.lora_names:
            return 0
        keys = self.adapter.module_keys[self.lora_names[name]]
        return self.adapter.reader.shape(keys.get("lora_A") or keys["lora_embedding_A"])[0]

    def prefetch_spectra(self, workers: int, p_of: Callable[[str], int | None] | None = None, device="cpu") -> None:
        """Compute the missing base spectra before anything needs the adapter's settings.

        When peft has to resolve those settings, it does so on a background thread meanwhile, so
        its slow import overlaps the decompositions instead of preceding them. Spectra are truncated
        to ``p_of(name)`` directions (the certified path), or complete where that is None.
        """
        if self.adapter is None or self.adapter.settings_known:
            return  # nothing to overlap: spectra are computed as the analysis needs them
        join = in_background(lambda: self.adapter.settings)
        if self.spectra.folder is not None:
            def work(name: str) -> None:
                stored = _finite(self.base.get(name), name, self.base_source.path)
                self._keys[name] = key = tensor_key(stored)
                p = None if p_of is None else p_of(name)
                if p is None and key not in self.spectra:
                    self.spectra.compute(key, stored)
                elif p is not None and not self.spectra.has_truncated(key, p):
                    self.spectra.compute_truncated(key, stored, p, device)

            for _ in tqdm(ordered_map(work, self.names, workers, depth=0, large=self._large), total=len(self.names), desc="base spectra",
                          unit="matrix", disable=None):
                pass
        join()

    def _large(self, name: str) -> bool:
        return self.base.float32_bytes(name) >= LARGE_BYTES

    def tuned_files(self) -> list[Path]:
        return (self.adapter.reader if self.adapter is not None else self.tuned).files

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[MatrixPair]:
        for name in self.names:
            yield self.pair(name)

    def pair(self, name: str) -> MatrixPair:
        """Load one matrix pair; non-finite weights are refused, naming the tensor."""
        stored = _finite(self.base.get(name), name, self.base_source.path)
        transposed = self.is_transposed(name)
        W0 = stored.T if transposed else stored  # (out, in)
        tuned_path = self.tuned_source.path
        if self.adapter is not None and name in self._replaced:  # modules_to_save: a full replacement
            t = self._same_shape(_finite(self.adapter.replacement(name, stored), name, tuned_path), stored, name)
            return MatrixPair(name, tuple(stored.shape), transposed, W0, t.T if transposed else t)
        if self.adapter is not None:
            lm = self.lora_module(name)
            if lm.is_dora:
                tuned = _finite(self.adapter.tuned_weight(lm, W0), lm.module + " (DoRA update)", tuned_path)
                return MatrixPair(name, tuple(stored.shape), transposed, W0, tuned)
            B, A = (_finite(f, lm.module + " (LoRA factors)", tuned_path) for f in self.adapter.factors(lm))
            if (B.shape[0], A.shape[1]) != tuple(W0.shape):
                raise CheckpointError(
                    f"{tuned_path}: the LoRA factors of {lm.module} imply a {(B.shape[0], A.shape[1])} update, "
                    f"but the base weight is {tuple(W0.shape)}; was the adapter trained for another base?"
                )
            return MatrixPair(name, tuple(stored.shape), transposed, W0,
                              lambda: self.adapter.tuned_weight(lm, W0), (B, A))
        if name not in self.tuned:
            raise CheckpointError(f"{tuned_path}: has no tensor {name!r}, which the base has.")
        t = self._same_shape(_finite(self.tuned.get(name), name, tuned_path), stored, name)
        return MatrixPair(name, tuple(stored.shape), transposed, W0, t.T if transposed else t)

    def _same_shape(self, t: torch.Tensor, stored: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape != stored.shape:
            raise CheckpointError(
                f"{self.tuned_source.path}: tensor {name!r} has shape {tuple(t.shape)}, but the base has "
                f"{tuple(stored.shape)}; was it fine-tuned from another base model?"
            )
        return t


def _config_field(path: Path, name: str):
    """A field of an adapter folder's config, read as JSON (None when absent or unreadable: peft reports that)."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config.get(name) if isinstance(config, dict) else None


def _finite(t: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """``t``, unless it holds NaN or Inf. A finite sum proves it (any NaN/Inf makes the sum non-finite),
    at a fraction of an element-wise check, which runs only when the sum is not finite."""
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf values.")
    return t


def compile_modules(modules: str | None) -> re.Pattern[str] | None:
    if modules is None:
        return None
    try:
        return re.compile(modules)
    except re.error as e:
        raise RepairError(f"modules: {modules!r} is not a valid regular expression ({e}).") from e
