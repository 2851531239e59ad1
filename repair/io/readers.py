"""The contracts of tensor readers: what the code above ``io`` may ask of a checkpoint.

Implemented by ``checkpoint.CheckpointReader`` (safetensors or, opted in, pickle files), ``experts.ExpertView``
(fused 3-D expert tensors shown one expert at a time), ``adapters.merged.MergedAdapter`` (an adapter merged
by peft module by module) and, for shapes only, a live model's base weights (``adapters.live``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorShapes(Protocol):
    """Names' shapes and sizes, without reading a tensor: what batching matrices by memory needs."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def float32_bytes(self, name: str) -> int: ...


@runtime_checkable
class TensorReader(TensorShapes, Protocol):
    """Named tensors of one checkpoint, read one at a time (bounded memory)."""

    def files(self) -> list[Path]: ...

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...  # in the stored layout and dtype
