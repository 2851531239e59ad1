"""Per-direction scales on a model in memory: the parametrisation ``repair fit`` trains.

    W'_m = W_m + Σ_{i ∈ m} (λ_i − 1) σ_i u_i v_iᵀ,   one λ_i per direction

The directions are W_tuned's intruders (``intruders``, as the paper edits them) or every singular direction of
ΔW = W_tuned − W0 (``delta``). The model's weights stay frozen and are never copied: for gradients, a forward
hook adds the rank-n correction ((x Vhᵀ) ⊙ c) Uᵀ to each module's output, so only λ is a leaf; for measuring a
point, ``apply`` writes W' into the parameters from the plain merge and ``restore`` writes the plain merge back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from repair.adapters.pairs import MatrixPair, PairSource
from repair.edit.editor import MatrixPatch
from repair.edit.edits import plain_merge, to_stored
from repair.edit.inplace import InPlacePatcher
from repair.errors import RepairError

DIRECTIONS = ("intruders", "delta")
OVERLAP_INTRUDER = 0.5  # a ΔW direction counts as an intruder when over half of u_i lies in the intruders' span


@dataclass
class DirectionGroup:
    """The directions of one matrix: their triplets and where their λ_i sit in the flat λ vector."""

    name: str
    transposed: bool
    indices: list[int]  # ranks among W_tuned's singular vectors (intruders) or ΔW's (delta)
    sigma: torch.Tensor  # (n,) float32
    U: torch.Tensor  # (out, n) float32
    Vh: torch.Tensor  # (n, in) float32
    overlap: list[float]  # share of each u_i in the span of the matrix's intruders (1 for an intruder itself)
    intruder_U: torch.Tensor | None = field(default=None, repr=False)  # (out, |I|) the intruders' u, for shares
    intruder_Vh: torch.Tensor | None = field(default=None, repr=False)  # (|I|, in) and their v
    offset: int = 0

    @property
    def size(self) -> int:
        return len(self.indices)


def intruder_groups(patcher: InPlacePatcher) -> list[DirectionGroup]:
    """Every edited intruder of the patcher's matrices, one group per matrix."""
    return [DirectionGroup(e.name, e.transposed, list(e.patch.intruders), e.patch.sigma_old.float(),
                           e.patch.U.float(), e.patch.Vh.float(), [1.0] * len(e.patch.intruders),
                           e.patch.U.float(), e.patch.Vh.float()) for e in patcher.entries]


def delta_groups(src: PairSource, patcher: InPlacePatcher, top_k: int) -> list[DirectionGroup]:
    """Every singular direction of ΔW in every adapted matrix: exact from a LoRA's factors (rank r), else the
    ``top_k`` leading directions of the dense difference."""
    intruders = {g.name: g for g in intruder_groups(patcher)}
    groups = []
    for name in src.names:
        pair = src.pair(name)
        S, U, Vh = _delta_svd(pair, top_k)
        keep = S[0] * 1e-6 < S if S.numel() else S.bool()
        S, U, Vh = S[keep], U[:, keep], Vh[keep]
        if not S.numel():
            continue
        g = intruders.get(name)
        overlap = [0.0] * len(S) if g is None else (g.U.T @ U).pow(2).sum(0).clamp(max=1).tolist()
        groups.append(DirectionGroup(name, pair.transposed, list(range(len(S))), S, U, Vh, overlap,
                                     None if g is None else g.U, None if g is None else g.Vh))
    return groups


