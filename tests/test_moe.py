"""Mixture-of-experts models as users have them today: what is analysed, what is refused, and what to pass.

Tiny Mixtral and Qwen-MoE models built in-process: transformers keeps their experts fused in 3-D parameters in
memory and saves them one by one on disk (``block_sparse_moe.experts.N.w2.weight``); and a tiny gpt-oss, whose
experts are fused on disk too. Oracle: float64 SVDs of the saved tensors, and peft's own ``merge_and_unload()``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import plain_merge
from safetensors.torch import load_file, save_file
from test_structured import reference

from repair.cli import main


def tiny_mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg)


def detect_rows(base: Path, tuned: Path, out: Path, *extra: str) -> dict[str, dict]:
    """``repair detect BASE TUNED --json OUT --top-k 4 --no-cache`` (plus ``extra``): its matrices by name."""
    res = CliRunner().invoke(main, ["detect", str(base), str(tuned), "--json", str(out), "--top-k", "4",
                                    "--no-cache", *extra])
    assert res.exit_code == 0, res.output
    return {m["name"]: m for m in json.loads(out.read_text())["matrices"]}


def tiny_qwen_moe(seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=40,
                         shared_expert_intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    return Qwen2MoeForCausalLM(cfg)


MOE_MODELS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen_moe}


@pytest.fixture(scope="module", params=sorted(MOE_MODELS))
def moe(request, tmp_path_factory):
    """A base whose experts transformers fuses only in memory, a target_parameters LoRA on both fused expert
    parameters and q_proj, and that adapter merged by peft (saved one tensor per expert, as on disk)."""
    from peft import LoraConfig, get_peft_model

    build = MOE_MODELS[request.param]
    if not any(p.ndim == 3 for p in build().parameters()):
        pytest.skip("this transformers keeps the experts as one module each in memory (before 5.0): "
                    "target_parameters has no fused tensor to target")
    root = tmp_path_factory.mktemp(request.param)
    build().save_pretrained(str(root / "base"))
    torch.manual_seed(1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
                     target_modules=["q_proj"], init_lora_weights=False)
    save_adapter_and_merge(get_peft_model(build(), cfg), root, boost=20.0)
    root.joinpath("kind").write_text(request.param)
    return root


def save_adapter_and_merge(model, root, boost: float) -> None:
    """Scale every lora_B by ``boost`` (strong enough to plant intruders), then save the adapter to
    root/adapter and peft's merge_and_unload() to root/merged."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(boost)
    model.save_pretrained(str(root / "adapter"))
    model.merge_and_unload().save_pretrained(str(root / "merged"))


def test_in_memory_fused_target_parameters_merge_as_peft_does(moe, tmp_path):
    """λ = 1 writes the plain merge in the base's own per-expert layout: every expert tensor and q_proj as
    peft's merge_and_unload() saved them, to 1e-5 relative; every other tensor bit-equal."""
    ours, peft_merged, base = plain_merge(moe / "base", moe / "adapter", moe / "merged", tmp_path / "out")
    assert set(ours) == set(peft_merged) == set(base)  # the checkpoint's own per-expert names
    changed = [n for n in base if (".experts." in n and "shared" not in n) or "q_proj.weight" in n]
    assert len([n for n in changed if ".experts." in n]) == 12  # 4 experts x (gate, up, down)
    for name in changed:
        delta, want = ours[name] - base[name], peft_merged[name] - base[name]
        assert want.norm() > 0.05 * base[name].norm(), name  # the adapter changes it
        assert (delta - want).norm() <= 1e-5 * want.norm(), name
    assert all(torch.equal(ours[n], peft_merged[n]) for n in base if n not in changed)


