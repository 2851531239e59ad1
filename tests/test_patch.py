"""`repair patch`: merged and adapter outputs through the real loaders, plans and safe writing."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, merged_state, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file

from repair.adapters.pairs import PairSource
from repair.cli import main
from repair.detection.detector import DetectOptions
from repair.edit.patcher import PatchOptions, patch
from repair.io.checkpoint import file_sha256
from repair.io.sources import resolve

MODELS = {"llama": (tiny_llama, "llama_base", ["q_proj", "v_proj", "down_proj"], {}),
          "gpt2": (tiny_gpt2, "gpt2_base", ["c_attn", "c_fc"], {"fan_in_fan_out": True}),
          "llama_dora": (tiny_llama, "llama_base", ["q_proj", "up_proj"], {"use_dora": True})}


def expected_weights(base, adapter, scale, top_k=10, epsilon=0.5, chosen=None):
    """W' per matrix from float64 SVDs of W0 and W_tuned (Definition 1 itself), with the number of intruders:
    the oracle for the writers. ``chosen`` (name -> indices) replaces Definition 1 where a plan names them."""
    out = {}
    for pair in PairSource(resolve(str(base)), resolve(str(adapter))):
        Wt = pair.tuned.double()
        U, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
        U0 = torch.linalg.svd(pair.base.double(), full_matrices=False)[0]
        idx = torch.nonzero((U[:, :top_k].T @ U0).abs().amax(1) < epsilon).flatten()
        if chosen is not None:
            idx = torch.tensor(chosen.get(pair.name, []), dtype=torch.long)
        W = Wt + (scale - 1) * (U[:, idx] * S[idx]) @ Vh[idx]
        out[pair.name] = (W.T if pair.transposed else W, len(idx))
    return out


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(params=sorted(MODELS))
def model_case(request, tmp_path):
    fn, base_fixture, targets, extra = MODELS[request.param]
    base = request.getfixturevalue(base_fixture)
    adapter = make_adapter(fn, base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=targets,
                           b_scale=2.0, **extra)
    return fn, base, adapter


# W' against the float64 oracle: the certified path polishes its triplets in float64; the exact
# path on these small matrices is a float32 SVD, good to a few float32 rounding errors.
TOLERANCE = {"certified": 1e-6, "exact": 5e-6}


@pytest.mark.parametrize("method", sorted(TOLERANCE))
def test_merged_output_loads_in_transformers(model_case, tmp_path, method):
    from transformers import AutoModelForCausalLM

    fn, base, adapter = model_case
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["patch", str(base), str(adapter), "--scale", "0.25", "--out", str(out),
                                    "--method", method])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(str(out))
    state = model.state_dict()
    expected = expected_weights(base, adapter, 0.25)
    assert any(flag for _, flag in expected.values())
    for name, (W, _) in expected.items():
        assert rel(state[name], W) < TOLERANCE[method], name
    plain = merged_state(fn, adapter)  # every other tensor is exactly the plain merge
    for name, t in state.items():
        if name not in expected:
            assert torch.equal(t, plain[name]), name
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("method", sorted(TOLERANCE))
def test_adapter_output_loads_in_peft_and_reproduces_w_prime(model_case, tmp_path, method):
    from peft import PeftModel

    fn, base, adapter = model_case
    out = tmp_path / "patched-adapter"
    res = CliRunner().invoke(main, ["patch", str(base), str(adapter), "--scale", "0.25", "--out", str(out),
                                    "--format", "adapter", "--method", method])
    assert res.exit_code == 0, res.output
    loaded = PeftModel.from_pretrained(fn(), str(out))
    ranks = {name: module.r["default"] for name, module in loaded.named_modules() if hasattr(module, "lora_A")}
    merged = loaded.merge_and_unload().state_dict()
    for name, (W, intruders) in expected_weights(base, adapter, 0.25).items():
        assert rel(merged[name], W) < 1e-5, name
        module = next(m for m in ranks if name.removesuffix(".weight").endswith(m.split("base_model.model.")[-1]))
        assert ranks[module] == 2 + intruders, name  # one extra rank per intruder, as peft reads the config


def test_scale_one_is_bit_exact_plain_merge(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plain = merged_state(tiny_llama, llama_adapter)
    ours = load_file(str(out / "model.safetensors"))
    assert ours.keys() <= plain.keys()
    for name, t in ours.items():
        assert t.dtype == plain[name].dtype and torch.equal(t, plain[name]), name


def test_bfloat16_base_is_cast_back_and_plain_merge_bit_exact(tmp_path):
    base = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(str(base))

    def bf16_llama():
        return tiny_llama().to(torch.bfloat16)

    adapter = make_adapter(bf16_llama, base, tmp_path / "a", r=2, target_modules=["q_proj"], b_scale=3.0)
    out = tmp_path / "out"
    patch(str(base), str(adapter), PatchOptions(out=out, scale=0.0))
    ours = load_file(str(out / "model.safetensors"))
    plain = merged_state(bf16_llama, adapter)
    expected = expected_weights(base, adapter, 0.0)
    assert any(n for _, n in expected.values()) and all(t.dtype == torch.bfloat16 for t in ours.values())
    for name, t in ours.items():
        if expected.get(name, (None, 0))[1]:  # W' in float64 from the bfloat16 inputs, rounded once to bfloat16
            assert torch.equal(t, expected[name][0].to(torch.bfloat16)) or rel(t, expected[name][0]) < 4e-3, name
        else:
            assert torch.equal(t, plain[name]), name


def test_same_inputs_give_byte_identical_safetensors(llama_base, llama_adapter, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        patch(str(llama_base), str(llama_adapter), PatchOptions(out=out, scale=0.5, format="adapter"))
        runs.append(out)
    assert (runs[0] / "adapter_model.safetensors").read_bytes() == (runs[1] / "adapter_model.safetensors").read_bytes()
    a, b = (json.loads((r / "repair_report.json").read_text()) for r in runs)
    a.pop("created"), b.pop("created")
    assert a == b


def test_provenance_in_report_and_metadata(llama_base, llama_adapter, tmp_path):
    before = file_sha256(llama_adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    patch(str(llama_base), str(llama_adapter), PatchOptions(out=out, scale=0.0))
    assert file_sha256(llama_adapter / "adapter_model.safetensors") == before  # inputs untouched
    report = json.loads((out / "repair_report.json").read_text())
    prov = report["provenance"]
    assert prov["arguments"]["scale"] == 0.0 and prov["tool_version"]
    hashes = {i["path"]: i["sha256"] for i in prov["inputs"]}
    assert hashes[str(llama_adapter / "adapter_model.safetensors")] == before
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["intruder_repair"]) == prov


def test_sharded_output_with_index_loads(llama_base, llama_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0",
                                    "--out", str(out), "--max-shard-size", "60KB"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not list(out.glob("*.part"))
    AutoModelForCausalLM.from_pretrained(str(out))


def test_plan_round_trip_patches_only_what_it_lists(llama_base, llama_adapter, tmp_path):
    plan_path = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(llama_adapter), "--plan-out", str(plan_path)])
    assert res.exit_code == 0, res.output
    plan = json.loads(plan_path.read_text())
    names = sorted(plan["matrices"])
    assert len(names) >= 2
    keep, spare = names[0], names[1:]
    for n in spare:
        del plan["matrices"][n]
    plan["matrices"][keep]["scale"] = 0.5
    plan["matrices"][keep]["intruders"] = plan["matrices"][keep]["intruders"][:1]
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--plan", str(plan_path),
                                    "--out", str(out), "--format", "adapter"])
    assert res.exit_code == 0, res.output
    from peft import PeftModel

    merged = PeftModel.from_pretrained(tiny_llama(), str(out)).merge_and_unload().state_dict()
    chosen = {keep: plan["matrices"][keep]["intruders"]}  # the plan's one direction, at the plan's λ
    for name, (W, n) in expected_weights(llama_base, llama_adapter, 0.5, chosen=chosen).items():
        assert n == (name == keep) and rel(merged[name], W) < 1e-5, name


def test_full_checkpoint_input_merged_only(llama_base, llama_adapter, tmp_path):
    from peft import PeftModel

    merged_dir = tmp_path / "merged-in"
    PeftModel.from_pretrained(tiny_llama(), str(llama_adapter)).merge_and_unload().save_pretrained(str(merged_dir))
    out = tmp_path / "out"
    report = patch(str(llama_base), str(merged_dir), PatchOptions(out=out, scale=0.0))
    assert report.patched_matrices > 0
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(merged_dir), "--scale", "0", "--format",
                                    "adapter", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "must be a PEFT LoRA adapter" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--scale", "1.5"], "--allow-amplify"),
    (["--scale", "-0.1"], "expected λ in [0, 1]"),
    ([], "--scale: required"),
    (["--scale", "0", "--max-shard-size", "lots"], "--max-shard-size"),
])
def test_patch_bad_arguments(llama_base, llama_adapter, tmp_path, extra, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--out", str(out), *extra])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_allow_amplify(llama_base, llama_adapter, tmp_path):
    patch(str(llama_base), str(llama_adapter), PatchOptions(out=tmp_path / "o", scale=1.5, allow_amplify=True))
    ours = load_file(str(tmp_path / "o" / "model.safetensors"))
    expected = expected_weights(llama_base, llama_adapter, 1.5)
    assert any(n for _, n in expected.values())
    for name, (W, _) in expected.items():
        assert rel(ours[name], W) < TOLERANCE["exact"], name  # small matrices: the exact path


def test_output_folder_rules(llama_base, llama_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "not empty" in res.output and (out / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(main, [*args, "--overwrite"])
    assert res.exit_code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    inside = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0",
                                       "--out", str(llama_adapter / "sub")])
    assert inside.exit_code == 2 and "inputs are never modified" in inside.output
    assert not (llama_adapter / "sub").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_failed_write_leaves_nothing(llama_base, llama_adapter, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def boom(*a, **k):  # what safetensors raises on a full disk: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--out", str(out)])
    assert res.exit_code == 3 and "No space left on device" in res.output and "nothing was written" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_only_selected_modules_are_patched(llama_base, llama_adapter, tmp_path):
    patch(str(llama_base), str(llama_adapter),
          PatchOptions(out=tmp_path / "o", scale=0.0, detect=DetectOptions(modules="q_proj")))
    ours, plain = load_file(str(tmp_path / "o" / "model.safetensors")), merged_state(tiny_llama, llama_adapter)
    expected = expected_weights(llama_base, llama_adapter, 0.0)
    assert sum(bool(n) for name, (_, n) in expected.items() if "q_proj" in name) >= 1
    for name, t in ours.items():
        if "q_proj" in name:
            assert rel(t, expected[name][0]) < TOLERANCE["exact"], name  # small matrices: the exact path
        else:  # every other matrix, intruders or not, is the plain merge
            assert torch.equal(t, plain[name]), name


def _biased_llama(dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_is_merged_bit_exact_with_peft(tmp_path, dtype):
    """lora_bias=True: the merged checkpoint's biases (and weights) are bit-exact with merge_and_unload() at λ = 1,
    the biases stay so at λ = 0.5 (a rescaled intruder changes weights only), and the adapter output keeps them."""
    from peft import PeftModel

    def fn():
        return _biased_llama(dtype)

    base = tmp_path / "base"
    fn().save_pretrained(str(base))
    adapter = make_adapter(fn, base, tmp_path / "a", r=2, lora_alpha=4, lora_bias=True, b_scale=3.0,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        lora_biases = [k for k in f.keys() if k.endswith("lora_B.bias")]
    assert len(lora_biases) == 6
    plain = merged_state(fn, adapter)
    for scale in ("1", "0.5"):
        out = tmp_path / f"m{scale}"
        res = CliRunner().invoke(main, ["patch", str(base), str(adapter), "--scale", scale, "--out", str(out)])
        assert res.exit_code == 0, res.output
        ours = load_file(str(out / "model.safetensors"))
        for name, t in ours.items():
            if scale == "1" or name.endswith(".bias"):
                assert t.dtype == plain[name].dtype and torch.equal(t, plain[name]), name
        changed = [n for n in ours if n.endswith(".bias") and not torch.equal(ours[n], load_file(
            str(base / "model.safetensors"))[n])]
        assert len(changed) == 6  # every LoRA bias moved its base bias
    out = tmp_path / "adapter-out"
    res = CliRunner().invoke(main, ["patch", str(base), str(adapter), "--scale", "0.5", "--format", "adapter",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = PeftModel.from_pretrained(fn(), str(out)).merge_and_unload().state_dict()
    for name in plain:
        if name.endswith(".bias"):
            assert torch.equal(merged[name], plain[name]), name


def test_lora_bias_without_a_base_bias_is_refused(llama_base, tmp_path):
    def fn():
        return _biased_llama()

    other = tmp_path / "biased"
    fn().save_pretrained(str(other))
    adapter = make_adapter(fn, other, tmp_path / "a", r=2, lora_bias=True, target_modules=["q_proj"])
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(adapter), "--scale", "0", "--out",
                                    str(tmp_path / "out")])
    assert res.exit_code == 2 and "has a LoRA bias (lora_bias=True)" in res.output, res.output
    assert not (tmp_path / "out").exists()