def _delta_svd(pair: MatrixPair, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S (n,), U (out, n), Vh (n, in)) of ΔW, in float64 arithmetic, returned as float32."""
    if pair.factors is not None:
        B, A = (t.double() for t in pair.factors)  # (out, r), (r, in)
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.T)
        Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T)  # (r, r)
        return S.float(), (Qb @ Uc).float(), (Vch @ Qa.T).float()
    delta = pair.tuned.double() - pair.base.double()  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return S[:top_k].float(), U[:, :top_k].float(), Vh[:top_k].float()


class DirectionScales:
    """λ (a float32 leaf, one entry per direction) over the groups of one model. ``hooked()`` makes the model's
    forward depend on λ; ``apply(λ)`` / ``restore()`` write and undo W' in place for measurement."""

    def __init__(self, model: torch.nn.Module, src: PairSource, groups: list[DirectionGroup],
                 param_of: Callable[[str], torch.Tensor]):
        self.model, self.src, self.groups, self._param_of = model, src, groups, param_of
        offset = 0
        for g in groups:
            g.offset, offset = offset, offset + g.size
        self._modules = {g.name: self._module(g.name) for g in groups}
        dev = next(model.parameters()).device
        for g in groups:  # the correction runs where the model does
            g.sigma, g.U, g.Vh = g.sigma.to(dev), g.U.to(dev), g.Vh.to(dev)
            if g.intruder_U is not None:
                g.intruder_U, g.intruder_Vh = g.intruder_U.to(dev), g.intruder_Vh.to(dev)
        self.lam = torch.ones(offset, device=dev, requires_grad=True)

    @property
    def size(self) -> int:
        return int(self.lam.numel())

    def _module(self, name: str) -> torch.nn.Module:
        """The module whose ``weight`` is the matrix ``name``, for the hook."""
        param = self._param_of(name)
        prefix = name.rsplit(".", 1)[0]
        try:
            module = self.model.get_submodule(prefix)
        except AttributeError:
            module = None
        from transformers.pytorch_utils import Conv1D

        if not isinstance(module, (torch.nn.Linear, Conv1D)) or module.weight is not param:
            raise RepairError(f"fit: {name} is not the weight of a linear module of the model (an embedding, a "
                              "fused expert tensor or a renamed parameter); repair fit scales linear modules only.")
        return module

    def group_lambdas(self, g: DirectionGroup, lam: torch.Tensor | None = None) -> torch.Tensor:
        return (self.lam if lam is None else lam)[g.offset:g.offset + g.size]

    @contextmanager
    def hooked(self) -> Iterator[torch.Tensor]:
        """Forward hooks adding each group's correction; yields λ (set ``.data`` to move it)."""
        handles = [self._modules[g.name].register_forward_hook(self._hook(g)) for g in self.groups]
        try:
            yield self.lam
        finally:
            for h in handles:
                h.remove()

    def _hook(self, g: DirectionGroup) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0]  # where the module runs (a model spread by device_map: not always the first device)
            dev = x.device
            coeff = ((self.group_lambdas(g) - 1.0) * g.sigma).to(dev)  # (n,)
            corr = ((x.to(g.Vh.dtype) @ g.Vh.to(dev).T) * coeff) @ g.U.to(dev).T  # (..., out)
            return output + corr.to(output.dtype)
        return hook

    def patches(self, lam: torch.Tensor, kind: str) -> dict[str, MatrixPatch]:
        """Each group's patch at these λ_i (every direction kept, λ_i = 1 included), for the writer."""
        lam = lam.detach().double().cpu()
        return {g.name: MatrixPatch(list(g.indices), 1.0, g.sigma.cpu(), g.U.cpu(), g.Vh.cpu(),
                                    scales=tuple(float(x) for x in self.group_lambdas(g, lam)), directions=kind)
                for g in self.groups}

    @torch.no_grad()
    def apply(self, lam: torch.Tensor) -> None:
        """Write W' = plain merge + Σ (λ_i − 1) σ_i u_i v_iᵀ into the parameters (from the merge: no drift)."""
        for g in self.groups:
            coeff = (self.group_lambdas(g, lam.detach()).float() - 1.0) * g.sigma  # (n,)
            param = self._param_of(g.name)
            W = plain_merge(self.src, g.name).float().to(g.U.device)
            W = W.T if g.transposed else W  # (out, in)
            if bool(coeff.any()):
                W = W + (g.U * coeff) @ g.Vh
            param.copy_(to_stored(g.transposed, W.to(param.device), param.dtype))

    def restore(self) -> None:
        self.apply(torch.ones(self.size, device=self.lam.device))

    def removed_shares(self, lam: torch.Tensor) -> tuple[float, float]:
        """(removed Frobenius mass ‖R‖², the part of it in the intruders' span ‖U_Iᵀ R V_Iᵀ‖²), summed over
        matrices, where R = Σ (1 − λ_i) σ_i u_i v_iᵀ is what the edit takes away; float64."""
        total = inside = 0.0
        for g in self.groups:
            c = (1.0 - self.group_lambdas(g, lam.detach()).double()) * g.sigma.double()  # (n,)
            U, Vh = g.U.double(), g.Vh.double()
            total += float(((U.T @ U) * (Vh @ Vh.T) * torch.outer(c, c)).sum())
            if g.intruder_U is not None:
                core = (g.intruder_U.double().T @ U * c) @ (Vh @ g.intruder_Vh.double().T)  # (|I|, |I|)
                inside += float(core.pow(2).sum())
        return total, inside

