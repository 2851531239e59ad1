"""Editable patch plans: which intruders of which matrices to rescale, and by how much."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from repair.detection.report import SCHEMA_VERSION, DetectionReport
from repair.errors import RepairError
from repair.runtime.durable import write_text_atomic


class PlanEntry(BaseModel):
    intruders: list[int] = Field(description="indices among the tuned singular vectors (0 = largest)")
    scale: float | None = Field(None, description="λ for this matrix; null takes `repair patch --scale`")
    sigma: list[float] = Field(default_factory=list, description="informative: the intruders' σ")
    max_cos: list[float] = Field(default_factory=list, description="informative: their max |cos|")


class Plan(BaseModel):
    """Written by ``repair detect --plan-out``; edit it, then ``repair patch --plan``."""

    schema_version: str = SCHEMA_VERSION
    kind: Literal["intruder-repair-plan"] = "intruder-repair-plan"
    base: str
    tuned: str
    top_k: int
    epsilon: float
    side: str
    matrices: dict[str, PlanEntry]

    @classmethod
    def from_report(cls, report: DetectionReport, per_matrix: int | None = None) -> Plan:
        """Every intruder of the report, or the ``per_matrix`` top-ranked ones of each matrix."""
        entries = {}
        for m in report.matrices:
            chosen = sorted(m.intruders)[:per_matrix]
            if chosen:
                entries[m.name] = PlanEntry(intruders=chosen, sigma=[m.sigma[i] for i in chosen],
                                            max_cos=[m.max_cos[i] for i in chosen])
        return cls(base=report.base, tuned=report.tuned, top_k=report.top_k, epsilon=report.epsilon,
                   side=report.side, matrices=entries)

    def write(self, path: Path) -> None:
        write_text_atomic(Path(path), self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            plan = cls.model_validate(json.loads(Path(path).read_text()))
        except OSError as e:
            raise RepairError(f"plan {path}: cannot be read ({e.strerror}).") from e
        except (ValueError, ValidationError) as e:
            first = str(e).splitlines()[0] if str(e) else "invalid"
            raise RepairError(f"plan {path}: not a valid intruder-repair plan ({first}).") from e
        for name, entry in plan.matrices.items():
            if any(i < 0 for i in entry.intruders) or len(set(entry.intruders)) != len(entry.intruders):
                raise RepairError(f"plan {path}: {name} lists negative or repeated intruder indices.")
        return plan


def check_scale(scale: float, allow_amplify: bool, where: str = "--scale") -> None:
    """λ must be finite and in [0, 1] unless amplification is explicitly allowed."""
    if not math.isfinite(scale):
        raise RepairError(f"{where}: expected a finite number, got {scale}.")
    if not allow_amplify and not 0.0 <= scale <= 1.0:
        raise RepairError(f"{where}: expected λ in [0, 1], got {scale}; pass --allow-amplify to go outside it.")


def check_per_matrix(n: int | None) -> None:
    """``--per-matrix N``: a positive number of intruders per matrix, or None for all of the top k."""
    if n is not None and n < 1:
        raise RepairError(f"per_matrix: expected a positive integer, got {n}.")
