"""The public Python API: the functions the CLI calls, with the CLI's defaults, and their live-model forms.

``detect`` and ``patch`` take folders, hub ids or embedded model names, like ``repair detect`` and
``repair patch``. ``detect_model`` and ``patch_model`` take a ``PeftModel`` in memory. Detection
options are the fields of ``DetectOptions``: top_k=10, epsilon=0.5, side="left", modules=None,
allow_pickle=False, cache=True, threads=0, device="auto", method="auto", revision=None, token=None (the
CLI's defaults; ``revision`` and ``token`` apply to hub ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from typing_extensions import TypedDict, Unpack

from repair.detection.detector import detect_options
from repair.detection.report import DetectionReport, LivePatchReport, PatchReport


class DetectKwargs(TypedDict, total=False):
    """The detection options as keyword arguments: the fields of ``DetectOptions``, with its defaults."""

    top_k: int
    epsilon: float
    side: Literal["left", "right", "both"]
    modules: str | None
    allow_pickle: bool
    cache: bool
    threads: int
    device: str
    batch_bytes: int
    method: Literal["auto", "certified", "exact"]
    revision: str | None
    token: str | None


def detect(base: str, tuned: str, **options: Unpack[DetectKwargs]) -> DetectionReport:
    """Intruder dimensions of ``tuned`` (a LoRA adapter or a full checkpoint) against ``base``: ``repair detect``."""
    from repair.detection.detector import detect as run

    return run(str(base), str(tuned), detect_options(options))


def patch(base: str, tuned: str, scale: float, out: str | Path, *, format: Literal["merged", "adapter"] = "merged",
          max_shard_size: int = 5 * 10**9, plan: str | Path | None = None, allow_amplify: bool = False,
          overwrite: bool = False, per_matrix: int | None = None, **options: Unpack[DetectKwargs]) -> PatchReport:
    """Rescale the intruders of ``tuned`` by ``scale`` and write the checkpoint to ``out``: ``repair patch``."""
    from repair.edit.patcher import PatchOptions
    from repair.edit.patcher import patch as run

    opts = PatchOptions(out=Path(out), scale=scale, detect=detect_options(options), format=format,
                        max_shard_size=max_shard_size, plan=Path(plan) if plan is not None else None,
                        allow_amplify=allow_amplify, overwrite=overwrite, per_matrix=per_matrix)
    return run(str(base), str(tuned), opts)


def detect_model(model, **options: Unpack[DetectKwargs]) -> DetectionReport:
    """Intruders of a live PeftModel's active LoRA adapter, read from its modules (device and dtype kept).

    The report equals ``detect`` on the base folder and the saved adapter; base spectra are cached
    by content hash as for files.
    """
    from repair.adapters.live import LivePairSource
    from repair.detection.detector import detect_source

    opts = detect_options(options, model)
    src = LivePairSource(model, opts.modules, opts.spectra())
    return detect_source(src, opts, base="<model>", tuned=f"<adapter {src.adapter_name}>")


def patch_model(model, scale: float, *, merge: bool = False, adapter_name: str | None = None,
                allow_amplify: bool = False, per_matrix: int | None = None,
                **options: Unpack[DetectKwargs]) -> tuple[object, LivePatchReport]:
    """Rescale the intruders of a live PeftModel's active adapter by ``scale``; returns (model, report).

    By default adds an adapter (``adapter_name``, default ``<active>_repaired``) of rank r + |I| per
    patched module that reproduces W' exactly, and makes it active: the exact counterpart of peft's
    ``reduce_intruder_dimension``, which truncates to rank r. With ``merge=True`` W' is written into
    the base weights and the adapter unloaded; the returned model is the base model, as from
    ``merge_and_unload()``.
    """
    from repair.edit.live_edit import patch_live
    from repair.edit.plan import check_per_matrix, check_scale

    check_scale(scale, allow_amplify, "scale")
    check_per_matrix(per_matrix)
    return patch_live(model, scale, detect_options(options, model), merge, adapter_name, per_matrix)
