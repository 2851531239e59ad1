"""AdaLoRA adapters take the low-rank path: ΔW = B·(A ⊙ E)·scaling / (ranknum + 1e-5), read as peft's loaded
AdaLoraModel holds it, before and after its rank allocation (``rank_pattern``, ranks pruned per module, some to 0).
Oracles: peft's own ``merge_and_unload()`` of ``PeftModel.from_pretrained``, and float64 SVDs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import plain_merge, tiny_llama
from safetensors.torch import load_file
from test_structured import reference

from repair.cli import main

TARGETS = ["q_proj", "v_proj", "down_proj"]


def trained_adalora(allocate: bool, out):
    """An AdaLoRA adapter with strong updates; ``allocate``: trained through peft's rank allocation first."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(4)
    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=8,
                        target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(tiny_llama(), cfg)
    if allocate:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x = torch.randint(0, 128, (4, 16))
        for step in range(6):
            model(input_ids=x, labels=x).loss.backward()
            model.base_model.update_and_allocate(step)  # peft's budget: masks ranks, then rank_pattern
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.add_(torch.randn_like(p) * 3.0)
            elif "lora_B" in name:
                p.mul_(3.0)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=["before allocation", "after allocation"])
def adalora(request, tmp_path_factory):
    from peft import PeftModel

    root = tmp_path_factory.mktemp("adalora")
    path = trained_adalora(request.param == "after allocation", root / "adapter")
    PeftModel.from_pretrained(tiny_llama(), str(path)).merge_and_unload().save_pretrained(str(root / "merged"))
    pattern = json.loads((path / "adapter_config.json").read_text())["rank_pattern"]
    if request.param == "after allocation":
        assert pattern and len({sum(m) for m in pattern.values()}) > 1  # ranks differ per module
    return root


def test_the_merge_is_peft_s_bit_for_bit(adalora, llama_base, tmp_path):
    ours, peft_merged, base = plain_merge(llama_base, adalora / "adapter", adalora / "merged", tmp_path / "out")
    assert sum(not torch.equal(peft_merged[n], base[n]) for n in base) > 0
    assert set(ours) == set(peft_merged) and all(torch.equal(ours[n], peft_merged[n]) for n in ours)


def test_low_rank_detection_and_patch_against_float64(adalora, llama_base, tmp_path):
    report = tmp_path / "d.json"
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(adalora / "adapter"), "--top-k", "4", "--no-cache",
                                    "--json", str(report)])
    assert res.exit_code == 0, res.output
    rows = {m["name"]: m for m in json.loads(report.read_text())["matrices"]}
    assert rows and all(r["method"] == "structured" for r in rows.values())  # the low-rank path, not dense
    merged, base = load_file(adalora / "merged" / "model.safetensors"), load_file(llama_base / "model.safetensors")
    assert set(rows) == {n for n in base if not torch.equal(merged[n], base[n])}  # rank-0 modules change nothing
    out = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(adalora / "adapter"), "--scale", "0", "--top-k", "4",
                                    "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    written = load_file(out / "model.safetensors")
    found = 0
    for name, row in rows.items():
        _, left, _ = reference(base[name].double(), merged[name].double(), 4)
        assert row["intruders"] == [i for i, c in enumerate(left.tolist()) if c < 0.5], name
        U, S, Vh = torch.linalg.svd(merged[name].double())
        idx = row["intruders"]
        expected = merged[name].double() - (U[:, idx] * S[idx]) @ Vh[idx]  # λ = 0 on the intruders
        assert (written[name].double() - expected).abs().max() <= 4e-6 * S[0], name
        found += len(idx)
    assert found > 0


def test_the_adapter_format_is_refused(adalora, llama_base, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(adalora / "adapter"), "--scale", "0.5",
                                    "--format", "adapter", "--no-cache", "--out", str(out)])
    assert res.exit_code == 2 and "is an AdaLoRA adapter" in res.output and "use --format merged" in res.output
    assert not out.exists()
