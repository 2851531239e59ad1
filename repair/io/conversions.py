"""Checkpoint tensors that transformers fuses only in memory, mapped onto the fused parameter they become.

Mixtral and Qwen-MoE checkpoints store one tensor per expert (``block_sparse_moe.experts.3.w1.weight``);
transformers (5.0 and later) loads them into one 3-D parameter per layer (``mlp.experts.gate_up_proj``,
(E, 2·I, H)) by its conversion mapping: renamings, then ``MergeModulelist`` (stack the experts) and
``Concatenate`` (w1 then w3). This module reads that mapping (the model's own ``_weight_conversions`` when
transformers loaded it, else ``get_model_conversion_mapping``) and turns each on-disk name into the index
of the fused parameter its tensor occupies, so a slice of the in-memory parameter can be read or edited
under the checkpoint's own name. Only those two operations are interpreted; a tensor that another
operation produces is left unmapped, with a warning naming the operation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class DiskSlice:
    """Where an on-disk tensor lives in memory: ``parameter[index]`` (same shape and orientation)."""

    parameter: str  # e.g. model.layers.0.mlp.experts.gate_up_proj
    index: Index  # e.g. (3, slice(0, 48), slice(None))


def _conversions(model) -> tuple[list, list]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conversions = getattr(model, "_weight_conversions", None) or get_model_conversion_mapping(model)
    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def _index(converter, pattern: str, key: str, shape: tuple[int, ...]) -> tuple[Index, list[int | None]] | None:
    """The index into the fused tensor and the fused shape it implies (None: the expert axis), or None when an
    operation other than MergeModulelist / Concatenate is involved."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    star = re.search(pattern.replace("*", r"(\d+)"), key)  # transformers' patterns are regexes, "*" a wildcard
    index: list[int | slice] = [slice(None)] * len(shape)
    sizes: list[int | None] = list(shape)
    for op in converter.operations:
        if isinstance(op, MergeModulelist) and star is not None:
            index.insert(op.dim, int(star[1]))
            sizes.insert(op.dim, None)
        elif isinstance(op, Concatenate) and sizes[op.dim] is not None:
            n, s, size = len(converter.source_patterns), converter.source_patterns.index(pattern), sizes[op.dim]
            index[op.dim] = slice(s * size, (s + 1) * size)
            sizes[op.dim] = n * size
        else:
            logger.warning("%s: transformers converts it with %s, which is not interpreted here; it is analysed "
                           "only where it is stored as it is loaded", key, type(op).__name__)
            return None
    return tuple(index), sizes


def disk_slices(model: torch.nn.Module, names: Iterable[str], shapes: dict[str, tuple[int, ...]]) -> dict[str,
                                                                                                         DiskSlice]:
    """{on-disk name: its slice of a parameter of ``model``} for every name in ``names`` that transformers'
    conversion mapping fuses or renames (``shapes``: the on-disk shapes). ``model`` may live on the meta device."""
    try:
        from transformers.core_model_loading import apply_converters, apply_renamings

        renamings, converters = _conversions(model)
    except (ImportError, AttributeError):  # transformers before 5.0: no conversion mapping, nothing fused
        return {}
    if not converters and not renamings:
        return {}

    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out: dict[str, DiskSlice] = {}
    for name in names:
        renamed = apply_renamings(name, renamings)
        fused, pattern = apply_converters(renamed, converters)
        if pattern is None:  # only renamed (Mixtral's block_sparse_moe.gate -> mlp.gate): the whole parameter
            if renamed != name and params.get(renamed) == tuple(shapes[name]):
                out[name] = DiskSlice(renamed, ())
            continue
        if fused not in params:
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        if len(converter.target_patterns) != 1:  # one source split over several parameters: not a slice of one
            logger.warning("%s: transformers converts it into %d parameters; it is analysed as stored", name,
                           len(converter.target_patterns))
            continue
        found = _index(converter, pattern, renamed, shapes[name])
        if found is None:
            continue
        index, sizes = found
        target = params[fused]
        if len(target) != len(sizes) or any(s is not None and s != t for s, t in zip(sizes, target, strict=True)) \
                or any(isinstance(i, int) and i >= t for i, t in zip(index, target, strict=True)):
            logger.warning("%s: its place in %s %s does not follow from transformers' conversion mapping; it is "
                           "analysed as stored", name, fused, list(target))
            continue
        out[name] = DiskSlice(fused, index)
    return out


def gather(shape: tuple[int, ...], parts: list[tuple[DiskSlice, torch.Tensor]], name: str) -> torch.Tensor:
    """The fused tensor ``name`` (float32) assembled from its on-disk parts; every element must be covered."""
    out = torch.empty(shape, dtype=torch.float32)
    seen = torch.zeros(shape, dtype=torch.bool)
    for where, tensor in parts:
        if seen[where.index].any():
            raise ValueError(f"{name}: two of the checkpoint's tensors map onto the same elements")
        out[where.index] = tensor.float()
        seen[where.index] = True
    if not bool(seen.all()):
        raise ValueError(f"{name}: the checkpoint's tensors cover {int(seen.sum())} of its {out.numel()} elements")
    return out
