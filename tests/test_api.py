"""The Python API: live PeftModels give what the CLI gives on the saved folders; defaults equal the CLI's."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from conftest import same_records, save_model, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import repair
from repair.errors import RepairError

# model, LoraConfig arguments, --modules (None: the default selection)
VARIANTS = {
    "lora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), None),
    "dora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True), None),
    "rslora_patterns": (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                         rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6}), None),
    "gpt2_conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), None),
    "modules_to_save": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                         modules_to_save=["down_proj"]), None),
    "embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                  r"embed_tokens|q_proj"),
}


def live_adapter(model_fn, out, seed: int = 1, b_scale: float = 30.0, **lora):
    """A PeftModel with strong random updates (intruders by construction), also saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model_fn(), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
            elif "modules_to_save" in name and p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(out))
    return model


def reload(model_fn, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(model_fn(), str(adapter))


def max_diff(a: dict, b: dict) -> float:
    """The largest difference between same-named tensors, relative to each tensor's scale (spectral norm of a
    matrix, largest magnitude otherwise): float32 products round by a few ulps of ‖W‖₂ (σ ≈ 80 here, so two
    paths differ by ~3e-6 absolute where the entries themselves are ~1)."""
    def scale(t: torch.Tensor) -> float:
        t = t.double()
        return float(torch.linalg.matrix_norm(t, ord=2) if t.dim() == 2 else t.abs().max()) or 1.0

    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) / scale(b[k]) for k in a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_live_model_gives_what_the_folders_give(variant, tmp_path):
    from peft import get_peft_model_state_dict

    model_fn, lora, modules = VARIANTS[variant]
    base = save_model(model_fn(), tmp_path / "base")
    live = live_adapter(model_fn, tmp_path / "adapter", **lora)
    opts = dict(cache=False, modules=modules, device="cpu")  # a live model's default is its weights' device

    on_model = repair.detect_model(live, **opts)
    on_files = repair.detect(base, tmp_path / "adapter", **opts)
    assert on_files.total_intruders > 0
    assert same_records(on_model.matrices, on_files.matrices)

    patched, report = repair.patch_model(live, 0.25, **opts)
    written = repair.patch(base, tmp_path / "adapter", 0.25, tmp_path / "out", format="adapter", **opts)
    assert patched.active_adapters == [report.adapter] == ["default_repaired"]
    assert report.patched_matrices == written.patched_matrices > 0
    assert same_records(report.matrices, written.matrices)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert max_diff(get_peft_model_state_dict(patched, adapter_name=report.adapter), saved) <= 1e-6

    merged, _ = repair.patch_model(reload(model_fn, tmp_path / "adapter"), 0.25, merge=True, **opts)
    repair.patch(base, tmp_path / "adapter", 0.25, tmp_path / "merged", **opts)
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    state = merged.state_dict()
    assert max_diff({k: state[k] for k in saved}, saved) <= 1e-6
    assert not any("lora_" in k for k in state)  # unloaded, as merge_and_unload() leaves it