def test_in_memory_fused_target_parameters_report_as_their_merge(moe, tmp_path):
    """The adapter and its merged checkpoint give the same report, per expert under the on-disk names, with the
    intruders float64 SVDs of the merged tensors find."""
    rows = detect_rows(moe / "base", moe / "adapter", tmp_path / "adapter.json")
    merged_rows = detect_rows(moe / "base", moe / "merged", tmp_path / "merged.json")
    base, merged = load_file(moe / "base" / "model.safetensors"), load_file(moe / "merged" / "model.safetensors")
    experts = [n for n in base if ".experts." in n and "shared" not in n]
    assert all(n in rows and n in merged_rows for n in experts)
    found = 0
    for name in experts:
        _, left, _ = reference(base[name].double(), merged[name].double(), 4)
        assert torch.allclose(torch.tensor(rows[name]["max_cos"], dtype=torch.float64), left, atol=1e-4), name
        assert rows[name]["intruders"] == merged_rows[name]["intruders"] == \
            [i for i, c in enumerate(left.tolist()) if c < 0.5], name
        found += len(rows[name]["intruders"])
    assert found > 0


def test_in_place_edits_of_per_expert_tensors_reach_the_fused_parameter(moe, tmp_path):
    """A sweep on the merged checkpoint, as `repair sweep` runs it on a model transformers loaded from BASE: the
    on-disk expert tensors land in the fused parameters. Oracle: transformers' own loading of the merged and
    of the patched checkpoint; restore() gives the merge back exactly."""
    from transformers import AutoModelForCausalLM

    from repair.detection.detector import DetectOptions
    from repair.edit.inplace import InPlacePatcher

    def params(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    opts = DetectOptions(top_k=4, cache=False)
    model = AutoModelForCausalLM.from_pretrained(str(moe / "base"))
    patcher = InPlacePatcher(model, opts.pairs(str(moe / "base"), str(moe / "merged")), opts)
    merged = params(AutoModelForCausalLM.from_pretrained(str(moe / "merged")))
    assert params(model).keys() == merged.keys() and all(torch.equal(p, merged[n]) for n, p in params(model).items())
    patched = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", str(moe / "base"), str(moe / "merged"), "--scale", "0.0",
                                    "--top-k", "4", "--no-cache", "--out", str(patched)])
    assert res.exit_code == 0, res.output
    written = params(AutoModelForCausalLM.from_pretrained(str(patched)))
    patcher.apply(0.0)
    now = params(model)
    edited = [n for n in now if not torch.equal(now[n], merged[n])]
    assert any(".experts." in n for n in edited)
    assert all(torch.allclose(now[n], written[n], atol=1e-6) for n in now)
    patcher.restore()
    assert all(torch.equal(p, merged[n]) for n, p in params(model).items())


def test_fused_3d_tensors_are_named_as_not_analysed(tmp_path, caplog):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=gen)
    fused = torch.randn(4, 24, 16, generator=gen)
    for name, shift in (("base", 0.0), ("tuned", 1.0)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.experts.down_proj": fused + shift,
                   "model.layers.0.self_attn.q_proj.weight": W + shift}, tmp_path / name / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="repair.adapters.pairs"):
        res = CliRunner().invoke(main, ["detect", str(tmp_path / "base"), str(tmp_path / "tuned"), "--no-cache"])
    assert res.exit_code == 0, res.output
    assert "1 3-D tensors (e.g. model.layers.0.mlp.experts.down_proj) are not analysed: no transformers experts " \
           "class of this checkpoint's config.json owns them" in caplog.text


# --- experts fused in one 3-D tensor on disk (gpt-oss): one matrix per expert, oriented by transformers ---

DOWN = "model.layers.0.mlp.experts.down_proj"
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
PLANTED = (1, 3)  # experts of down_proj given a strong new direction


