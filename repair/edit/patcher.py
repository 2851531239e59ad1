"""``repair patch``: detect, rescale and write a merged checkpoint or a PEFT adapter, in one pass."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from repair import __version__
from repair.adapters.pairs import MatrixPair, PairSource
from repair.adapters.settings import ADAPTER_CONFIG, patched_config
from repair.detection.detector import DetectOptions, analyse_pairs, prefetch
from repair.detection.report import InputFile, MatrixEdit, PatchReport, Provenance
from repair.detection.solver import solve_pairs
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
from repair.edit.edits import edit_record, plain_merge, stored_layout
from repair.edit.plan import Plan, check_per_matrix, check_scale
from repair.errors import OutputError, RepairError
from repair.io.checkpoint import file_sha256
from repair.io.experts import ExpertView
from repair.io.writer import TensorWriter, check_output_dir
from repair.runtime.durable import atomic_output_dir
from repair.runtime.pipeline import in_background, ordered_batches

logger = logging.getLogger(__name__)

SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
WEIGHT_MARKERS = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
REPORT_NAME = "repair_report.json"


@dataclass(frozen=True)
class PatchOptions:
    out: Path
    scale: float | None = None
    detect: DetectOptions = field(default_factory=DetectOptions)
    format: Literal["merged", "adapter"] = "merged"
    max_shard_size: int = 5 * 10**9
    plan: Path | None = None
    allow_amplify: bool = False
    overwrite: bool = False
    # Library use: the intruders and triplets (U, σ, Vh) of each matrix, already found (by a sweep); no detection
    # runs, so the checkpoint holds exactly W_tuned + Σ (λ-1) σ u vᵀ of these triplets at ``scale``.
    patches: Mapping[str, MatrixPatch] | None = None
    patches_from: str | None = None  # what found them, recorded in the provenance
    per_matrix: int | None = None  # scale only the N top-ranked intruders of each matrix (the paper's v2: 1)

    def validate(self, plan: Plan | None) -> None:
        self.detect.validate()
        check_per_matrix(self.per_matrix)
        if plan is not None and self.per_matrix is not None:
            raise RepairError("per_matrix: a --plan lists its intruders itself; make it with "
                              "`repair detect --plan-out PLAN --per-matrix N` instead.")
        fitted = self.patches is not None and all(p.scales is not None for p in self.patches.values())
        if self.scale is None and plan is None and not fitted:
            raise RepairError("scale: required unless --plan gives a scale for every matrix.")
        if self.scale is not None:
            check_scale(self.scale, self.allow_amplify)
        for name, entry in (plan.matrices.items() if plan else ()):
            if entry.scale is None and self.scale is None:
                raise RepairError(f"plan {self.plan}: {name} has no scale; set one or pass --scale.")
            if entry.scale is not None:
                check_scale(entry.scale, self.allow_amplify, f"plan {self.plan} ({name})")


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of the merged checkpoint, with the record of its edit where intruders were rescaled."""

    name: str
    tensor: torch.Tensor  # stored layout and dtype
    edit: MatrixEdit | None = None


@dataclass(frozen=True)
class ModuleRewrite:
    """One selected matrix of the patched adapter: its new tensors, its module's new rank, its edit record."""

    name: str  # base tensor name
    rank: int | None = None  # the rewritten LoRA module's rank r + |I| (None: the module is unchanged)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter key -> stored tensor
    record: MatrixEdit | None = None


def _edits(src: PairSource, names: list[str], opts: PatchOptions,
           plan: Plan | None) -> list[tuple[MatrixPair, MatrixPatch | None]]:
    """The patch of each matrix in a batch: from the plan, or from a fresh detection. None when untouched."""
    if opts.patches is not None:
        return [(src.pair(n), _at_scale(opts.patches[n], opts.scale) if n in opts.patches else None) for n in names]
    if plan is None:
        found = analyse_pairs(src, names, opts.detect, precise=True)
        return [(pair, make_patch(f.tuned, sorted(f.intruders)[:opts.per_matrix], opts.scale) if f.intruders else None)
                for pair, f in found]
    pairs = [src.pair(n) for n in names]
    entries = [plan.matrices.get(p.name) for p in pairs]
    todo = [i for i, e in enumerate(entries) if e is not None and e.intruders]
    k = max((max(entries[i].intruders) + 1 for i in todo), default=1)
    d = opts.detect
    solved = solve_pairs(src, [pairs[i] for i in todo], k, d.side, (), d.method, d.device, precise=True)
    out: list[tuple[MatrixPair, MatrixPatch | None]] = [(p, None) for p in pairs]
    for i, tuned in zip(todo, (s.tuned for s in solved), strict=True):
        entry = entries[i]
        if max(entry.intruders) >= tuned.S.shape[0]:
            raise RepairError(f"plan {opts.plan}: {pairs[i].name} has no singular vector {max(entry.intruders)}.")
        scale = opts.scale if entry.scale is None else entry.scale
        out[i] = (pairs[i], make_patch(tuned, sorted(entry.intruders), scale))
    return out