def test_patched_live_adapter_is_exact_where_peft_truncates(tmp_path):
    """The new adapter reproduces W' = W_tuned + Σ (λ-1) σ u vᵀ; checked against a float64 SVD of W_tuned."""
    live = live_adapter(tiny_llama, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    found = {m.name: m.intruders for m in repair.detect_model(live, cache=False).matrices}
    W = {}
    for name, m in live.base_model.model.named_modules():
        if name.endswith("q_proj"):
            W[f"{name}.weight"] = m.get_base_layer().weight.double() + m.get_delta_weight("default").double()
    patched, _ = repair.patch_model(live, 0.0, cache=False)
    for name, m in patched.base_model.model.named_modules():
        if not name.endswith("q_proj"):
            continue
        U, S, Vh = torch.linalg.svd(W[f"{name}.weight"])  # the float64 oracle
        idx = found[f"{name}.weight"]
        expected = W[f"{name}.weight"] - (U[:, idx] * S[idx]) @ Vh[idx]
        got = m.get_base_layer().weight.double() + m.get_delta_weight("default_repaired").double()
        assert m.r["default_repaired"] == 2 + len(idx)
        assert torch.allclose(got, expected, atol=1e-5), name


def test_live_refusals_are_the_file_paths_sentences(tmp_path):
    from peft import IA3Config, get_peft_model

    with pytest.raises(RepairError, match="expected a peft PeftModel"):
        repair.detect_model(tiny_llama())
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]))
    refused = r"peft_type 'IA3' is not supported \(supported: 'LORA'.*merge_and_unload\(\).*as TUNED, a full fine-tune\.$"
    with pytest.raises(RepairError, match=refused):
        repair.detect_model(ia3)
    live = live_adapter(tiny_llama, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unknown option.*topk.*expected some of"):
        repair.detect_model(live, topk=3)
    with pytest.raises(RepairError, match="^epsilon: expected a number in"):
        repair.detect_model(live, epsilon=2.0)
    with pytest.raises(RepairError, match="expected λ in"):
        repair.patch_model(live, 1.5)
    repair.patch_model(live, 0.5, cache=False)
    live.set_adapter("default")
    with pytest.raises(RepairError, match="already has an adapter 'default_repaired'"):
        repair.patch_model(live, 0.5, cache=False)


def test_patching_a_patched_adapter_again_keeps_the_new_ranks(tmp_path):
    """The second patch's exact-name rank_pattern entries replace the first one's (peft takes the first match)."""
    from peft import get_peft_model_state_dict

    base = save_model(tiny_llama(), tmp_path / "base")
    live_adapter(tiny_llama, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    cpu = dict(cache=False, device="cpu")  # the live model below is on the CPU, its default device
    once = repair.patch(base, tmp_path / "a", 0.5, tmp_path / "once", format="adapter", **cpu)
    twice = repair.patch(base, tmp_path / "once", 0.5, tmp_path / "twice", format="adapter", **cpu)
    assert once.patched_matrices > 0 and twice.patched_matrices > 0
    live = reload(tiny_llama, tmp_path / "twice")  # peft builds every module with the rank the file holds
    saved = load_file(str(tmp_path / "twice" / "adapter_model.safetensors"))
    assert max_diff(get_peft_model_state_dict(live), saved) == 0
    again, report = repair.patch_model(reload(tiny_llama, tmp_path / "once"), 0.5, **cpu)
    assert max_diff(get_peft_model_state_dict(again, adapter_name=report.adapter), saved) <= 1e-6


def cli_defaults(command, *required: str) -> dict:
    """The values a command receives when only its required arguments are given (click's own parsing)."""
    return command.make_context(command.name, list(required)).params


def test_api_defaults_are_the_cli_defaults():
    from evals import api as evals_api
    from repair import api
    from repair.cli import commands as cli
    from repair.detection.detector import DetectOptions
    from repair.io.writer import parse_size

    assert set(api.DetectKwargs.__annotations__) == {f.name for f in dataclasses.fields(DetectOptions)}
    detect_cli = cli_defaults(cli.detect, "B", "T")
    for f in dataclasses.fields(DetectOptions):
        if f.name == "cache":
            assert f.default is True and detect_cli["no_cache"] is False
        elif f.name == "method":
            assert f.default == "auto" and detect_cli["method"] is None  # None means auto (see repair.cli.options.method_of)
        elif f.name == "batch_bytes":
            continue  # not a CLI option
        else:
            assert f.default == detect_cli[f.name], f.name
    patch_cli = cli_defaults(cli.patch, "B", "T", "--out", "O")
    sig = inspect.signature(api.patch).parameters
    assert sig["format"].default == patch_cli["fmt"]
    assert sig["max_shard_size"].default == parse_size(patch_cli["max_shard_size"])
    for name in ("allow_amplify", "overwrite", "plan", "per_matrix"):
        assert sig[name].default == patch_cli[name], name
    sweep_cli = cli_defaults(cli.sweep, "B", "T", "--out", "O")
    sig = inspect.signature(evals_api.sweep).parameters
    lm_eval_flags = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs", "seed",
                     "log_samples")
    for name in ("scales", "tasks", "forgetting", "limit", "pick", "write_picked", "overwrite", "control",
                 "per_matrix", "batch_size",
                 "allow_amplify", "dtype", "device_map", *lm_eval_flags):
        assert sig[name].default == sweep_cli[name], name
    assert sig["format"].default == sweep_cli["fmt"]
    release_cli = cli_defaults(cli.release, "B", "T", "--out", "O", "--max-acc-drop", "0.1")
    sig = inspect.signature(evals_api.release).parameters
    assert sig["format"].default == release_cli["fmt"]
    for name in ("scales", "forgetting", "limit", "control", "fail_above", "overwrite", "per_matrix", "batch_size",
                 "allow_amplify", "dtype", "device_map", *lm_eval_flags):
        assert sig[name].default == release_cli[name], name
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-continual-lora.yaml"
    continual_cli = cli_defaults(cli.main.commands["continual"], str(recipe), "--out", "O")
    sig = inspect.signature(evals_api.continual_learning).parameters
    for name in ("limit", "forgetting", "batch_size", "overwrite", "overrides", *lm_eval_flags):
        assert sig[name].default == continual_cli[name], name
    compare_cli = cli_defaults(cli.compare, "M", "--tasks", "t")
    sig = inspect.signature(evals_api.compare).parameters
    for name in ("limit", "base", "forgetting", "out", "batch_size", "device", "dtype", "device_map", *lm_eval_flags):
        assert sig[name].default == compare_cli[name], name


def test_package_exports_load_on_first_use():
    import subprocess
    import sys

    code = "import repair, sys; assert 'torch' not in sys.modules; repair.detect_model; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(repair.__all__) >= {"detect", "patch", "detect_model", "patch_model", "IntruderMonitor"}
    with pytest.raises(AttributeError):
        repair.no_such_thing  # noqa: B018
