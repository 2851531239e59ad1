"""What an adapter config means, resolved by peft once per config and remembered.

peft parses ``adapter_config.json`` and resolves each module's rank and scaling
(``rank_pattern``/``alpha_pattern``, rsLoRA). Importing peft takes about 4 s of CPU here, longer than
a warm ``repair patch`` takes, so the resolution is stored in the cache, keyed by the config's bytes, the
adapter's module list and the peft version; the next run on the same adapter reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ValidationError

from repair.errors import CheckpointError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
SETTINGS_VERSION = "3"  # 2: adapters trained on a mutated base refused; 3: AdaLoRA's divisors
# init_lora_weights prefixes whose initialisation subtracts the adapter's initial value from the base weights, so
# the adapter only applies to that residual base until peft converts it (the prefixes peft's conversion accepts)
MUTATED_BASE_INITS = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA", "lora_ga": "LoRA-GA"}

MERGED_TYPES = ("LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA")  # peft types merged module by module (adapters.merged)


class AdapterSettings(BaseModel):
    """The parts of a LoRA config the toolkit uses, as peft resolves them."""

    version: str = SETTINGS_VERSION
    peft_version: str
    fan_in_fan_out: bool
    use_rslora: bool
    modules: dict[str, tuple[int, float]]  # module path -> (r, scaling)
    divisors: dict[str, float] = {}  # AdaLoRA: module path -> ranknum + 1e-5, which peft divides the update by


def load_lora_config(path: Path):
    """Parse ``adapter_config.json`` with peft and check it is a LoRA adapter."""
    from peft import PeftConfig

    cfg_file = path / ADAPTER_CONFIG
    try:
        config = PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError, OSError) as e:  # peft's errors for a bad config (JSON errors: ValueError)
        raise CheckpointError(f"{cfg_file}: not a valid PEFT adapter config ({e}).") from e
    return check_lora_config(config, str(cfg_file))


def check_lora_config(config, where: str):
    """``config`` if it is a LoRA config this tool reads; otherwise one sentence naming ``where`` it came from."""
    from peft import LoraConfig

    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type not in ("LORA", "ADALORA") or not isinstance(config, LoraConfig):
        instead = ("it learns prompts, not weights, so there is no weight update to analyse"
                   if getattr(config, "is_prompt_learning", False) else
                   "merge it into its base with peft (merge_and_unload(), then save_pretrained) and pass that "
                   "folder as TUNED, a full fine-tune")
        raise CheckpointError(f"{where}: peft_type {peft_type!r} is not supported (supported: 'LORA', with DoRA, "
                              f"rsLoRA, rank and alpha patterns, lora_bias, trainable tokens and modules_to_save; "
                              f"'ADALORA'; as saved adapter folders "
                              f"also {', '.join(repr(t) for t in MERGED_TYPES)}, merged by peft module by module); "
                              f"{instead}.")
    if getattr(config, "layer_replication", None):
        raise CheckpointError(f"{where}: layer_replication is not supported.")
    refuse_target_parameters(getattr(config, "target_parameters", None), where)
    refuse_mutated_base(getattr(config, "init_lora_weights", True), where)
    _check_fields(config, where)
    return config


def refuse_target_parameters(value, where: str) -> None:
    """One sentence if the adapter trains fused parameters (``target_parameters``, e.g. MoE experts)."""
    if value:
        raise CheckpointError(
            f"{where}: target_parameters {list(value) if isinstance(value, list | tuple) else value!r} (LoRA on "
            f"fused parameters such as MoE experts) is supported where BASE stores the fused tensor itself (as "
            f"gpt-oss does) or where transformers' conversion mapping builds it from per-expert tensors (Mixtral, "
            f"Qwen-MoE), neither of which holds here; merge it into its base with peft (merge_and_unload(), then "
            f"save_pretrained) and "
            f"pass that folder as TUNED: transformers saves the experts one by one there, and each is analysed as "
            f"its own matrix.")


def refuse_mutated_base(init, where: str) -> None:
    """One sentence if ``init_lora_weights`` says the adapter was saved against a residual base, unconverted."""
    value = str(init).lower()
    for prefix, method in MUTATED_BASE_INITS.items():
        if value.startswith(prefix):
            raise CheckpointError(
                f"{where}: init_lora_weights {init!r} ({method}) trains against the base minus the adapter's "
                f"initial value, so this adapter does not apply to the original base; convert it to a plain LoRA "
                f"with peft first (model.save_pretrained(OUT, path_initial_model_for_weight_conversion="
                f"<the initial adapter>)) and pass OUT.")


def _is_rank(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _is_mask(x) -> bool:
    return isinstance(x, list) and all(isinstance(b, bool) for b in x)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_fields(config, where: str) -> None:
    """The fields the rank and scaling come from must have the types peft assumes (it does not check them)."""
    if not (isinstance(config.r, int) and not isinstance(config.r, bool) and config.r > 0):
        raise CheckpointError(f"{where}: r must be a positive integer, got {config.r!r}.")
    if not _is_number(config.lora_alpha):
        raise CheckpointError(f"{where}: lora_alpha must be a finite number, got {config.lora_alpha!r}.")
    adalora = getattr(config.peft_type, "value", config.peft_type) == "ADALORA"  # its rank_pattern holds masks
    for field, ok in (("rank_pattern", _is_mask if adalora else _is_rank), ("alpha_pattern", _is_number)):
        if getattr(config, field, None) is None:  # JSON null: peft's own default is an empty mapping
            setattr(config, field, {})
        pattern = getattr(config, field)
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise CheckpointError(f"{where}: {field} must map module names to "
                                  f"{'positive integers' if field == 'rank_pattern' else 'numbers'}, got {pattern!r}.")
    targets = config.target_modules
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list | set | tuple) and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{where}: target_modules must be a string or a list of strings, got {targets!r}.")
    if not targets and not getattr(config, "target_parameters", None):  # None: peft infers it, [] it refuses
        raise CheckpointError(f"{where}: target_modules is missing or empty; name the adapted modules (peft would "
                              "infer or refuse them, ignoring the stored factors of any other module).")


def rank_and_scaling(config, module: str) -> tuple[int, float]:
    """Per-module r and scaling exactly as peft resolves ``rank_pattern``/``alpha_pattern``."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return int(r), float(scaling)


