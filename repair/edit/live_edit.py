"""The editor on a live PeftModel: a new adapter of rank r + |I| that is W' exactly, or W' merged in.

The exact counterpart of peft's ``reduce_intruder_dimension``, which truncates the patch back to rank r.
The same detection and the same factors as ``repair patch`` on the saved folders (see ``patcher``).
"""

from __future__ import annotations

import copy
import logging
import re

import torch

from repair import __version__
from repair.adapters.live import LivePairSource
from repair.adapters.pairs import MatrixPair
from repair.adapters.settings import merge_patterns
from repair.detection.detector import DetectOptions, analyse_pairs
from repair.detection.report import LivePatchReport, MatrixEdit
from repair.edit.editor import (
    MatrixPatch,
    apply_patch,
    dora_rewrite_error,
    dora_row_scale,
    extend_lora,
    make_patch,
    rewrite_error,
    truncation_error,
)
from repair.edit.edits import edit_record, stored_layout
from repair.errors import RepairError
from repair.runtime.pipeline import ordered_batches

logger = logging.getLogger(__name__)


def live_patches(src: LivePairSource, opts: DetectOptions, scale: float,
                 per_matrix: int | None = None) -> list[tuple[MatrixPair, MatrixPatch | None]]:
    """Each matrix's patch (None where it has no intruders), batched as ``repair patch`` batches them; with
    ``per_matrix``, only that many top-ranked intruders per matrix."""
    def work(names: list[str]) -> list[tuple[MatrixPair, MatrixPatch | None]]:
        found = analyse_pairs(src, names, opts, precise=True)
        return [(pair, make_patch(f.tuned, sorted(f.intruders)[:per_matrix], scale) if f.intruders else None)
                for pair, f in found]

    return list(ordered_batches(work, src.names, opts.workers, src.base.float32_bytes, opts.batch_bytes))


@torch.no_grad()
def _merge(src: LivePairSource, edits: list[tuple[MatrixPair, MatrixPatch | None]]):
    """Write W' (patched) or the plain merge (the rest) into the base weights and drop the adapter."""
    a = src.adapter_name
    for pair, patch in edits:
        m = src.matrices[pair.name]
        if patch is None or patch.is_noop:
            if m.kind != "replaced":
                m.owner.merge(adapter_names=[a])
            continue
        W = apply_patch(pair.tuned, patch)  # (out, in) float32
        if m.kind == "replaced":
            p = getattr(m.owner.modules_to_save[a], pair.name.rsplit(".", 1)[1])
        else:
            p = m.owner.get_base_layer().weight
        p.copy_(stored_layout(pair, W, p.dtype))
    for m in src.every.values():  # LoRA modules outside the selection: their plain merge
        if m.kind != "replaced" and m.name not in src.matrices:
            m.owner.merge(adapter_names=[a])
    return src.model.unload()


def _new_config(src: LivePairSource, ranks: dict[str, int]):
    """The active adapter's config with per-module r/alpha for rewritten modules (same scaling)."""
    config = copy.deepcopy(src.model.peft_config[src.adapter_name])
    rs = config.use_rslora
    ranks_by_module = {re.escape(src.matrices[n].module): r for n, r in ranks.items()}
    alpha = {re.escape(src.matrices[n].module): src.scaling(n) * (r**0.5 if rs else r) for n, r in ranks.items()}
    config.rank_pattern = merge_patterns(ranks_by_module, config.rank_pattern)
    config.alpha_pattern = merge_patterns(alpha, config.alpha_pattern)
    config.inference_mode = False
    return config


def _factors_for(src: LivePairSource, name: str, pair: MatrixPair | None, patch: MatrixPatch | None):
    """Unscaled (B', A') of the new adapter for a LoRA matrix, and its DoRA magnitude (or None)."""
    m = src.every[name]
    B, A = src.factors(name)
    if patch is None or patch.is_noop:
        return B, A, (src.magnitude(name) if m.kind == "dora" else None)
    row_scale, magnitude = None, None
    if m.kind == "dora":
        row_scale = dora_row_scale(pair.base.float() + (B @ A) * src.scaling(name), src.magnitude(name))
        magnitude = torch.linalg.norm(apply_patch(pair.tuned, patch), dim=1)
    B2, A2 = extend_lora(B, A, src.scaling(name), patch, row_scale)
    return B2, A2, magnitude


@torch.no_grad()
def _load_new(src: LivePairSource, new: str, name: str, factors) -> None:
    """Copy one matrix's factors (and DoRA magnitude) into adapter ``new``."""
    m, old = src.every[name], src.adapter_name
    B2, A2, magnitude = factors
    layer = m.owner
    if m.kind == "embedding":  # stored as A (r, num_embeddings), B (dim, r)
        layer.lora_embedding_A[new].copy_(B2.T.to(layer.lora_embedding_A[new].dtype))
        layer.lora_embedding_B[new].copy_(A2.T.to(layer.lora_embedding_B[new].dtype))
        return
    layer.lora_A[new].weight.copy_(A2.to(layer.lora_A[new].weight.dtype))
    layer.lora_B[new].weight.copy_(B2.to(layer.lora_B[new].weight.dtype))
    if layer.lora_B[old].bias is not None and layer.lora_B[new].bias is not None:
        layer.lora_B[new].bias.copy_(layer.lora_B[old].bias)
    if magnitude is not None:
        target = layer.lora_magnitude_vector[new].weight
        target.copy_(magnitude.to(target.dtype).reshape(target.shape))


