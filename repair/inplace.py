"""The editor applied to a model in memory: one SVD pass, then any number of λ values.

Used by sweeps: the tuned weights are loaded into a base model once, each matrix with intruders
keeps its small correction factors, and ``apply(λ)`` / ``restore()`` edit the parameters in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .detector import DetectOptions, analyse, decisive
from .editor import MatrixPatch, make_patch
from .errors import CheckpointError
from .pairs import PairSource

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    param: torch.nn.Parameter
    transposed: bool
    tuned: torch.Tensor  # (out, in) float32 W_tuned, the starting point of every patch
    merged: torch.Tensor  # stored layout and dtype: the plain merge, restored exactly at λ = 1
    patch: MatrixPatch  # intruders with scale 0: only U, σ, Vh are used
    spectrum: torch.Tensor  # (2k,) the leading singular values of W_tuned
    intruder_mask: torch.Tensor  # (2k,) max|cos| < ε for each of them


class InPlacePatcher:
    """Loads TUNED into ``model`` (built from BASE) and rescales its intruders in place."""

    def __init__(self, model: torch.nn.Module, src: PairSource, opts: DetectOptions):
        self.model, self.opts = model, opts
        self._load_tuned(src)
        self.entries: list[_Entry] = []
        # 2k triplets: after the ≤ k intruders shrink, the top k of W' are among them
        for pair, _, found in analyse(src, opts, keep=2 * opts.top_k, precise=True):
            if not found.intruders:
                continue
            t = found.tuned
            upper = decisive(t, opts.side)[1]  # certified at ε for all 2k triplets
            param = self._param(pair.name)
            self.entries.append(_Entry(pair.name, param, pair.transposed, pair.tuned.float(), param.detach().clone(),
                                       make_patch(t, found.intruders, 0.0), t.S, upper < opts.epsilon))
        self.scale = 1.0

    def _param(self, name: str) -> torch.Tensor:
        for getter in (self.model.get_parameter, self.model.get_buffer):
            try:
                return getter(name)
            except AttributeError:
                continue
        raise CheckpointError(f"the loaded model has no parameter or buffer {name!r} to load the fine-tune into.")

    @torch.no_grad()
    def _load_tuned(self, src: PairSource) -> None:
        """Copy every tensor that the fine-tune changed (the plain merge) into the model."""
        from .patcher import changed_tensors

        for name, tensor in changed_tensors(src):
            p = self._param(name)
            p.copy_(tensor.to(p.dtype))

    @property
    def total_intruders(self) -> int:
        return sum(len(e.patch.intruders) for e in self.entries)

    @torch.no_grad()
    def apply(self, scale: float) -> None:
        """Set the parameters to W' for this λ (from W_tuned, so calls do not compound)."""
        for e in self.entries:
            p = MatrixPatch(e.patch.intruders, scale, e.patch.sigma_old, e.patch.U, e.patch.Vh)
            if p.is_noop:
                e.param.copy_(e.merged)
            else:
                W = e.tuned + p.correction()
                e.param.copy_((W.T if e.transposed else W).to(e.param.dtype))
        self.scale = scale

    def restore(self) -> None:
        self.apply(1.0)

    def intruders_at(self, scale: float) -> int:
        """Intruders among the top k of W' at this λ: W' keeps W_tuned's singular vectors, with the
        intruders' σ multiplied by |λ|, so no new SVD is needed (the ≤ k intruders only shrink, so the
        top k of W' lie among the 2k triplets kept)."""
        total = 0
        for e in self.entries:
            s = e.spectrum.clone()
            s[e.patch.intruders] *= abs(scale)  # W' has singular values |λ| σ (λ < 0 flips u, with --allow-amplify)
            top = torch.argsort(s, descending=True, stable=True)[: self.opts.top_k]
            total += int(e.intruder_mask[top][s[top] > 0].sum())
        return total
