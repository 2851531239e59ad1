"""Typed, versioned detection reports: JSON serialisation and the human-readable table."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from repair.runtime.durable import write_text_atomic

SCHEMA_VERSION = "1.2"
Side = Literal["left", "right", "both"]


class MatrixReport(BaseModel):
    """Intruder analysis of one weight matrix."""

    name: str = Field(description="base tensor name, e.g. model.layers.0.self_attn.q_proj.weight; one expert of "
                                  "a fused 3-D tensor: model.layers.0.mlp.experts.down_proj[7]")
    module_type: str
    shape: list[int] = Field(description="stored shape of the base tensor")
    transposed: bool = Field(False, description="stored as (in, out) and analysed as (out, in)")
    intruders: list[int] = Field(description="indices among the top k tuned singular vectors (0 = largest)")
    max_cos: list[float] = Field(description="per top-k tuned vector, the largest |cos| with any base vector "
                                             "(method certified: a certified lower bound, exact where it "
                                             "equals max_cos_upper)")
    max_cos_upper: list[float] | None = Field(
        None, description="certified upper bounds of max_cos (equal to it on the exact paths)")
    max_cos_left: list[float] | None = None
    max_cos_right: list[float] | None = None
    sigma: list[float] = Field(description="top-k singular values of W_tuned")
    degenerate: list[int] = Field(
        [], description="top-k indices whose σ is within 1e-3·σ_1 of a neighbour: their singular vectors, "
                        "and so their max_cos, are not unique")
    method: str = Field("dense", description="certified (truncated base spectrum, certified bounds), structured "
                                             "(complete base spectrum and the LoRA factors) or dense (a full SVD "
                                             "of W_tuned)")
    fallback: bool = Field(False, description="the certified path could not decide ε; the exact path answered")
    effective_rank_delta: float = Field(description="Roy & Vetterli effective rank of W_tuned - W0")
    delta_norm: float = Field(description="Frobenius norm of W_tuned - W0")


class ModuleTypeSummary(BaseModel):
    matrices: int = 0
    matrices_with_intruders: int = 0
    intruders: int = 0
    mean_effective_rank_delta: float = 0.0


class DetectionReport(BaseModel):
    """Model-wide intruder report (schema ``SCHEMA_VERSION``)."""

    schema_version: str = SCHEMA_VERSION
    tool_version: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    base: str
    tuned: str
    top_k: int
    epsilon: float
    side: Side
    modules: str | None = None
    total_intruders: int = 0
    by_module_type: dict[str, ModuleTypeSummary] = {}
    matrices: list[MatrixReport] = []
    cache: dict[str, int] = Field({}, description="base spectra cache hits and misses")
    method: str = Field("auto", description="method: certified, exact, or auto (certified where the smaller "
                                            "side is at least 1024)")
    fallbacks: int = Field(0, description="matrices the certified path could not decide, solved exactly")

    @classmethod
    def build(cls, matrices: list[MatrixReport], **fields) -> DetectionReport:
        """A report with the totals and per-module-type summaries computed from ``matrices``."""
        summary: dict[str, ModuleTypeSummary] = {}
        for m in matrices:
            s = summary.setdefault(m.module_type, ModuleTypeSummary())
            s.matrices += 1
            s.intruders += len(m.intruders)
            s.matrices_with_intruders += bool(m.intruders)
            s.mean_effective_rank_delta += m.effective_rank_delta
        for s in summary.values():
            s.mean_effective_rank_delta /= s.matrices
        total = sum(len(m.intruders) for m in matrices)
        fallbacks = sum(m.fallback for m in matrices)
        return cls(matrices=matrices, by_module_type=summary, total_intruders=total, fallbacks=fallbacks, **fields)

    def write_json(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename."""
        write_text_atomic(Path(path), self.model_dump_json(indent=2) + "\n")

    def worst(self, n: int) -> list[MatrixReport]:
        """Matrices with the most intruders, then the lowest similarity among their top k."""
        return sorted(self.matrices, key=lambda m: (-len(m.intruders), min(m.max_cos, default=1.0)))[:n]


