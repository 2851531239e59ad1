"""Mixture-of-experts weights fused in one 3-D tensor on disk, analysed and written one expert at a time.

Some checkpoints store every expert of a layer in one tensor, e.g. gpt-oss's
``model.layers.3.mlp.experts.down_proj`` (E, in, out). Each expert is its own weight matrix, so it is
analysed as one: the view below names it ``model.layers.3.mlp.experts.down_proj[7]`` and reads only
that slice. Whether a slice is stored (out, in) or (in, out) is not guessed from its shape: it is the
``is_transposed`` flag of the transformers experts class that owns the parameter (set by transformers'
``use_experts_implementation``), found by building the model from the checkpoint's config.json on the
meta device. A 3-D tensor no experts class declares is left out, with a warning naming it.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from repair.io.checkpoint import CheckpointReader

logger = logging.getLogger(__name__)

EXPERT_NAME = re.compile(r"^(?P<tensor>.+)\[(?P<index>\d+)\]$")  # model.layers.3.mlp.experts.down_proj[7]


def expert_name(tensor: str, index: int) -> str:
    return f"{tensor}[{index}]"


def split_expert_name(name: str) -> tuple[str, int] | None:
    """(fused tensor name, expert index) of a per-expert name; None for any other name."""
    m = EXPERT_NAME.match(name)
    return (m["tensor"], int(m["index"])) if m else None


def expert_layouts(folder: Path, fused: dict[str, tuple[int, ...]]) -> dict[str, bool]:
    """{fused tensor name: stored as (E, in, out)} for the 3-D tensors (name -> shape) that a transformers
    experts class of this checkpoint's architecture owns, with the same name and shape; in the model's
    parameter order."""
    if not fused or not (folder / "config.json").is_file():
        return {}
    model = meta_model(folder)
    if model is None:
        return {}
    out: dict[str, bool] = {}
    for module_name, module in model.named_modules():
        if not (hasattr(module, "is_transposed") and hasattr(module, "has_gate")):  # use_experts_implementation
            continue
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if param.ndim == 3 and fused.get(name) == tuple(param.shape):
                out[name] = bool(module.is_transposed)
    return out


def meta_model(folder: Path) -> torch.nn.Module | None:
    """The model of ``folder``'s config.json built on the meta device (no memory), by transformers' Auto tables;
    built once per config file (read it, never change it)."""
    config = Path(folder) / "config.json"
    return _built(str(config.resolve()), config.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _built(config_path: str, mtime_ns: int) -> torch.nn.Module | None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = Path(config_path).parent
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:  # an architecture this transformers does not know
        logger.warning("%s: config.json not understood by transformers (%s); fused 3-D expert tensors cannot be "
                       "oriented", folder, e)
        return None
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except (ValueError, KeyError) as e:  # not a causal LM: try the bare model
            last = e
    logger.warning("%s: transformers could not build %s (%s); fused 3-D expert tensors cannot be oriented",
                   folder, config.model_type, last)
    return None


class ExpertView:
    """A checkpoint whose fused expert tensors appear as one 2-D tensor per expert (``name[e]``), in place
    of the 3-D tensor, experts in order; every other tensor as stored."""

    def __init__(self, reader: CheckpointReader, layouts: dict[str, bool]):
        self.reader, self.layouts = reader, layouts
        self.path = reader.path
        self._names: list[str] = []
        for name in reader.names():
            if name in layouts:
                self._names += [expert_name(name, e) for e in range(reader.shape(name)[0])]
            else:
                self._names.append(name)
        self._known = set(self._names)

    @property
    def files(self) -> list[Path]:
        return self.reader.files

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def shape(self, name: str) -> tuple[int, ...]:
        split = split_expert_name(name)
        return self.reader.shape(name) if split is None else self.reader.shape(split[0])[1:]

    def float32_bytes(self, name: str) -> int:
        return 4 * math.prod(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        split = split_expert_name(name)
        return self.reader.get(name) if split is None else self.reader.get_expert(*split)

    def transposed(self, name: str) -> bool | None:
        """Whether a per-expert slice is stored (in, out); None for a tensor that is not one."""
        split = split_expert_name(name)
        return None if split is None or split[0] not in self.layouts else self.layouts[split[0]]

    def fused(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Regroup (name, tensor) in this view's order into the stored tensors: the experts of a fused tensor
        (all of them, in order) stacked back into it."""
        pending: tuple[str, list[torch.Tensor]] | None = None
        for name, tensor in tensors:
            split = split_expert_name(name)
            if split is None:
                yield name, tensor
                continue
            fused, index = split
            if pending is None or pending[0] != fused:
                pending = (fused, [])
            if index != len(pending[1]):
                raise ValueError(f"expert {name} out of order: expected index {len(pending[1])}")
            pending[1].append(tensor)
            if len(pending[1]) == self.reader.shape(fused)[0]:
                yield fused, torch.stack(pending[1])
                pending = None
        if pending is not None:
            raise ValueError(f"{pending[0]}: only {len(pending[1])} experts were written")