def _add_adapter(src: LivePairSource, edits, new: str) -> list[MatrixEdit]:
    """Add adapter ``new`` = W' exactly, activate it, and return the edit records."""
    a = src.adapter_name
    lora = [(pair, patch, _factors_for(src, pair.name, pair, patch)) for pair, patch in edits
            if src.matrices[pair.name].kind != "replaced"]
    ranks = {pair.name: f[0].shape[1] for pair, patch, f in lora if patch is not None and not patch.is_noop}
    src.model.add_adapter(new, _new_config(src, ranks))
    with torch.no_grad():
        for m in src.every.values():  # unselected LoRA modules keep their factors
            if m.kind != "replaced" and m.name not in src.matrices:
                _load_new(src, new, m.name, _factors_for(src, m.name, None, None))
        for wrapper in {id(m.owner): m.owner for m in src.every.values() if m.kind == "replaced"}.values():
            wrapper.modules_to_save[new].load_state_dict(wrapper.modules_to_save[a].state_dict())
    factors = {pair.name: f for pair, _, f in lora}
    records = []
    for pair, patch in edits:  # in the order repair patch reports them
        m = src.matrices[pair.name]
        if m.kind != "replaced":
            _load_new(src, new, pair.name, factors[pair.name])
            if patch is not None:
                records.append(_record(src, pair, patch, factors[pair.name], _adapter_dtype(src, pair.name, new)))
        elif patch is not None:
            p = getattr(m.owner.modules_to_save[new], pair.name.rsplit(".", 1)[1])
            with torch.no_grad():
                p.copy_(stored_layout(pair, apply_patch(pair.tuned, patch), p.dtype))
            records.append(edit_record(pair, patch))
    src.model.set_adapter(new)
    return records


def _adapter_dtype(src: LivePairSource, name: str, adapter: str) -> torch.dtype:
    m = src.every[name]
    if m.kind == "embedding":
        return m.owner.lora_embedding_A[adapter].dtype
    return m.owner.lora_A[adapter].weight.dtype


def _record(src: LivePairSource, pair: MatrixPair, patch: MatrixPatch, factors, dtype: torch.dtype) -> MatrixEdit:
    """The edit record ``repair patch --format adapter`` writes, from the factors as stored in ``dtype``."""
    if patch.is_noop:
        return edit_record(pair, patch)
    name, (B2, A2, magnitude) = pair.name, factors
    B, A = src.factors(name)
    Bw, Aw = B2.to(dtype).float(), A2.to(dtype).float()
    s = src.scaling(name)
    if src.matrices[name].kind == "dora":
        m = magnitude.to(dtype).float()
        error = dora_rewrite_error(pair.base, Bw, Aw, s, m, apply_patch(pair.tuned, patch))
        return edit_record(pair, patch, adapter_rank=B2.shape[1], reconstruction_error=error)
    return edit_record(pair, patch, adapter_rank=B2.shape[1], reconstruction_error=rewrite_error(B, A, s, Bw, Aw, patch),
                       peft_truncation_error=truncation_error(B * s, A, patch, B.shape[1]))


def patch_live(model, scale: float, opts: DetectOptions, merge: bool = False, adapter_name: str | None = None,
               per_matrix: int | None = None):
    """Rescale the intruders of a live PeftModel's active adapter; see ``repair.api.patch_model``."""
    src = LivePairSource(model, opts.modules, opts.spectra())
    new = adapter_name or f"{src.adapter_name}_repaired"
    if not merge and new in model.peft_config:
        raise RepairError(f"adapter_name: the model already has an adapter {new!r}; pass another name.")
    edits = live_patches(src, opts, scale, per_matrix)
    examined = len(src)
    if merge:
        records = [edit_record(p, x) for p, x in edits if x is not None]
        merged = _merge(src, edits)
        return merged, _report(records, examined, None, opts, scale)
    records = _add_adapter(src, edits, new)
    logger.info("added adapter %r (%d matrices patched)", new, sum(r.changed for r in records))
    return model, _report(records, examined, new, opts, scale)


def _report(records: list[MatrixEdit], examined: int, adapter: str | None, opts: DetectOptions,
            scale: float) -> LivePatchReport:
    patched = [r for r in records if r.changed]
    return LivePatchReport(tool_version=__version__, adapter=adapter, scale=scale, top_k=opts.top_k,
                           epsilon=opts.epsilon, examined_matrices=examined, patched_matrices=len(patched),
                           total_intruders=sum(len(r.intruders) for r in records), matrices=records)
