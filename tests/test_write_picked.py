"""`repair sweep --write-picked` writes the model it measured: the sweep's own intruders and triplets, no second
detection, even for an intruder planted 5e-4 inside ε (where a second detection could decide differently)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import save_model, tiny_llama

from repair.cli import main


@pytest.fixture(scope="module")
def near_epsilon(tmp_path_factory):
    """A base, a rank-1 adapter on layer 0's q_proj whose top singular vector has max |cos| c with every base
    singular vector (float64 oracle), and ε = c + 5e-4."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("near")
    base = save_model(tiny_llama(), root / "base")
    model = get_peft_model(tiny_llama(), LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"],
                                                    init_lora_weights=False))
    W0 = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().double()  # (64, 64)
    U0, S0, _ = torch.linalg.svd(W0)
    gen = torch.Generator().manual_seed(3)
    y = 0.5 * U0[:, 0] + (0.75 / 63) ** 0.5 * U0[:, 1:].sum(1)  # |cos| 0.5 with u0_0, 0.109 with the rest
    z = torch.randn(64, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_B["default"].weight.copy_((4 * S0[0] * y)[:, None].float())  # (64, 1)
        layer.lora_A["default"].weight.copy_((z / z.norm())[None, :].float())  # (1, 64)
    adapter = root / "adapter"
    model.save_pretrained(str(adapter))
    tuned = W0 + (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()).detach()
    u = torch.linalg.svd(tuned)[0][:, 0]
    c = float((U0.T @ u).abs().max())
    return base, adapter, c + 5e-4


def test_picked_checkpoint_is_the_measured_model_near_epsilon(near_epsilon, mc_task, corpus_file, tmp_path,
                                                              monkeypatch):
    from transformers import AutoModelForCausalLM

    import repair.edit.patcher
    from repair.detection.detector import DetectOptions
    from repair.edit.inplace import InPlacePatcher

    base, adapter, eps = near_epsilon

    def no_second_detection(*args, **kwargs):
        raise AssertionError("--write-picked ran a second detection")

    for name in ("analyse_pairs", "solve_pairs", "prefetch"):
        monkeypatch.setattr(repair.edit.patcher, name, no_second_detection)
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["sweep", str(base), str(adapter), "--task", str(mc_task), "--limit", "4",
                                    "--forgetting", str(corpus_file), "--scales", "0,0.5", "--epsilon", f"{eps:.6f}",
                                    "--pick", "max-acc-drop=1", "--write-picked", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "sweep.json").read_text())
    assert report["total_intruders"] == 1  # the planted direction, 5e-4 inside ε
    scale = report["pick"]["scale"]
    opts = DetectOptions(epsilon=float(f"{eps:.6f}"))
    measured = AutoModelForCausalLM.from_pretrained(str(base))
    InPlacePatcher(measured, opts.pairs(str(base), str(adapter)), opts).apply(scale)
    picked = AutoModelForCausalLM.from_pretrained(str(out / "picked")).state_dict()
    assert all(torch.equal(v, picked[k]) for k, v in measured.state_dict().items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(picked[q], AutoModelForCausalLM.from_pretrained(str(base)).state_dict()[q])
