"""Non-LoRA PEFT adapters (LoHa, LoKr, IA³, OFT, BOFT, VeRA): merged by peft one module at a time.

Oracles: peft's own ``merge_and_unload()`` of the whole model for W_tuned, and float64 SVDs of that
merge for the report and for the patched weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import merged_state, tiny_llama
from safetensors.torch import load_file
from test_structured import reference

from repair.cli import main
from repair.detection.detector import DetectOptions

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _configs():
    from peft import BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig, VeraConfig

    return {
        "loha": LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
        "ia3": IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False),
        "oft": OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS, init_weights=False),
        "boft": BOFTConfig(boft_block_size=8, target_modules=TARGETS, init_weights=False),
        "vera": VeraConfig(r=8, target_modules=TARGETS, init_weights=False),
    }


def save_adapter(kind: str, out) -> None:
    """A non-LoRA adapter of ``kind`` with non-trivial weights, saved by peft."""
    from peft import get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(tiny_llama(), _configs()[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.2, 2.0)
            elif "vera_lambda" in name:  # VeRA's scalings: strong ones on the shared random projections
                p.normal_(0, 30.0)
            elif p.requires_grad:
                p.mul_(3.0)  # strong enough updates to make intruders on the tiny model
    model.save_pretrained(str(out))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for kind in _configs():
        save_adapter(kind, root / kind)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", sorted(_configs()))
def test_tuned_weights_equal_merge_and_unload(kind, adapters, llama_base):
    oracle = merged_state(tiny_llama, adapters[kind])
    base = load_file(llama_base / "model.safetensors")
    src = DetectOptions(cache=False).pairs(str(llama_base), str(adapters[kind]))
    assert src.adapter is None and src.tuned.peft_type == kind.upper()
    assert sorted(src.names) == sorted(n for n in base if any(f"{t}.weight" in n for t in TARGETS))
    changed = 0
    for pair in src:
        want = oracle[pair.name]
        got = pair.tuned if isinstance(pair.tuned, torch.Tensor) else pair.tuned()
        assert torch.equal(got, want), pair.name  # bit-exact: the same float32 merge by the same peft code
        assert torch.equal(src.base.get(pair.name), base[pair.name])  # merging never touched the base's tensors
        changed += not torch.equal(want, base[pair.name])
    assert changed == len(src.names)  # every targeted weight really moved


@pytest.mark.parametrize("kind", ["loha", "oft", "vera"])
def test_detect_and_patch_against_float64(kind, adapters, llama_base, tmp_path, monkeypatch):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    oracle = merged_state(tiny_llama, adapters[kind])
    base = load_file(llama_base / "model.safetensors")
    out = tmp_path / "patched"
    main(["patch", str(llama_base), str(adapters[kind]), "--scale", "0", "--top-k", "5", "--out", str(out)],
         standalone_mode=False)
    detect_path = tmp_path / "detect.json"
    main(["detect", str(llama_base), str(adapters[kind]), "--top-k", "5", "--json", str(detect_path)],
         standalone_mode=False)
    rows = {m["name"]: m for m in json.loads(detect_path.read_text())["matrices"]}
    written = load_file(out / "model.safetensors")
    found = 0
    for name, row in rows.items():
        S, left, _ = reference(base[name].double(), oracle[name].double(), 6)
        step = S[:-1] - S[1:]  # (5,) gap to the next σ
        gap = step.minimum(torch.cat([step.new_tensor([float("inf")]), step[:-1]]))  # to the nearest neighbour
        tol = (1e-5 * S[0] / gap).clamp(1e-5, 1)  # float32 vectors: error ~ rounding / gap
        left = left[:5]
        assert ((torch.tensor(row["max_cos"], dtype=torch.float64) - left).abs() <= tol).all(), (name, gap)
        assert row["intruders"] == [i for i, c in enumerate(left.tolist()) if c < 0.5], name
        U, S, Vh = torch.linalg.svd(oracle[name].double())
        idx = row["intruders"]
        expected = oracle[name].double() - (U[:, idx] * S[idx]) @ Vh[idx]  # λ = 0 on the intruders
        err = (written[name].double() - expected).abs().max()
        assert err <= 4e-6 * S[0], (name, err)  # float32 rounding at the matrix's scale
        found += len(idx)
    assert found > 0
    for name, t in base.items():  # everything the adapter does not touch is the base's, bit for bit
        if name not in rows:
            assert torch.equal(written[name], t), name


def test_refusals_name_what_to_pass_instead(adapters, llama_base, llama_adapter, tmp_path):
    from click.testing import CliRunner
    from peft import FourierFTConfig, VeraConfig, get_peft_model

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(adapters["loha"]), "--scale", "0.5", "--out",
                                    str(out), "--format", "adapter", "--no-cache"])
    assert res.exit_code == 2 and "is a LOHA adapter, which is merged for analysis" in res.output, res.output
    assert "use --format merged." in res.output and not out.exists()
    cfg = VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)
    get_peft_model(tiny_llama(), cfg).save_pretrained(str(tmp_path / "vera"))
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(tmp_path / "vera"), "--no-cache"])
    assert res.exit_code == 2 and "saved without its shared projections" in res.output, res.output
    assert "save it with save_projection=True" in res.output
    cfg = FourierFTConfig(n_frequency=16, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), cfg).save_pretrained(str(tmp_path / "fourier"))
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(tmp_path / "fourier"), "--no-cache"])
    assert res.exit_code == 2 and "peft_type 'FOURIERFT' is not supported" in res.output, res.output
    assert "'ADALORA'; as saved adapter folders also 'LOHA', 'LOKR', 'IA3', 'OFT', 'BOFT', 'VERA', merged by peft " \
           "module by module" in res.output
    lora_as_ia3 = tmp_path / "ia3"  # LoRA tensors under an IA3 config that peft itself rejects
    lora_as_ia3.mkdir()
    (lora_as_ia3 / "adapter_model.safetensors").write_bytes((llama_adapter / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((llama_adapter / "adapter_config.json").read_text())
    (lora_as_ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(lora_as_ia3), "--no-cache"])
    assert res.exit_code == 2 and "peft could not apply this IA3 adapter to" in res.output, res.output
    assert "Traceback" not in res.output


def test_sweep_edits_a_merged_adapter_as_patch_does(adapters, llama_base, mc_task, corpus_file, tmp_path, monkeypatch):
    """The in-place sweep on a LoHa adapter: λ = 0 measures the model `repair patch --scale 0` writes."""
    from click.testing import CliRunner
    from conftest import char_tokenizer
    from test_evals import CORPUS, direct_nll
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(adapters["loha"]), "--scales", "0,1", "--task",
                                    str(mc_task), "--forgetting", str(corpus_file), "--control", "none",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "sweep.json").read_text())
    zero, one = report["points"]
    assert zero["intruders"] < one["intruders"] == report["total_intruders"]
    main(["patch", str(llama_base), str(adapters["loha"]), "--scale", "0", "--out", str(tmp_path / "p0")],
         standalone_mode=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p0"))
    assert zero["forgetting_nll"] == pytest.approx(direct_nll(model, char_tokenizer(), CORPUS), rel=1e-5)