def render_table(report: DetectionReport, worst: int = 10) -> str:
    """Per-module-type totals and the worst matrices, as aligned plain text."""
    lines = [
        f"Intruder dimensions: top-k={report.top_k}, epsilon={report.epsilon}, side={report.side}",
        f"  base:  {report.base}",
        f"  tuned: {report.tuned}",
        "",
        f"{'module type':<16}{'matrices':>9}{'with intr.':>11}{'intruders':>10}{'eff. rank ΔW':>14}",
    ]
    for name, s in sorted(report.by_module_type.items()):
        lines.append(f"{name:<16}{s.matrices:>9}{s.matrices_with_intruders:>11}{s.intruders:>10}"
                     f"{s.mean_effective_rank_delta:>14.2f}")
    n = sum(s.matrices for s in report.by_module_type.values())
    lines.append(f"{'total':<16}{n:>9}{sum(bool(m.intruders) for m in report.matrices):>11}"
                 f"{report.total_intruders:>10}")
    methods: dict[str, int] = {}
    for m in report.matrices:
        methods[m.method] = methods.get(m.method, 0) + 1
    lines.append("method: " + ", ".join(f"{k} {v}" for k, v in sorted(methods.items()))
                 + (f" ({report.fallbacks} not certified, solved exactly)" if report.fallbacks else ""))
    flagged = [m for m in report.worst(worst) if m.intruders]
    if flagged:
        lines += ["", f"Worst matrices (up to {worst}):",
                  f"{'matrix':<52}{'intruders (rank: σ, max|cos|)'}"]
        for m in flagged:
            detail = ", ".join(f"{i}: {m.sigma[i]:.3g}, {_cos_text(m, i)}" for i in m.intruders)
            lines.append(f"{m.name:<52}{detail}")
    return "\n".join(lines)


def _cos_text(m: MatrixReport, i: int) -> str:
    """max|cos| to two decimals, or its certified range where the bounds differ at that precision."""
    lo, hi = m.max_cos[i], (m.max_cos_upper or m.max_cos)[i]
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


class InputFile(BaseModel):
    role: str  # base or tuned
    path: str
    sha256: str


class Provenance(BaseModel):
    """What produced a checkpoint: also stored, compactly, in its safetensors metadata."""

    tool: str = "intruder-repair"
    tool_version: str
    command: str
    arguments: dict[str, object]
    inputs: list[InputFile]


class MatrixEdit(BaseModel):
    name: str
    module_type: str
    intruders: list[int]
    scale: float | None = Field(description="λ of every edited direction; null when each has its own (`scales`)")
    sigma_old: list[float]
    sigma_new: list[float]
    scales: list[float] | None = Field(None, description="per-direction λ_i fitted by `repair fit`")
    directions: Literal["intruders", "delta"] = Field(
        "intruders", description="`intruders`: indices among W_tuned's singular vectors; `delta`: among ΔW's")
    adapter_rank: int | None = Field(None, description="rank of the rewritten LoRA module (adapter format)")
    reconstruction_error: float | None = Field(
        None, description="relative error of the written adapter against W' (adapter format)")
    peft_truncation_error: float | None = Field(
        None, description="relative error if truncated back to rank r, as peft's reduce_intruder_dimension does")

    @property
    def changed(self) -> bool:
        """Whether the edit changes W_tuned (some λ differs from 1)."""
        return any(s != 1.0 for s in self.scales) if self.scales is not None else self.scale != 1.0


class PatchReport(BaseModel):
    """``repair_report.json`` of a patched checkpoint."""

    schema_version: str = SCHEMA_VERSION
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    provenance: Provenance
    format: Literal["merged", "adapter"]
    examined_matrices: int
    patched_matrices: int
    total_intruders: int
    matrices: list[MatrixEdit]
    files: list[str]

    def write_json(self, path: Path) -> None:
        write_text_atomic(Path(path), self.model_dump_json(indent=2) + "\n")


class LivePatchReport(BaseModel):
    """What ``patch_model`` did to a live model: the new adapter (None when merged) and every edit."""

    schema_version: str = SCHEMA_VERSION
    tool_version: str
    adapter: str | None = Field(description="the adapter added and activated; None when W' was merged in")
    scale: float
    top_k: int
    epsilon: float
    examined_matrices: int
    patched_matrices: int
    total_intruders: int
    matrices: list[MatrixEdit]