def tiny_gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=64, hidden_size=48, intermediate_size=32, head_dim=8, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"])
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():  # the experts start empty: give them weights with a spectrum
        for p in model.parameters():
            if p.ndim == 3:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A tiny gpt-oss base (experts fused (E, in, out) on disk, as transformers saves them) and a full fine-tune
    whose down_proj experts 1 and 3 gain a strong direction: (out, in) = σ u vᵀ, stored as its transpose."""
    pytest.importorskip("transformers.integrations.moe", reason="transformers before its experts classes' layout "
                        "flags (use_experts_implementation): fused experts are left out with a warning there")
    root = tmp_path_factory.mktemp("fused")
    model = tiny_gpt_oss()
    assert model.model.layers[0].mlp.experts.is_transposed  # transformers' own flag: forward is x @ W[e]
    model.save_pretrained(str(root / "base"))
    stored = load_file(root / "base" / "model.safetensors")
    assert stored[DOWN].shape == (4, 32, 48) and stored[GATE_UP].ndim == 3  # (E, in, out) on disk
    tuned = {k: v.clone() for k, v in stored.items()}
    for e in PLANTED:  # spread evenly over 16 low-ranked base directions: |cos| 1/4 with each, on both sides
        U0, _, V0h = torch.linalg.svd(stored[DOWN][e].double().T, full_matrices=False)  # (out, in) = (48, 32)
        u, v = U0[:, 8:24].sum(1) / 4, V0h[8:24].sum(0) / 4
        tuned[DOWN][e] += (6.0 * torch.outer(u, v)).T.to(tuned[DOWN].dtype)
    (root / "tuned").mkdir()
    save_file(tuned, root / "tuned" / "model.safetensors", metadata={"format": "pt"})
    (root / "tuned" / "config.json").write_text((root / "base" / "config.json").read_text())
    return root


def _oriented(t: torch.Tensor) -> torch.Tensor:
    return t.double().T  # (in, out) slice -> (out, in)


def test_fused_experts_are_analysed_one_by_one_against_float64(fused, tmp_path):
    rows = detect_rows(fused / "base", fused / "tuned", tmp_path / "report.json", "--side", "both")
    base, tuned = load_file(fused / "base" / "model.safetensors"), load_file(fused / "tuned" / "model.safetensors")
    for tensor in (DOWN, GATE_UP):
        for e in range(4):
            assert f"{tensor}[{e}]" in rows, sorted(rows)
    found = set()
    for e in range(4):
        row = rows[f"{DOWN}[{e}]"]
        assert row["module_type"] == "down_proj" and row["shape"] == [32, 48] and row["transposed"]  # (in, out)
        S, left, right = reference(_oriented(base[DOWN][e]), _oriented(tuned[DOWN][e]), 4)
        assert torch.allclose(torch.tensor(row["sigma"], dtype=torch.float64), S, rtol=1e-4)
        assert torch.allclose(torch.tensor(row["max_cos_left"], dtype=torch.float64), left, atol=1e-4)
        assert torch.allclose(torch.tensor(row["max_cos_right"], dtype=torch.float64), right, atol=1e-4)
        want = [i for i in range(4) if max(float(left[i]), float(right[i])) < 0.5]
        assert row["intruders"] == want, e
        if want:
            found.add(e)
    assert found == set(PLANTED)
    assert all(not rows[f"{GATE_UP}[{e}]"]["intruders"] for e in range(4))  # unchanged experts


def test_patched_fused_experts_are_written_back_in_their_layout(fused, tmp_path):
    from transformers import GptOssForCausalLM

    out = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", str(fused / "base"), str(fused / "tuned"), "--scale", "0.25",
                                    "--top-k", "4", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    base = load_file(fused / "base" / "model.safetensors")
    tuned = load_file(fused / "tuned" / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert set(written) == set(tuned) and all(written[k].shape == tuned[k].shape for k in tuned)
    for e in range(4):
        if e not in PLANTED:
            assert torch.equal(written[DOWN][e], tuned[DOWN][e])
            continue
        W = _oriented(tuned[DOWN][e])
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        _, left, right = reference(_oriented(base[DOWN][e]), W, 4)
        idx = [i for i in range(4) if max(float(left[i]), float(right[i])) < 0.5]
        want = W + (U[:, idx] * ((0.25 - 1) * S[idx])) @ Vh[idx]
        assert torch.allclose(_oriented(written[DOWN][e]), want, atol=1e-5)
    assert torch.equal(written[GATE_UP], tuned[GATE_UP])
    loaded = GptOssForCausalLM.from_pretrained(str(out))  # transformers reads the fused layout back
    assert torch.equal(loaded.state_dict()[DOWN], written[DOWN])


def test_in_place_edits_reach_the_fused_parameter(fused, tmp_path):
    from repair.detection.detector import DetectOptions
    from repair.edit.inplace import InPlacePatcher

    opts = DetectOptions(top_k=4, side="both", cache=False)
    model = tiny_gpt_oss(seed=9)
    src = opts.pairs(str(fused / "base"), str(fused / "tuned"))
    patcher = InPlacePatcher(model, src, opts)
    tuned = load_file(fused / "tuned" / "model.safetensors")
    param = model.get_parameter(DOWN)
    assert torch.equal(param.detach(), tuned[DOWN])  # the fine-tune, loaded expert by expert
    patched = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", str(fused / "base"), str(fused / "tuned"), "--scale", "0.0",
                                    "--top-k", "4", "--side", "both", "--no-cache", "--out", str(patched)])
    assert res.exit_code == 0, res.output
    patcher.apply(0.0)
    assert torch.allclose(param.detach(), load_file(patched / "model.safetensors")[DOWN], atol=1e-6)
    patcher.restore()
    assert torch.equal(param.detach(), tuned[DOWN])


@pytest.fixture(scope="module")
def fused_lora(fused, tmp_path_factory):
    """A peft LoRA on the gpt-oss base: target_parameters on both fused expert tensors, and q_proj; and the same
    adapter merged by peft's merge_and_unload() (the oracle)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    root = tmp_path_factory.mktemp("fused-lora")
    torch.manual_seed(3)
    cfg = LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
                     target_modules=["q_proj"], init_lora_weights=False)
    save_adapter_and_merge(get_peft_model(GptOssForCausalLM.from_pretrained(str(fused / "base")), cfg), root, 30.0)
    return root


