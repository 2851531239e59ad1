"""Matrix pairs from a live ``PeftModel``: W0 and the LoRA factors read from the modules in memory.

The counterpart of ``pairs.PairSource`` for a model in a notebook or a training loop. Tensor names
are those the base checkpoint would have (``model.layers.0.self_attn.q_proj.weight``), so reports
match ``repair detect`` on the saved folders. Tensors stay on their device and in their dtype; base
spectra are cached by content hash, as for files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from repair.adapters.pairs import MatrixPair, compile_modules
from repair.adapters.settings import check_lora_config
from repair.errors import CheckpointError, RepairError
from repair.io.archs import EXCLUDED_MATRICES, transposed_pattern
from repair.spectral.spectra import BaseSpectrum, tensor_key
from repair.spectral.store import SpectraCache
from repair.spectral.truncated import TruncatedSpectrum

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveMatrix:
    """One analysed matrix of the live model."""

    name: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    module: str  # module path in the transformers model, e.g. model.layers.0.self_attn.q_proj
    owner: torch.nn.Module  # the LoRA layer, or the ModulesToSaveWrapper
    transposed: bool  # stored as (in, out), e.g. GPT-2 Conv1D
    kind: str  # lora, dora, embedding or replaced (modules_to_save)


def active_adapter(model) -> str:
    """The single active adapter of a PeftModel; other models and adapter types are refused."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise RepairError(f"expected a peft PeftModel with a LoRA adapter, got {type(model).__name__}.")
    names = model.active_adapters
    if len(names) != 1:
        raise RepairError(f"the model has {len(names)} active adapters ({', '.join(names)}); activate exactly one.")
    check_lora_config(model.peft_config[names[0]], f"adapter {names[0]!r} of the model")
    return names[0]


def live_matrices(model, adapter: str) -> list[LiveMatrix]:
    """Every 2-D weight the active adapter changes, in the model's module order."""
    from peft.tuners.lora import Embedding, Linear, LoraLayer
    from peft.utils import ModulesToSaveWrapper

    root = model.base_model.model  # the transformers model: names as its checkpoint has them
    cfg = getattr(root, "config", None)
    pattern = transposed_pattern(getattr(cfg, "model_type", None))
    out: list[LiveMatrix] = []
    for module, m in root.named_modules():
        if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A):
            name = f"{module}.weight"
            if not isinstance(m, Linear | Embedding):
                raise CheckpointError(f"adapter {adapter!r}: module {module} is a LoRA {type(m).__name__} layer; "
                                      "only Linear and Embedding layers (2-D weights) are supported.")
            dora = bool(m.use_dora.get(adapter, False))
            if isinstance(m, Embedding):
                if dora:
                    raise CheckpointError(f"adapter {adapter!r}: DoRA on embedding module {module} is not supported.")
                kind = "embedding"
            else:
                kind = "dora" if dora else "lora"
                if m.lora_B[adapter].bias is not None:
                    logger.warning("adapter %r: LoRA bias of %s changes a bias, not a weight matrix; it is kept as is",
                                   adapter, module)
            transposed = bool(pattern.search(name)) if pattern else bool(getattr(m, "fan_in_fan_out", False))
            out.append(LiveMatrix(name, module, m, transposed, kind))
        elif isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save:
            for pname, p in m.original_module.named_parameters(recurse=False):
                name = f"{module}.{pname}"
                if p.ndim == 2:
                    out.append(LiveMatrix(name, module, m, bool(pattern and pattern.search(name)), "replaced"))
    return out


class _LiveBase:
    """The base weights as the detector asks for them (shape and size by tensor name)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights[name].shape)

    def float32_bytes(self, name: str) -> int:
        return self.weights[name].numel() * 4


def refuse_quantized_model(model) -> None:
    """One sentence if the model was loaded quantized: its layers hold packed weights, not W0."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is None and getattr(model, "hf_quantizer", None) is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    raise CheckpointError(
        f"the model is quantized (quant_method {method!r}); load its base unquantized (the adapter applies to it "
        f"unchanged) to analyse or patch it: quantized layers hold packed weights, not W0.")