def adalora_rank_and_scaling(config, module: str) -> tuple[int, float, float]:
    """AdaLoRA's per-module (r, scaling, divisor) as a loaded ``AdaLoraModel`` holds them: the rank kept by
    ``rank_pattern`` (else ``init_r``), scaling ``lora_alpha`` (or r when it is 0), and ``ranknum + 1e-5``, where
    ranknum stays ``init_r`` through peft's resizing (``resize_modules_by_rank_pattern`` copies it)."""
    mask = (config.rank_pattern or {}).get(f"{module}.lora_E")
    r = sum(mask) if mask is not None else config.init_r
    scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
    return int(r), float(scaling), float(config.init_r) + 1e-5


def resolve_with_peft(path: Path, modules: list[str]) -> AdapterSettings:
    """Resolve the config with peft (the slow path)."""
    config = load_lora_config(path)
    if getattr(config.peft_type, "value", config.peft_type) == "ADALORA":
        resolved = {m: adalora_rank_and_scaling(config, m) for m in modules}
        return AdapterSettings(peft_version=_peft_version(), fan_in_fan_out=bool(config.fan_in_fan_out),
                               use_rslora=False, modules={m: v[:2] for m, v in resolved.items()},
                               divisors={m: v[2] for m, v in resolved.items()})
    return AdapterSettings(
        peft_version=_peft_version(), fan_in_fan_out=bool(config.fan_in_fan_out),
        use_rslora=bool(config.use_rslora), modules={m: rank_and_scaling(config, m) for m in modules},
    )


def _peft_version() -> str:
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return "unknown"


def settings_key(path: Path, modules: list[str]) -> str:
    """Cache key: the config's bytes, the module list, the peft version."""
    h = hashlib.sha256()
    try:
        h.update((path / ADAPTER_CONFIG).read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: cannot be read ({e.strerror or e}).") from e
    h.update("\n".join(sorted(modules)).encode())
    h.update(f"|peft {_peft_version()}|v{SETTINGS_VERSION}".encode())
    return h.hexdigest()


def cached_settings(folder: Path | None, key: str) -> AdapterSettings | None:
    """The remembered resolution, or None."""
    file = folder / f"{key}.json" if folder is not None else None
    if file is None or not file.is_file():
        return None
    try:
        return AdapterSettings.model_validate_json(file.read_text())
    except (OSError, ValidationError) as e:
        logger.warning("%s: unreadable cached adapter settings (%s); resolving again", file, e)
        return None


def store_settings(folder: Path | None, key: str, settings: AdapterSettings) -> None:
    if folder is None:
        return
    from repair.runtime.durable import write_text_atomic

    try:
        write_text_atomic(folder / f"{key}.json", settings.model_dump_json() + "\n")
    except OSError as e:
        logger.warning("%s: could not remember adapter settings (%s)", folder, e)


def patched_config(path: Path, ranks: dict[str, int], scaling: dict[str, float], use_rslora: bool) -> dict:
    """The input adapter_config.json with per-module r/alpha for rewritten modules (same scaling).

    Exact module names go first in the patterns, because peft takes the first match.
    """
    import re

    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    new_ranks = {re.escape(m): r for m, r in ranks.items()}
    new_alpha = {re.escape(m): scaling[m] * (r**0.5 if use_rslora else r) for m, r in ranks.items()}
    cfg["rank_pattern"] = merge_patterns(new_ranks, cfg.get("rank_pattern"))
    cfg["alpha_pattern"] = merge_patterns(new_alpha, cfg.get("alpha_pattern"))
    return cfg


def merge_patterns(new: dict[str, float], old: dict[str, float] | None) -> dict[str, float]:
    """``new`` first (peft takes the first match), then the old patterns it does not replace: an adapter
    patched twice keeps the new ranks, not those of the first patch."""
    return {**new, **{k: v for k, v in (old or {}).items() if k not in new}}
