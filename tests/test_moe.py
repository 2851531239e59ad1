"""Mixture-of-experts models as users have them today: what is analysed, what is refused, and what to pass.

A tiny Mixtral built in-process: transformers keeps its experts fused in 3-D parameters in memory and
saves them one by one on disk (``block_sparse_moe.experts.N.w2.weight``). Oracle: float64 SVDs of the
saved tensors, and peft's own ``merge_and_unload()``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_structured import reference

from repair.cli import main


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A base, a target_parameters LoRA on the experts' down projections, and that adapter merged by peft."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("moe")
    tiny_mixtral().save_pretrained(str(root / "base"))
    torch.manual_seed(1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.down_proj"], target_modules=["q_proj"],
                     init_lora_weights=False)
    model = get_peft_model(tiny_mixtral(), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)  # strong enough to plant intruders
    model.save_pretrained(str(root / "adapter"))
    model.merge_and_unload().save_pretrained(str(root / "merged"))
    return root


def test_target_parameters_adapter_is_refused_with_what_to_pass(moe):
    res = CliRunner().invoke(main, ["detect", str(moe / "base"), str(moe / "adapter"), "--no-cache"])
    assert res.exit_code == 2 and "target_parameters ['mlp.experts.down_proj']" in res.output, res.output
    assert "merge_and_unload(), then save_pretrained" in res.output and "Traceback" not in res.output


def test_merged_moe_is_analysed_per_expert_against_float64(moe, tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(main, ["detect", str(moe / "base"), str(moe / "merged"), "--json", str(out),
                                    "--top-k", "4", "--no-cache"])
    assert res.exit_code == 0, res.output
    rows = {m["name"]: m for m in json.loads(out.read_text())["matrices"]}
    base, merged = load_file(moe / "base" / "model.safetensors"), load_file(moe / "merged" / "model.safetensors")
    experts = [n for n in base if ".experts." in n and n.endswith("w2.weight")]
    assert len(experts) == 4 and all(n in rows for n in experts)  # each expert its own matrix, on-disk names
    found = 0
    for name in experts:
        _, left, _ = reference(base[name].double(), merged[name].double(), 4)
        assert torch.allclose(torch.tensor(rows[name]["max_cos"], dtype=torch.float64), left, atol=1e-4), name
        assert rows[name]["intruders"] == [i for i, c in enumerate(left.tolist()) if c < 0.5], name
        found += len(rows[name]["intruders"])
    assert found > 0


def test_fused_3d_tensors_are_named_as_not_analysed(tmp_path, caplog):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=gen)
    fused = torch.randn(4, 24, 16, generator=gen)
    for name, shift in (("base", 0.0), ("tuned", 1.0)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.experts.down_proj": fused + shift,
                   "model.layers.0.self_attn.q_proj.weight": W + shift}, tmp_path / name / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="repair.pairs"):
        res = CliRunner().invoke(main, ["detect", str(tmp_path / "base"), str(tmp_path / "tuned"), "--no-cache"])
    assert res.exit_code == 0, res.output
    assert "1 3-D tensors (experts fused in one tensor, e.g. model.layers.0.mlp.experts.down_proj) are not " \
           "analysed" in caplog.text
