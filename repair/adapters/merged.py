"""PEFT adapters other than LoRA (LoHa, LoKr, IA³, OFT, BOFT, VeRA), and LoRA adapters on fused expert
parameters (``target_parameters``), merged by peft one module at a time.

Their updates are not a B·A product the low-rank path can use, so each targeted module is rebuilt
alone: a ``torch.nn.Linear`` holding the base weight (float32), placed at the module's own path in
an otherwise empty module tree, given the adapter by peft's ``inject_adapter_in_model`` (so
``target_modules`` and per-module patterns match exactly as on the full model), loaded with the
adapter's tensors for that module, and merged with peft's own ``merge()``. VeRA's random projections
are shared by all its layers (peft's injection refuses it), so its tree goes through ``get_peft_model``
and then holds the saved projections, which each layer slices to its own size. The result, W_tuned, goes
to the dense path; nothing beyond one module is ever in memory.

A LoRA adapter with ``target_parameters`` (peft's ``ParamWrapper`` on 3-D expert tensors) is merged the same
way, its experts module rebuilt as a module holding the base's fused tensors under their own names, with the
``is_transposed`` flag of transformers' experts class (``experts``): only where the fused tensor is stored
under that name on disk (gpt-oss); experts that transformers fuses only in memory (Mixtral, whose checkpoint
holds them one by one) are refused with what to pass instead.

``MergedAdapter`` reads like a full checkpoint of the merged model: the base's tensors, with every
targeted weight (and bias, which IA³ scales) replaced by its merge. In float32 each merge is
bit-exact with ``merge_and_unload()``; for a lower-precision base it is the float32 merge rounded
once to the base's dtype.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from repair.adapters.settings import refuse_target_parameters
from repair.errors import CheckpointError
from repair.io.checkpoint import CheckpointReader
from repair.io.conversions import DiskSlice, disk_slices, gather
from repair.io.experts import expert_layouts

SHARED = {"VERA": ("vera_A", "vera_B")}  # tensors saved once for all layers, as base_model.<name>
PREFIX = "base_model.model."
ADAPTER = "default"


@dataclass(frozen=True)
class InMemoryExperts:
    """An experts module whose targeted parameters transformers fuses on loading (Mixtral, Qwen-MoE)."""

    params: list[str]  # the targeted fused parameters, in the class's parameter order
    shapes: dict[str, tuple[int, ...]]  # their fused shapes
    disk: dict[str, list[str]]  # parameter -> the on-disk tensors it is made of
    transposed: bool  # transformers' is_transposed flag of the experts class


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
        self.target_parameters = list(getattr(self.config, "target_parameters", None) or [])
        self.in_memory: dict[str, InMemoryExperts] = {}  # module path -> experts fused only in memory (Mixtral)
        self.slices: dict[str, DiskSlice] = {}  # on-disk expert tensor -> its slice of the fused parameter
        if self.target_parameters:
            self._find_in_memory_experts(base)
        self.targets = self._targets(set(base.names()), match)  # base weight name -> module path in the adapter
        self._biases = {n.removesuffix(".weight") + ".bias": n for n in self.targets}
        self._last: tuple[str, torch.nn.Module, dict[str, torch.dtype]] | None = None
        fused = {n: base.shape(n) for n in self.targets if len(base.shape(n)) == 3}
        self.layouts = expert_layouts(base.path, fused) if fused else {}  # fused name -> stored (E, in, out)
        if unknown := sorted(set(fused) - set(self.layouts)):
            refuse_target_parameters(self.target_parameters, f"{path / 'adapter_config.json'} ({unknown[0]} is "
                                     "fused on disk, but no transformers experts class of BASE's config owns it)")

    def _targets(self, base_names: set[str], match) -> dict[str, str]:
        """Base weight name -> adapter module path, for every module the adapter's tensors belong to."""
        out: dict[str, str] = {}
        self._keys: dict[str, list[str]] = {}  # module path -> its adapter tensors
        fused = self._fused_targets(base_names)
        for key in self.reader.names():
            if key in self.shared.values():
                continue
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{self.path}: adapter tensor {key!r} does not belong to a module of the model.")
            parts = key[len(PREFIX):].split(".")
            for i in range(len(parts) - 1, 0, -1):  # the longest module path with a base weight
                module = ".".join(parts[:i])
                names = fused.get(module) or [match(module, base_names)]
                if names[0] is not None:
                    out.update(dict.fromkeys(names, module))
                    self._keys.setdefault(module, []).append(key)
                    break
            else:
                if self.target_parameters:  # experts transformers fuses only in memory: not in this checkpoint
                            refuse_target_parameters(self.target_parameters, str(self.path / "adapter_config.json"))
                raise CheckpointError(f"{self.path}: adapter tensor {key!r} updates no weight of base "
                                      f"{self.base.path}; was it trained for another base model?")
        for name in out:
            if len(self.base.shape(name)) == 3 and self.target_parameters:
                continue  # an expert tensor, merged by peft's ParamWrapper
            if len(self.base.shape(name)) != 2:
                raise CheckpointError(f"{self.path}: {self.peft_type} updates {name}, which is not a 2-D linear "
                                      "weight; only linear layers are supported for this adapter type.")
        return out

    def _fused_targets(self, base_names: set[str]) -> dict[str, list[str]]:
        """Module path -> the 3-D base tensors ``module.<param>`` that ``target_parameters`` names (peft's rule:
        the whole name, or a suffix after a dot)."""
        out: dict[str, list[str]] = {}
        for n in sorted(base_names) if self.target_parameters else []:
            if len(self.base.shape(n)) == 3 and self._targeted(n):
                out.setdefault(n.rpartition(".")[0], []).append(n)
        for module, experts in self.in_memory.items():
            out[module] = [n for param in experts.params for n in experts.disk[param]]
        return out

    def _targeted(self, param: str) -> bool:
        return any(param == t or param.endswith("." + t) for t in self.target_parameters)

    def _find_in_memory_experts(self, base: CheckpointReader) -> None:
        """Experts modules whose targeted parameters transformers fuses on loading from per-expert tensors on
        disk (its conversion mapping, read on the model built from BASE's config.json on the meta device)."""
        from repair.io.experts import meta_model

        names = [n for n in base.names() if len(base.shape(n)) == 2]
        if not (base.path / "config.json").is_file() or (meta := meta_model(base.path)) is None:
            return
        self.slices = {n: s for n, s in disk_slices(meta, names, {n: tuple(base.shape(n)) for n in names}).items()
                       if self._targeted(s.parameter)}
        for module_name, module in meta.named_modules():
            params = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            disk = {p: [n for n, s in self.slices.items() if s.parameter == p] for p in params}
            if any(disk.values()):
                self.in_memory[module_name] = InMemoryExperts(
                    [p for p in params if disk[p]], {p: tuple(meta.get_parameter(p).shape) for p in params},
                    {p: v for p, v in disk.items() if v}, bool(getattr(module, "is_transposed", False)))

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
        if (where := self.slices.get(name)) is not None:  # one expert's slice of a parameter fused in memory
            return getattr(layer, where.parameter.rpartition(".")[2])[where.index].detach().to(dtypes[name])
        out = getattr(layer, weight.rpartition(".")[2]) if name == weight else layer.bias
        return out.detach().to(dtypes[name])  # the stored dtype, read once with the tensor

    def get_expert(self, name: str, index: int) -> torch.Tensor:
        """Expert ``index`` of a fused tensor: of the merge where the adapter targets it, else of the base's."""
        if name not in self.targets:
            return self.base.get_expert(name, index)
        layer, dtypes = self._merged(name)
        return getattr(layer, name.rpartition(".")[2])[index].detach().to(dtypes[name])

    def _merged(self, name: str) -> tuple[torch.nn.Module, dict[str, torch.dtype]]:
        """The base layer of ``name`` after peft merged the adapter into it, and the stored dtypes of its weight
        and bias (the last one is kept)."""
        module = self.targets[name]
        last = self._last  # one read: worker threads replace it
        if last is not None and last[0] == module:
            return last[1], last[2]
        from peft import inject_adapter_in_model

        # peft merges in place: copies, since a reader's tensor may share its pages with the file's mapping
        fused = [n for n in self.layouts if self.targets.get(n) == module]  # in the class's parameter order,
        # which decides how peft nests the ParamWrappers of one module (and so where each saved tensor goes)
        if module in self.in_memory:  # experts fused only in memory: assembled from their on-disk tensors
            root, dtypes = self._in_memory_tree(module)
        else:
            root, dtypes = self._tree_of(module, name, fused)
        try:  # peft's own checks of the config, and shapes that do not fit this base
            if self.shared:
                layer = self._with_shared(root, module)
            else:
                with warnings.catch_warnings():  # a one-module tree holds only one kind of the adapter's targets;
                    # every saved tensor must still find its place (``_load``)
                    warnings.filterwarnings("ignore", r"target_(modules|parameters)=.* no (module|parameter) was matched")
                    inject_adapter_in_model(copy.copy(self.config), root, adapter_name=ADAPTER)
                layer = root.get_submodule(module)
            self._load(layer, module)
            for tuner in [m for m in layer.modules() if hasattr(m, "merge") and hasattr(m, "get_base_layer")]:
                tuner.merge(adapter_names=[ADAPTER])  # nested ParamWrappers: each merges its own parameter
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: peft could not apply this {self.peft_type} adapter to {module} of "
                                  f"base {self.base.path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  "was it trained for another base model?") from e
        base_layer = layer.get_base_layer()
        self._last = (module, base_layer, dtypes)
        return base_layer, dtypes

    def _tree_of(self, module: str, name: str, fused: list[str]) -> tuple[torch.nn.Module, dict[str, torch.dtype]]:
        """The module tree holding ``module``'s stored tensors (float32 copies) and their stored dtypes."""
        names = fused or [n for n in (name, self._bias_of(name)) if n is not None]
        stored = {n: self.base.get(n) for n in names}
        dtypes = {n: t.dtype for n, t in stored.items()}
        work = [t.to(torch.float32, copy=True) for t in stored.values()]
        if fused:  # the experts module: its targeted fused tensors under their own names
            return _tree(module, _experts({n.rpartition(".")[2]: w for n, w in zip(names, work, strict=True)},
                                          self.layouts[fused[0]])), dtypes
        return _tree(module, _linear(work[0], work[1] if len(work) > 1 else None)), dtypes  # W0 (out, in), bias

    def _in_memory_tree(self, module: str) -> tuple[torch.nn.Module, dict[str, torch.dtype]]:
        """The experts module as transformers builds it in memory, from the per-expert tensors on disk."""
        experts = self.in_memory[module]
        params, dtypes = {}, {}
        for param in experts.params:
            parts = [(self.slices[n], self.base.get(n)) for n in experts.disk[param]]
            dtypes.update({n: t.dtype for n, (_, t) in zip(experts.disk[param], parts, strict=True)})
            try:
                params[param.rpartition(".")[2]] = gather(experts.shapes[param], parts, param)
            except ValueError as e:
                raise CheckpointError(f"{self.base.path}: {e}; the experts of {module} are not all there.") from e
        return _tree(module, _experts(params, experts.transposed)), dtypes

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


def _tree(module: str, leaf_module: torch.nn.Module) -> torch.nn.Module:
    """An otherwise empty module tree with ``leaf_module`` at the dotted path ``module``."""
    root = parent = torch.nn.Module()
    *path, leaf = module.split(".")
    for part in path:
        child = torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, leaf_module)
    return root


def _linear(W0: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """A ``Linear`` holding W0 (out, in) and the bias."""
    linear = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(W0, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


def _experts(params: dict[str, torch.Tensor], transposed: bool) -> torch.nn.Module:
    """An experts module as peft's ParamWrapper sees one: its fused (E, ·, ·) tensors, and transformers'
    ``is_transposed`` flag of the class that owns them (peft reads it to know which side is the input)."""
    module = torch.nn.Module()
    for name, tensor in params.items():
        module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    module.is_transposed = transposed
    return module