def _at_scale(patch: MatrixPatch, scale: float | None) -> MatrixPatch:
    """A given patch at ``--scale``; a fitted one (its own λ_i) as it is."""
    return patch if patch.scales is not None else dataclasses.replace(patch, scale=scale)


def _merged_tensors(src: PairSource, opts: PatchOptions, plan: Plan | None,
                    edits: list[MatrixEdit]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the merged checkpoint, patched where intruders were rescaled."""
    reader = src.base if src.adapter else src.tuned
    names = reader.names()
    selected = set(src.names)

    def work(batch: list[str]) -> list[MergedTensor]:
        patched: dict[str, MergedTensor] = {}
        for pair, patch in _edits(src, [n for n in batch if n in selected], opts, plan):
            if patch is None:
                patched[pair.name] = MergedTensor(pair.name, plain_merge(src, pair.name))
            elif patch.is_noop:
                patched[pair.name] = MergedTensor(pair.name, plain_merge(src, pair.name), edit_record(pair, patch))
            else:
                stored = pair.base.T if pair.transposed else pair.base
                W = stored_layout(pair, apply_patch(pair.tuned, patch), stored.dtype)
                patched[pair.name] = MergedTensor(pair.name, W, edit_record(pair, patch))
        return [patched.get(n) or MergedTensor(n, plain_merge(src, n)) for n in batch]

    results = ordered_batches(work, names, opts.detect.workers, reader.float32_bytes, opts.detect.batch_bytes)
    for done in tqdm(results, total=len(names), desc="patch", unit="tensor", disable=None):
        if done.edit is not None:
            edits.append(done.edit)
        yield done.name, done.tensor


def _rewrite_lora(src: PairSource, name: str, pair: MatrixPair, patch: MatrixPatch):
    """New adapter tensors of rank r + |I| for one module, and its report record."""
    adapter = src.adapter
    lm = src.lora_module(name)
    B, A = adapter.raw_factors(lm)  # unscaled, (out, r) and (r, in)
    row_scale = None
    if lm.is_dora:
        row_scale = dora_row_scale(pair.base.float() + adapter.delta(lm), adapter.magnitude(lm))
    B2, A2 = extend_lora(B, A, lm.scaling, patch, row_scale)
    tensors = adapter.stored_factors(lm, B2, A2)
    if lm.is_dora:
        W_new = apply_patch(pair.tuned, patch)  # (out, in)
        key = lm.keys["lora_magnitude_vector"]
        old = adapter.reader.get(key)
        tensors[key] = torch.linalg.norm(W_new, dim=1).to(old.dtype).reshape(old.shape)
        magnitude = tensors[key].float().reshape(-1)
        error = dora_rewrite_error(pair.base, *_written_factors(tensors, lm), lm.scaling, magnitude, W_new)
    else:
        error = rewrite_error(B, A, lm.scaling, *_written_factors(tensors, lm), patch)
    record = edit_record(
        pair, patch, adapter_rank=B2.shape[1], reconstruction_error=error,
        peft_truncation_error=None if lm.is_dora else truncation_error(B * lm.scaling, A, patch, lm.rank),
    )
    return tensors, B2.shape[1], record


def _written_factors(tensors: dict[str, torch.Tensor], lm) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled (B, A) in (out, in) orientation, float32, from the tensors about to be written."""
    if lm.is_embedding:
        return tensors[lm.keys["lora_embedding_A"]].float().T, tensors[lm.keys["lora_embedding_B"]].float().T
    return tensors[lm.keys["lora_B"]].float(), tensors[lm.keys["lora_A"]].float()


def _adapter_tensors(src: PairSource, opts: PatchOptions, plan: Plan | None, edits: list[MatrixEdit]):
    """All tensors of the patched adapter and the new per-module ranks."""
    adapter = src.adapter
    out = {k: adapter.reader.get(k) for k in adapter.reader.names()}  # adapters are small
    ranks: dict[str, int] = {}

    def work(batch: list[str]) -> list[ModuleRewrite]:
        results = []
        for pair, patch in _edits(src, batch, opts, plan):
            name = pair.name
            if patch is None:
                results.append(ModuleRewrite(name))
            elif patch.is_noop:
                results.append(ModuleRewrite(name, record=edit_record(pair, patch)))
            elif name in src.lora_names:
                tensors, rank, record = _rewrite_lora(src, name, pair, patch)
                results.append(ModuleRewrite(name, rank, tensors, record))
            elif name in adapter.token_rows:  # a handful of replaced rows cannot hold a patch of the matrix
                raise RepairError(f"format adapter: {name} is changed by trainable tokens (rows replaced), which "
                                  "cannot hold a patch of the whole matrix; use --format merged, or leave it out "
                                  "with --modules.")
            else:  # a modules_to_save tensor: a full matrix, patched densely
                key = adapter.replaced[name]
                tensors = {key: stored_layout(pair, apply_patch(pair.tuned, patch), out[key].dtype)}
                results.append(ModuleRewrite(name, None, tensors, edit_record(pair, patch)))
        return results

    results = ordered_batches(work, src.names, opts.detect.workers, src.base.float32_bytes, opts.detect.batch_bytes)
    for done in tqdm(results, total=len(src), desc="patch", unit="matrix", disable=None):
        out.update(done.tensors)
        if done.rank is not None:
            ranks[src.lora_names[done.name]] = done.rank
        if done.record is not None:
            edits.append(done.record)
    return out, ranks


def _adapter_config(src: PairSource, ranks: dict[str, int]) -> dict:
    """The input adapter config with per-module rank/alpha for rewritten modules (same scaling)."""
    adapter = src.adapter
    scaling = {m: adapter.settings.modules[m][1] for m in ranks}
    return patched_config(adapter.path, ranks, scaling, adapter.settings.use_rslora)


def _copy_side_files(folder: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Config and tokenizer files (never weights, never code) from a checkpoint folder."""
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if (p.is_file() and p.suffix in SIDE_FILE_SUFFIXES and p.name not in skip
                and not p.name.endswith(WEIGHT_MARKERS)):
            shutil.copyfile(p, dest / p.name)


def _provenance(src: PairSource, base: str, tuned: str, opts: PatchOptions) -> Provenance:
    """Tool, arguments and source hashes; free of output paths and times, so runs are reproducible."""
    d = opts.detect
    args = {"base": base, "tuned": tuned, "scale": opts.scale, "top_k": d.top_k, "epsilon": d.epsilon,
            "side": d.side, "modules": d.modules, "format": opts.format, "max_shard_size": opts.max_shard_size,
            "allow_amplify": opts.allow_amplify, "plan_sha256": file_sha256(opts.plan) if opts.plan else None,
            "patches_from": opts.patches_from, "per_matrix": opts.per_matrix}
    inputs = []
    for role, folder, files in (("base", src.base_source.path, src.base.files),
                                ("tuned", src.tuned_source.path, src.tuned_files())):
        configs = [folder / n for n in ("config.json", "adapter_config.json") if (folder / n).is_file()]
        inputs += [InputFile(role=role, path=str(p), sha256=file_sha256(p)) for p in [*configs, *files]]
    return Provenance(tool_version=__version__, command="patch", arguments=args, inputs=inputs)


def _write(src: PairSource, opts: PatchOptions, plan: Plan | None, tmp: Path, meta: dict[str, str],
           edits: list[MatrixEdit]) -> list[Path]:
    if opts.format == "merged":
        writer = TensorWriter(tmp, "model", opts.max_shard_size, meta)
        reader = src.base if src.adapter else src.tuned
        tensors = _merged_tensors(src, opts, plan, edits)
        for name, tensor in reader.fused(tensors) if isinstance(reader, ExpertView) else tensors:
            writer.save(name, tensor)
        files = writer.finalize()
        config_dir = src.base_source.path if src.tuned_source.is_adapter else src.tuned_source.path  # any adapter
        _copy_side_files(config_dir, tmp)
        return files
    tensors, ranks = _adapter_tensors(src, opts, plan, edits)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(_adapter_config(src, ranks), indent=2, sort_keys=True) + "\n")
    writer = TensorWriter(tmp, "adapter_model", opts.max_shard_size, meta)
    for name in sorted(tensors):
        writer.save(name, tensors[name])
    _copy_side_files(src.tuned_source.path, tmp, skip=("adapter_config.json", REPORT_NAME))
    return writer.finalize()


def check_adapter_format(src: PairSource, tuned: str) -> None:
    """``format adapter`` needs TUNED to be a PEFT LoRA adapter whose factors a LoRA of higher rank extends."""
    if src.adapter is None:
        merged = src.merged_adapter
        kind = "LoRA adapter on fused expert parameters" if merged is not None and merged.target_parameters else (
            f"{merged.peft_type} adapter" if merged is not None else "")
        what = (f"a {kind}, which is merged for analysis and has no LoRA factors to extend" if merged is not None
                else "a full checkpoint")
        raise RepairError(f"format adapter: TUNED must be a PEFT LoRA adapter, but {tuned} is {what}; "
                          "use --format merged.")
    if any("lora_E" in keys for keys in src.adapter.module_keys.values()):  # AdaLoRA, known without peft
        raise RepairError(f"format adapter: {tuned} is an AdaLoRA adapter, whose factors (B·(A ⊙ E), divided by "
                          "ranknum) a LoRA of higher rank cannot extend in its own format; use --format merged.")


def adapter_format_allowed(src: PairSource) -> bool:
    try:
        check_adapter_format(src, "")
    except RepairError:
        return False
    return True


def copy_adapter(src: PairSource, out: Path, overwrite: bool = False) -> list[Path]:
    """TUNED's adapter unchanged (λ = 1, or no intruder to edit): its config, weights and side files, copied
    atomically to ``out``."""
    folder = src.tuned_source.path
    try:
        with atomic_output_dir(out, overwrite) as tmp:
            for f in src.tuned_files():
                shutil.copyfile(f, tmp / f.name)
            _copy_side_files(folder, tmp, skip=(REPORT_NAME,))
            files = sorted(p.name for p in tmp.iterdir())
    except OSError as e:
        raise OutputError(f"out {out}: writing failed ({e.strerror or e}); nothing was written.") from e
    return [out / f for f in files]


def patch(base: str, tuned: str, opts: PatchOptions) -> PatchReport:
    """Rescale the intruders of TUNED and write the result to ``opts.out`` atomically."""
    plan = Plan.read(opts.plan) if opts.plan else None
    opts.validate(plan)
    if plan is not None and (plan.base, plan.tuned) != (base, tuned):
        logger.warning("plan %s was made for %s / %s, applying it to %s / %s",
                       opts.plan, plan.base, plan.tuned, base, tuned)
    src = opts.detect.pairs(base, tuned)
    if opts.format == "adapter":
        check_adapter_format(src, tuned)
    check_output_dir(opts.out, [src.base_source.path, src.tuned_source.path], opts.overwrite)
    hashed: list[Provenance] = []  # sha256 of the inputs releases the GIL: it overlaps the spectra
    join = in_background(lambda: hashed.append(_provenance(src, base, tuned, opts)))
    edits: list[MatrixEdit] = []
    try:
        if opts.patches is None:
            prefetch(src, opts.detect, opts.detect.top_k + 1)
        join()
        provenance = hashed[0]
        meta = {"intruder_repair": json.dumps(provenance.model_dump(), sort_keys=True)}
        with atomic_output_dir(opts.out, opts.overwrite) as tmp:
            files = _write(src, opts, plan, tmp, meta, edits)
            patched = [e for e in edits if e.changed]
            report = PatchReport(
                provenance=provenance, format=opts.format, examined_matrices=len(src),
                patched_matrices=len(patched), total_intruders=sum(len(e.intruders) for e in edits),
                matrices=edits, files=sorted(p.name for p in files),
            )
            report.write_json(tmp / REPORT_NAME)
    except OSError as e:
        raise OutputError(f"out {opts.out}: writing failed ({e.strerror or e}); nothing was written.") from e
    logger.info("wrote %s (%d matrices patched)", opts.out, len(patched))
    return report