def test_target_parameters_lora_merges_as_peft_does(fused, fused_lora, tmp_path):
    """λ = 1 writes the plain merge: every tensor equal to merge_and_unload()'s (experts, q_proj and the rest)."""
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["patch", str(fused / "base"), str(fused_lora / "adapter"), "--scale", "1.0",
                                    "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ours, peft_merged = load_file(out / "model.safetensors"), load_file(fused_lora / "merged" / "model.safetensors")
    assert set(ours) == set(peft_merged)
    base = load_file(fused / "base" / "model.safetensors")
    for name in (DOWN, GATE_UP, "model.layers.0.self_attn.q_proj.weight"):
        delta, want = ours[name] - base[name], peft_merged[name] - base[name]
        assert want.norm() > 0.1 * base[name].norm(), name  # the adapter changes it
        assert (delta - want).norm() <= 1e-5 * want.norm(), name
    assert all(torch.equal(ours[n], peft_merged[n]) for n in ours if n not in (DOWN, GATE_UP)
               and "q_proj" not in n)


def test_target_parameters_lora_is_analysed_per_expert_against_float64(fused, fused_lora, tmp_path):
    rows = detect_rows(fused / "base", fused_lora / "adapter", tmp_path / "report.json")
    base, merged = load_file(fused / "base" / "model.safetensors"), load_file(fused_lora / "merged" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in rows
    found = 0
    for tensor in (DOWN, GATE_UP):
        for e in range(4):
            row = rows[f"{tensor}[{e}]"]
            _, left, _ = reference(_oriented(base[tensor][e]), _oriented(merged[tensor][e]), 4)
            assert torch.allclose(torch.tensor(row["max_cos"], dtype=torch.float64), left, atol=1e-4), row["name"]
            assert row["intruders"] == [i for i in range(4) if float(left[i]) < 0.5], row["name"]
            found += len(row["intruders"])
    assert found > 0


def test_target_parameters_lora_refuses_the_adapter_format(fused, fused_lora, tmp_path):
    res = CliRunner().invoke(main, ["patch", str(fused / "base"), str(fused_lora / "adapter"), "--format", "adapter",
                                    "--scale", "0.5", "--no-cache", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "LoRA adapter on fused expert parameters" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_target_parameters_without_a_fused_tensor_or_mapping_are_refused(moe, llama_base, tmp_path):
    """The experts adapter on a base that has neither the fused tensor nor a conversion mapping building it."""
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(moe / "adapter"), "--scale", "0.5", "--no-cache",
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "target_parameters ['mlp.experts." in res.output and "neither of which holds here" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
