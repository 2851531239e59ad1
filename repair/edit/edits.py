"""What the file and live paths share: an edit's record, a patched matrix in its stored layout, the plain merge.

``patcher`` (files), ``inplace`` (sweeps) and ``live_edit`` (a live PeftModel) build on these, so a report
record or a merged tensor is made one way whatever path made the edit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from repair.adapters.pairs import MatrixPair, PairSource
from repair.detection.report import MatrixEdit
from repair.edit.editor import MatrixPatch
from repair.io.archs import module_type


def stored_layout(pair: MatrixPair, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) float32 -> the layout the checkpoint stores (transposed for Conv1D) and ``dtype``."""
    return to_stored(pair.transposed, W, dtype)


def to_stored(transposed: bool, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``stored_layout`` by the orientation alone (a model's parameter, no pair at hand)."""
    return (W.T if transposed else W).to(dtype).contiguous()


def edit_record(pair: MatrixPair, patch: MatrixPatch, **extra) -> MatrixEdit:
    """The report's record of one matrix's edit: intruders, λ, σ before and after (6 decimals)."""
    fitted = patch.scales is not None
    return MatrixEdit(
        name=pair.name, module_type=module_type(pair.name), intruders=patch.intruders,
        scale=None if fitted else patch.scale, scales=list(patch.scales) if fitted else None,
        directions=patch.directions,
        sigma_old=[round(float(s), 6) for s in patch.sigma_old],
        sigma_new=[round(float(s), 6) for s in patch.sigma_new], **extra,
    )


def changed_tensors(src: PairSource) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain merge of TUNED for every tensor that may differ from BASE (all, for a full checkpoint)."""
    if src.adapter is None:
        for name in src.tuned.names():
            yield name, src.tuned.get(name)
        return
    for name in src.base.names():
        if name in src.lora_names or name in src.lora_biases or name in src.adapter.replaced \
                or name in src.adapter.token_rows:
            yield name, plain_merge(src, name)


def plain_merge(src: PairSource, name: str) -> torch.Tensor:
    """TUNED's tensor ``name`` unpatched: bit-exact with ``merge_and_unload()`` for LoRA, a copy otherwise."""
    adapter = src.adapter
    if adapter is None:
        return src.tuned.get(name)
    if name in src.lora_names:
        lm = src.lora_module(name)
        return adapter.merged_weight(lm, src.base.get(name), src.is_transposed(name))
    if name in src.lora_biases:
        return adapter.merged_bias(adapter.modules[src.lora_biases[name]], src.base.get(name))
    if name in adapter.replaced or name in adapter.token_rows:
        return adapter.replacement(name, src.base.get(name))
    return src.base.get(name)
