"""PEFT adapters other than LoRA (LoHa, LoKr, IA³, OFT, BOFT, AdaLoRA, VeRA), merged by peft one module at a time.

Their updates are not a B·A product the low-rank path can use, so each targeted module is rebuilt
alone: a ``torch.nn.Linear`` holding the base weight (float32), placed at the module's own path in
an otherwise empty module tree, given the adapter by peft's ``inject_adapter_in_model`` (so
``target_modules`` and per-module patterns match exactly as on the full model), loaded with the
adapter's tensors for that module, and merged with peft's own ``merge()``. VeRA's random projections
are shared by all its layers (peft's injection refuses it), so its tree goes through ``get_peft_model``
and then holds the saved projections, which each layer slices to its own size. The result, W_tuned, goes
to the dense path; nothing beyond one module is ever in memory.

``MergedAdapter`` reads like a full checkpoint of the merged model: the base's tensors, with every
targeted weight (and bias, which IA³ scales) replaced by its merge. In float32 each merge is
bit-exact with ``merge_and_unload()``; for a lower-precision base it is the float32 merge rounded
once to the base's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from .errors import CheckpointError

MERGED_TYPES = ("LOHA", "LOKR", "IA3", "OFT", "BOFT", "ADALORA", "VERA")  # peft types merged per module
SHARED = {"VERA": ("vera_A", "vera_B")}  # tensors saved once for all layers, as base_model.<name>
PREFIX = "base_model.model."
ADAPTER = "default"


class MergedAdapter:
    """The base checkpoint with a non-LoRA adapter's targeted modules merged by peft (a virtual full checkpoint)."""

    def __init__(self, path: Path, base: CheckpointReader, match: Callable[[str, set[str]], str | None],
                 allow_pickle: bool = False):
        from peft import PeftConfig

        self.path, self.base = path, base
        try:
            self.config = PeftConfig.from_pretrained(str(path))
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise CheckpointError(f"{path / 'adapter_config.json'}: not a valid PEFT adapter config ({e}).") from e
        self.peft_type = getattr(self.config.peft_type, "value", self.config.peft_type)
        if getattr(self.config, "fan_in_fan_out", False):
            raise CheckpointError(f"{path}: {self.peft_type} with fan_in_fan_out (GPT-2 style Conv1D layers) is not "
                                  "supported; only LoRA adapters are read on such bases.")
        self.reader = CheckpointReader(path, prefix="adapter_model", allow_pickle=allow_pickle)
        self.shared = {n: f"base_model.{n}" for n in SHARED.get(self.peft_type, ())}
        if missing := [k for k in self.shared.values() if k not in self.reader]:
            raise CheckpointError(f"{path}: this {self.peft_type} adapter was saved without its shared projections "
                                  f"({missing[0]}; save_projection=False), which peft regenerates from the whole "
                                  "model; save it with save_projection=True, or merge it with peft and pass the "
                                  "merged model as TUNED.")
        self.targets = self._targets(set(base.names()), match)  # base weight name -> module path in the adapter
        self._biases = {n.removesuffix(".weight") + ".bias": n for n in self.targets}
        self._last: tuple[str, torch.nn.Module, dict[str, torch.dtype]] | None = None

    def _targets(self, base_names: set[str], match) -> dict[str, str]:
        """Base weight name -> adapter module path, for every module the adapter's tensors belong to."""
        out: dict[str, str] = {}
        self._keys: dict[str, list[str]] = {}  # module path -> its adapter tensors
        for key in self.reader.names():
            if key in self.shared.values():
                continue
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{self.path}: adapter tensor {key!r} does not belong to a module of the model.")
            parts = key[len(PREFIX):].split(".")
            for i in range(len(parts) - 1, 0, -1):  # the longest module path with a base weight
                module = ".".join(parts[:i])
                if (name := match(module, base_names)) is not None:
                    out[name] = module
                    self._keys.setdefault(module, []).append(key)
                    break
            else:
                raise CheckpointError(f"{self.path}: adapter tensor {key!r} updates no weight of base "
                                      f"{self.base.path}; was it trained for another base model?")
        for name in out:
            if len(self.base.shape(name)) != 2:
                raise CheckpointError(f"{self.path}: {self.peft_type} updates {name}, which is not a 2-D linear "
                                      "weight; only linear layers are supported for this adapter type.")
        return out

    @property
    def files(self) -> list[Path]:
        return self.reader.files

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def float32_bytes(self, name: str) -> int:
        return self.base.float32_bytes(name)

    def get(self, name: str) -> torch.Tensor:
        """The merged model's tensor ``name``: merged by peft where the adapter targets it, else the base's."""
        weight = name if name in self.targets else self._biases.get(name)
        if weight is None:
            return self.base.get(name)
        layer, dtypes = self._merged(weight)
        out = layer.weight if name == weight else layer.bias
        return out.detach().to(dtypes[name])  # the stored dtype, read once with the tensor

    def _merged(self, name: str) -> tuple[torch.nn.Module, dict[str, torch.dtype]]:
        """The base layer of ``name`` after peft merged the adapter into it, and the stored dtypes of its weight
        and bias (the last one is kept)."""
        last = self._last  # one read: worker threads replace it
        if last is not None and last[0] == name:
            return last[1], last[2]
        from peft import inject_adapter_in_model

        module = self.targets[name]
        # peft merges in place: copies, since a reader's tensor may share its pages with the file's mapping
        stored = {n: self.base.get(n) for n in (name, self._bias_of(name)) if n is not None}
        dtypes = {n: t.dtype for n, t in stored.items()}
        W0, *bias = (t.to(torch.float32, copy=True) for t in stored.values())  # (out, in), then the bias if any
        bias = bias[0] if bias else None
        root = _tree(module, W0, bias)
        try:  # peft's own checks of the config, and shapes that do not fit this base
            if self.shared:
                layer = self._with_shared(root, module)
            else:
                inject_adapter_in_model(copy.copy(self.config), root, adapter_name=ADAPTER)
                layer = root.get_submodule(module)
            self._load(layer, module)
            layer.merge(adapter_names=[ADAPTER])
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: peft could not apply this {self.peft_type} adapter to {module} of "
                                  f"base {self.base.path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  "was it trained for another base model?") from e
        base_layer = layer.get_base_layer()
        self._last = (name, base_layer, dtypes)
        return base_layer, dtypes

    def _with_shared(self, root: torch.nn.Module, module: str) -> torch.nn.Module:
        """peft's layer for ``module`` in ``root``, built by ``get_peft_model``, holding the saved shared tensors."""
        from peft import get_peft_model

        model = get_peft_model(root, copy.copy(self.config), adapter_name=ADAPTER)
        for name, key in self.shared.items():
            getattr(model.base_model, name)[ADAPTER] = self.reader.get(key).float()
        return model.base_model.model.get_submodule(module)

    def _bias_of(self, name: str) -> str | None:
        bias = name.removesuffix(".weight") + ".bias"
        return bias if bias in self.base else None

    def _load(self, layer: torch.nn.Module, module: str) -> None:
        """Copy the adapter's tensors for ``module`` into peft's layer; every one of them must find its place."""
        prefix = f"{PREFIX}{module}."
        wanted, loaded = set(self._keys[module]), set()
        slots = dict(layer.named_parameters()) | dict(layer.named_buffers())
        with torch.no_grad():
            for slot, tensor in slots.items():
                parts = slot.split(".")
                if ADAPTER not in parts:
                    continue
                key = prefix + ".".join(p for p in parts if p != ADAPTER)
                if key in wanted:
                    tensor.copy_(self.reader.get(key))
                    loaded.add(key)
        if missing := sorted(wanted - loaded):
            raise CheckpointError(f"{self.path}: peft's {self.peft_type} layer for {module} has no place for "
                                  f"{missing[0]}; was the adapter saved by another peft version?")


def _tree(module: str, W0: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """An otherwise empty module tree with one ``Linear`` (weight W0 (out, in)) at the dotted path ``module``."""
    root = parent = torch.nn.Module()
    *path, leaf = module.split(".")
    for part in path:
        child = torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    linear = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(W0, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    parent.add_module(leaf, linear)
    return root
