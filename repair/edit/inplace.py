"""The editor applied to a model in memory: one SVD pass, then any number of λ values.

Used by sweeps: the tuned weights are loaded into a base model once, each matrix with intruders
keeps its small correction factors, and ``apply(λ)`` / ``restore()`` edit the parameters in place.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from repair.adapters.pairs import PairSource
from repair.detection.detector import DetectOptions, analyse, decisive
from repair.edit.controls import ControlKind, ControlPair, choose_controls, control_factors, spill_order
from repair.edit.editor import MatrixPatch, make_patch
from repair.edit.edits import changed_tensors
from repair.errors import CheckpointError
from repair.io.conversions import disk_slices
from repair.io.experts import split_expert_name

logger = logging.getLogger(__name__)


@dataclass
class MatrixEntry:
    """One matrix the sweep edits in place: its parameter, W_tuned, the plain merge, the intruders' and the
    controls' triplets."""


    name: str
    param: torch.nn.Parameter
    transposed: bool
    tuned: torch.Tensor  # (out, in) float32 W_tuned, the starting point of every patch
    merged: torch.Tensor  # stored layout and dtype: the plain merge, restored exactly at λ = 1
    patch: MatrixPatch  # intruders with scale 0: only U, σ, Vh are used
    spectrum: torch.Tensor  # (2k,) the leading singular values of W_tuned
    intruder_mask: torch.Tensor  # (2k,) max|cos| < ε for each of them
    controls: list[ControlPair]  # one control direction per edited intruder (empty without a control)
    spill: list[int]  # further non-intruders the matched control may use, largest σ first
    control_patch: MatrixPatch | None  # U, σ, Vh of the paired control directions, then of the spill ones