class LivePairSource:
    """Yields ``MatrixPair`` for the active LoRA adapter of a live PeftModel (see ``pairs.PairSource``)."""

    def __init__(self, model, modules: str | None = None, spectra: SpectraCache | None = None):
        self.model = model
        refuse_quantized_model(model)
        self.adapter_name = active_adapter(model)
        self.spectra = spectra or SpectraCache(None)
        self._keys: dict[str, str] = {}
        self._memo: dict[tuple, BaseSpectrum | TruncatedSpectrum] = {}  # base spectra, computed once
        pattern = compile_modules(modules)
        every = live_matrices(model, self.adapter_name)
        wanted = [m for m in every if (pattern.search(m.name) if pattern else not EXCLUDED_MATRICES.search(m.name))]
        if not wanted:
            what = f"modules {modules!r}" if modules else "the default selection"
            raise RepairError(f"{what}: matched no weight matrix that adapter {self.adapter_name!r} changes.")
        self.every = {m.name: m for m in every}  # selected or not: an edited adapter keeps them all
        self.matrices = {m.name: m for m in sorted(wanted, key=lambda m: m.name)}  # as a one-file checkpoint
        self.names = list(self.matrices)
        self.base = _LiveBase({m.name: self._stored(m) for m in wanted})

    def _stored(self, m: LiveMatrix) -> torch.Tensor:
        """W0 as the base checkpoint stores it (layout and dtype), detached, on its device."""
        if m.kind == "replaced":
            return getattr(m.owner.original_module, m.name.rsplit(".", 1)[1]).detach()
        return m.owner.get_base_layer().weight.detach()

    def __len__(self) -> int:
        return len(self.names)

    def raw_rank(self, name: str) -> int:
        m = self.matrices[name]
        return 0 if m.kind == "replaced" else int(m.owner.r[self.adapter_name])

    def prefetch_spectra(self, workers: int, p_of: Callable[[str], int | None] | None = None, device="cpu") -> None:
        """Nothing to overlap in memory: spectra are computed as the analysis needs them."""

    def _key(self, name: str) -> str:
        if name not in self._keys:
            self._keys[name] = tensor_key(self.base.weights[name].cpu())
        return self._keys[name]

    def spectrum(self, pair: MatrixPair) -> BaseSpectrum:
        """The complete base spectrum, kept in memory after the first request (base weights are frozen)."""
        key = (pair.name, "complete")
        if key not in self._memo:
            stored = self.base.weights[pair.name].cpu()
            self._memo[key] = self.spectra.spectrum(stored, pair.transposed, self._key(pair.name))
        return self._memo[key]

    def truncated(self, pair: MatrixPair, p: int, device="cpu") -> TruncatedSpectrum:
        """The top-``p`` base spectrum, kept in memory after the first request."""
        key = (pair.name, p, str(device))
        if key not in self._memo:
            stored = self.base.weights[pair.name]
            self._memo[key] = self.spectra.truncated(stored, p, pair.transposed, self._key(pair.name), device)
        return self._memo[key]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (B, A) in (out, in) orientation, float32, as ``LoraAdapter.raw_factors`` reads them."""
        m, a = self.every[name], self.adapter_name
        if m.kind == "embedding":  # peft keeps A (r, num_embeddings), B (dim, r); delta = (B @ A).T
            return m.owner.lora_embedding_A[a].detach().float().T, m.owner.lora_embedding_B[a].detach().float().T
        return m.owner.lora_B[a].weight.detach().float(), m.owner.lora_A[a].weight.detach().float()

    def scaling(self, name: str) -> float:
        return float(self.every[name].owner.scaling[self.adapter_name])

    def magnitude(self, name: str) -> torch.Tensor:
        """DoRA's magnitude vector, float32 (out,)."""
        return self.every[name].owner.lora_magnitude_vector[self.adapter_name].weight.detach().float().reshape(-1)

    def tuned_weight(self, name: str, W0: torch.Tensor) -> torch.Tensor:
        """W_tuned (out, in) float32, in the order of operations of ``LoraAdapter.tuned_weight``."""
        B, A = self.factors(name)
        W = W0.float() + (B @ A) * self.scaling(name)
        if self.every[name].kind == "dora":
            W = (self.magnitude(name) / torch.linalg.norm(W, dim=1))[:, None] * W
        return W

    def pair(self, name: str) -> MatrixPair:
        m, stored = self.matrices[name], self.base.weights[name]
        W0 = stored.T if m.transposed else stored  # (out, in)
        if m.kind == "replaced":
            t = getattr(m.owner.modules_to_save[self.adapter_name], name.rsplit(".", 1)[1]).detach()
            return MatrixPair(name, tuple(stored.shape), m.transposed, W0, t.T if m.transposed else t)
        if m.kind == "dora":
            return MatrixPair(name, tuple(stored.shape), m.transposed, W0, self.tuned_weight(name, W0))
        B, A = self.factors(name)
        return MatrixPair(name, tuple(stored.shape), m.transposed, W0, lambda: self.tuned_weight(name, W0),
                          (B * self.scaling(name), A))
