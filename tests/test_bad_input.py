"""Bad input: one clear sentence naming the file or flag, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, save_model, tiny_llama
from safetensors.torch import load_file, save_file

from repair.cli import main


def _wider():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensor(folder: Path, file: str, fn) -> None:
    tensors = load_file(str(folder / file))
    fn(tensors)
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


def _case_dirs(kind: str, base: Path, adapter: Path, tmp: Path) -> tuple[str, str, list[str]]:
    """(BASE, TUNED, extra args) for one bad-input case, built inside ``tmp``."""
    extra: list[str] = []
    if kind == "missing_base":
        return str(tmp / "nope"), str(adapter), extra
    if kind == "missing_tuned":
        return str(base), str(tmp / "nope"), extra
    if kind == "other_base":
        other = save_model(_wider(), tmp / "wide")
        return str(base), str(make_adapter(_wider, other, tmp / "wa", r=2, target_modules=["q_proj"])), extra
    if kind in ("peft_type", "bad_config"):
        a = _copy(adapter, tmp / "a")
        cfg = json.loads((a / "adapter_config.json").read_text())
        text = json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}) if kind == "peft_type" else "{oops"
        (a / "adapter_config.json").write_text(text)
        return str(base), str(a), extra
    if kind == "truncated_base":
        b = _copy(base, tmp / "b")
        data = (b / "model.safetensors").read_bytes()
        (b / "model.safetensors").write_bytes(data[: len(data) // 2])
        return str(b), str(adapter), extra
    if kind == "truncated_adapter":
        a = _copy(adapter, tmp / "a")
        (a / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
        return str(base), str(a), extra
    if kind == "nan_base":
        b = _copy(base, tmp / "b")
        _edit_tensor(b, "model.safetensors", lambda t: t["model.layers.1.self_attn.q_proj.weight"].__setitem__(
            (0, 0), float("nan")))
        return str(b), str(adapter), extra
    if kind == "inf_adapter":
        a = _copy(adapter, tmp / "a")
        key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        _edit_tensor(a, "adapter_model.safetensors", lambda t: t[key].__setitem__((0, 0), float("inf")))
        return str(base), str(a), extra
    if kind == "pickle":
        p = tmp / "pk"
        p.mkdir()
        torch.save(tiny_llama().state_dict(), p / "pytorch_model.bin")
        return str(base), str(p), extra
    raise AssertionError(kind)


FILE_CASES = {
    "missing_base": "no such file or folder",
    "missing_tuned": "no such file or folder",
    "other_base": "model.layers.0.self_attn.q_proj",
    "peft_type": "it learns prompts, not weights, so there is no weight update to analyse.",
    "bad_config": "adapter_config.json: not a valid PEFT adapter config",
    "truncated_base": "model.safetensors: not a readable safetensors file",
    "truncated_adapter": "adapter_model.safetensors: not a readable safetensors file",
    "nan_base": "'model.layers.1.self_attn.q_proj.weight' contains NaN or Inf",
    "inf_adapter": "model.layers.0.self_attn.v_proj (LoRA factors)' contains NaN or Inf",
    "pickle": "loading pickle can run arbitrary code",
}

FLAG_CASES = {
    "scale_above_one": (["--scale", "1.2"], "--scale: expected λ in [0, 1], got 1.2; pass --allow-amplify"),
    "scale_negative": (["--scale", "-1"], "--scale: expected λ in [0, 1]"),
    "scale_nan": (["--scale", "nan"], "--scale: expected a finite number"),
    "top_k_zero": (["--scale", "0", "--top-k", "0"], "--top-k: expected an integer >= 1"),
    "epsilon_zero": (["--scale", "0", "--epsilon", "0"], "--epsilon: expected a number in (0, 1]"),
    "epsilon_big": (["--scale", "0", "--epsilon", "1.01"], "--epsilon: expected a number in (0, 1]"),
    "modules_nothing": (["--scale", "0", "--modules", "no_such_module"], "--modules 'no_such_module': matched no"),
    "modules_regex": (["--scale", "0", "--modules", "q_proj("], "--modules: 'q_proj(' is not a valid regular"),
    "shard_size": (["--scale", "0", "--max-shard-size", "huge"], "--max-shard-size: expected a size"),
    "no_scale": ([], "--scale: required"),
}


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("kind", sorted(FILE_CASES))
def test_bad_files(kind, llama_base, llama_adapter, tmp_path):
    base, tuned, extra = _case_dirs(kind, llama_base, llama_adapter, tmp_path)
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    for cmd in (["detect", base, tuned], ["patch", base, tuned, "--scale", "0", "--out", str(out)]):
        res = CliRunner().invoke(main, [*cmd, *extra])
        assert res.exit_code == 2, res.output
        assert FILE_CASES[kind] in res.output and "Traceback" not in res.output
        assert res.output.startswith("Error: ") and res.output.count("\n") == 1  # one sentence
    assert _snapshot(tmp_path) == before and not out.exists()


@pytest.mark.parametrize("kind", sorted(FLAG_CASES))
def test_bad_flags(kind, llama_base, llama_adapter, tmp_path):
    args, message = FLAG_CASES[kind]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--out", str(out), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(llama_base, tmp_path):
    res = CliRunner().invoke(main, ["--debug", "detect", str(llama_base), str(tmp_path / "nope")])
    assert res.exit_code != 0 and res.exception is not None and "no such file" in str(res.exception)


def test_remote_code_is_never_trusted(llama_base, tmp_path):
    custom = _copy(llama_base, tmp_path / "custom")
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="evil_arch", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    res = CliRunner().invoke(main, ["compare", str(custom), "--tasks", "addition", "--limit", "1"])
    assert res.exit_code == 2 and "without running remote code" in res.output, res.output
