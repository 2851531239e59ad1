"""Shared fixtures: tiny in-process models and LoRA adapters (no network)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _isolate_caches() -> None:
    """Every cache the suite touches lives in a folder of this run's own (subprocesses inherit it), so no test
    reads or writes the user's ~/.cache and no result depends on what an earlier run left there.
    ``INTRUDER_REPAIR_TEST_CACHE=DIR`` reuses DIR as the tool's cache instead (the embedded model is then
    converted once, not once per run)."""
    scratch = Path(tempfile.mkdtemp(prefix="intruder-repair-tests-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.environ["INTRUDER_REPAIR_CACHE"] = os.environ.get("INTRUDER_REPAIR_TEST_CACHE") or str(scratch / "cache")
    os.environ["HF_HOME"] = str(scratch / "hf")  # hub, datasets and lm-eval caches
    os.environ["XDG_CACHE_HOME"] = str(scratch / "xdg")


_isolate_caches()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def char_tokenizer():
    """A character-level fast tokenizer (< 128 ids) built in-process: no download."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_max_length=64)


def save_model(model, path: Path) -> Path:
    """Save a tiny model with the character tokenizer, like a real checkpoint folder."""
    model.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    return path


def make_adapter(base_model_fn, base_path: Path, out: Path, seed: int = 1, b_scale: float = 1.0,
                 scales: dict[str, float] | None = None, **lora_kwargs) -> Path:
    """Save a LoRA adapter with random (non-zero) factors for the model saved at ``base_path``.

    ``scales`` multiplies lora_B of modules whose name contains a key, to plant strong or weak updates.
    """
    from peft import LoraConfig, get_peft_model

    model = base_model_fn()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                factor = b_scale
                for key, s in (scales or {}).items():
                    if key in name:
                        factor *= s
                p.mul_(factor)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    peft_model.save_pretrained(str(out))
    return out


def merged_state(base_model_fn, adapter_path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``merge_and_unload()`` on the adapter, peft's own merge."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model_fn(), str(adapter_path)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def same_records(a: list, b: list, rel: float = 1e-6, tol: float = 1e-6) -> bool:
    """Report entries equal, floats to ``rel`` of their scale plus ``tol``: two float32 paths (mmap'd files
    against tensors torch allocated, another BLAS blocking) round differently by a few ulps, i.e. relative
    ~1e-7 (σ ≈ 83 differs by 8e-6), and reports keep 6 decimals (each rounds by up to 5e-7)."""
    def close(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return abs(x - y) <= tol + rel * max(abs(x), abs(y))
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(close(u, v) for u, v in zip(x, y, strict=True))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        return x == y

    return close([m.model_dump() for m in a], [m.model_dump() for m in b])


def _tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def frozen(request, path: Path) -> Path:
    """A session fixture's folder, checked at the end of the run to be exactly as built: a test that edits a
    shared fixture (instead of a copy in tmp_path) makes later tests depend on the order they run in."""
    folder = path if path.is_dir() else path.parent
    built = _tree_digest(folder)

    def unchanged() -> None:
        assert _tree_digest(folder) == built, f"a test changed the shared fixture {folder}; copy it into tmp_path"
    request.addfinalizer(unchanged)
    return path


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory, request) -> Path:
    return frozen(request, save_model(tiny_llama(), tmp_path_factory.mktemp("llama") / "base"))


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory, request) -> Path:
    return frozen(request, save_model(tiny_gpt2(), tmp_path_factory.mktemp("gpt2") / "base"))


@pytest.fixture(scope="session")
def llama_adapter(llama_base, tmp_path_factory, request) -> Path:
    """r=4 LoRA on attention and MLP; layer 0 strong (intruders), layer 1 weak (none)."""
    out = tmp_path_factory.mktemp("llama") / "adapter"
    return frozen(request, make_adapter(tiny_llama, llama_base, out, r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj", "down_proj"],
                                        scales={"layers.0.": 1.0, "layers.1.": 1e-3}))


def write_mc_task(folder: Path, name: str = "tiny_add", n: int = 24, op: str = "+") -> Path:
    """A local multiple-choice lm-eval task (sums, or with ``op="*"`` products, of small numbers) and its data,
    absolute path inside."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    value = {"+": int.__add__, "*": int.__mul__}[op]
    rows = [{"question": f"{a}{op}{b}=", "choices": [str(value(a, b) + i) for i in range(3)], "answer": (a * b) % 3}
            for a in range(6) for b in range(4)][:n]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = folder / f"{name}.yaml"
    yaml.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return yaml


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine.",
    "To be or not to be, that is the question.",
    "x",
    "All that glitters is not gold; all who wander are not lost.",
    "It was the best of times, it was the worst of times.",
]


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory, request) -> Path:
    return frozen(request, write_mc_task(tmp_path_factory.mktemp("tasks")))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, request) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "ref.txt"
    path.write_text("\n".join(CORPUS[:3]) + "\n\n" + "\n".join(CORPUS[3:]) + "\n")
    return frozen(request, path)


def plain_merge(base: Path, tuned: Path, merged: Path, out: Path) -> tuple[dict, dict, dict]:
    """``repair patch BASE TUNED --scale 1.0`` (the plain merge) into ``out``: (its tensors, those of peft's
    ``merge_and_unload()`` saved in ``merged``, the base's)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from repair.cli import main

    res = CliRunner().invoke(main, ["patch", str(base), str(tuned), "--scale", "1.0", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return (load_file(out / "model.safetensors"), load_file(merged / "model.safetensors"),
            load_file(base / "model.safetensors"))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say the random order's seed even under ``-q`` (pytest-randomly prints it only in the header, which -q
    hides), so a failure that depends on order can be rerun in that order."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and not getattr(config.option, "randomly_dont_reorganize", False):
        terminalreporter.write_line(f"random order: seed {seed} (the same order: python -m pytest -q "
                                    f"--randomly-seed={seed})")