class InPlacePatcher:
    """Loads TUNED into ``model`` (built from BASE) and rescales its intruders (or, as a control, other
    directions) in place. ``per_matrix`` edits only the N top-ranked intruders of each matrix."""

    def __init__(self, model: torch.nn.Module, src: PairSource, opts: DetectOptions, per_matrix: int | None = None,
                 control: ControlKind = "none"):
        self.model, self.opts, self.control, self._src = model, opts, control, src
        self._params = {n for n, _ in model.named_parameters()}
        self._slices: dict | None = None
        self._load_tuned(src)
        self.entries: list[MatrixEntry] = []
        # 2k triplets: after the ≤ k intruders shrink, the top k of W' are among them
        for pair, _, found in analyse(src, opts, keep=2 * opts.top_k, precise=True):
            if not found.intruders:
                continue
            t = found.tuned
            lower, upper = decisive(t, opts.side)  # certified at ε for all 2k triplets
            edited = sorted(found.intruders)[:per_matrix]
            free = lower >= opts.epsilon  # certified non-intruders
            controls = [] if control == "none" else choose_controls(t.S, free, edited, control)
            spill = spill_order(t.S, free, controls) if control == "matched" and controls else []
            param = self._param(pair.name)
            self.entries.append(MatrixEntry(
                pair.name, param, pair.transposed, pair.tuned.float(), param.detach().clone(),
                make_patch(t, edited, 0.0), t.S, upper < opts.epsilon, controls, spill,
                make_patch(t, [c.control for c in controls] + spill, 0.0) if controls else None))
        self.scale = 1.0

    def patches(self) -> dict[str, MatrixPatch]:
        """The edited intruders' triplets of each matrix (λ unset), for writing the picked checkpoint exactly."""
        return {e.name: e.patch for e in self.entries}

    def param(self, name: str) -> torch.Tensor:
        """The model's tensor (or slice) that holds checkpoint tensor ``name``."""
        return self._param(name)

    def _param(self, name: str) -> torch.Tensor:
        """The model's tensor for a checkpoint name, or a view of the slice it occupies, so edits land in the
        fused parameter: one expert of a tensor fused on disk (``name[e]``), or a per-expert tensor on disk
        that transformers fused on loading (Mixtral's ``experts.3.w1.weight``, by its conversion mapping)."""
        split = split_expert_name(name)
        target = name if split is None else split[0]
        for getter in (self.model.get_parameter, self.model.get_buffer):
            try:
                tensor = getter(target)
            except AttributeError:
                continue
            return tensor if split is None else tensor[split[1]]
        if self._slices is None:  # once: every checkpoint name transformers fused on loading
            names = [n for n in self._src.base.names() if n not in self._params]
            self._slices = disk_slices(self.model, names, {n: tuple(self._src.base.shape(n)) for n in names})
        where = self._slices.get(name)
        if where is not None:
            return self.model.get_parameter(where.parameter)[where.index]
        raise CheckpointError(f"the loaded model has no parameter or buffer {target!r} to load the fine-tune into.")

    @torch.no_grad()
    def _load_tuned(self, src: PairSource) -> None:
        """Copy every tensor that the fine-tune changed (the plain merge) into the model."""
        for name, tensor in changed_tensors(src):
            p = self._param(name)
            p.copy_(tensor.to(p.dtype))

    @property
    def total_intruders(self) -> int:
        """Intruders among the top k of every matrix, edited or not (``per_matrix`` may edit fewer)."""
        return sum(int(e.intruder_mask[: self.opts.top_k].sum()) for e in self.entries)

    @torch.no_grad()
    def apply(self, scale: float, control: bool = False) -> None:
        """Set the parameters to W' for this λ (from W_tuned, so calls do not compound); ``control`` scales
        the control directions instead of the intruders."""
        for e in self.entries:
            coeff, U, Vh = self._coeff(e, scale, control)
            if coeff is None or not bool(coeff.any()):
                e.param.copy_(e.merged)
            else:
                W = e.tuned + (U * coeff) @ Vh
                e.param.copy_((W.T if e.transposed else W).to(e.param.dtype))
        self.scale = scale

    def _coeff(self, e: MatrixEntry, scale: float, control: bool):
        """(coeff (n,), U (out, n), Vh (n, in)) of the rank-n correction Σ (λ_j - 1) σ_j u_j v_jᵀ."""
        if not control:
            p = MatrixPatch(e.patch.intruders, scale, e.patch.sigma_old, e.patch.U, e.patch.Vh)
            return (None if p.is_noop else p.coeff), p.U, p.Vh
        if e.control_patch is None:
            return None, None, None
        factors = torch.tensor(self._factors(e, scale))
        return (factors - 1.0) * e.control_patch.sigma_old, e.control_patch.U, e.control_patch.Vh

    def _factors(self, e: MatrixEntry, scale: float) -> list[float]:
        """λ_c of each control direction of ``e`` (paired, then spill)."""
        return control_factors(scale, e.controls, [float(e.spectrum[j]) for j in e.spill], self.control)

    def restore(self) -> None:
        self.apply(1.0)

    def intruders_at(self, scale: float, control: bool = False) -> int:
        """Intruders among the top k of W' at this λ: W' keeps W_tuned's singular vectors, with the edited
        directions' σ multiplied by |λ| (|λ_c| for a control), so no new SVD is needed (the ≤ k intruders only
        shrink, so the top k of W' lie among the 2k triplets kept)."""
        total = 0
        for e in self.entries:
            s = e.spectrum.clone()
            if control:
                ranks = [c.control for c in e.controls] + e.spill
                for j, f in zip(ranks, self._factors(e, scale), strict=True):
                    s[j] *= abs(f)
            else:  # W' has singular values |λ| σ (λ < 0 flips u, with --allow-amplify)
                s[e.patch.intruders] *= abs(scale)
            top = torch.argsort(s, descending=True, stable=True)[: self.opts.top_k]
            total += int(e.intruder_mask[top][s[top] > 0].sum())
        return total

    def frobenius_removed(self, scale: float, control: bool = False) -> float:
        """Σ over matrices of ‖W_tuned‖_F² - ‖W'‖_F² at this λ (exact: the edited directions are singular)."""
        total = 0.0
        for e in self.entries:
            if control and e.control_patch is not None:
                sigma = e.control_patch.sigma_old.double().tolist()
                total += sum((1 - f * f) * s * s for f, s in zip(self._factors(e, scale), sigma, strict=True))
            elif not control:
                total += (1 - scale * scale) * float((e.patch.sigma_old.double() ** 2).sum())
        return total

    def control_record(self) -> dict[str, dict[str, list]]:
        """Which directions the control uses in each matrix: the pairs with their σ, and the spill order."""
        return {e.name: {"pairs": [dataclasses.asdict(c) for c in e.controls], "spill_order": e.spill}
                for e in self.entries if e.controls}
