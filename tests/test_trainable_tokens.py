"""LoRA with trainable tokens (peft's ``trainable_token_indices``): the embedding rows it replaces are part of
the fine-tune. Oracle: peft's own ``merge_and_unload()``."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import plain_merge, save_model, tiny_llama
from safetensors.torch import load_file

from repair.cli import main

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module", params=["list", "dict"])
def tokens(request, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp(f"tokens-{request.param}")
    save_model(tiny_llama(), root / "base")
    indices = [3, 5, 7] if request.param == "list" else {"embed_tokens": [3, 5, 7]}
    torch.manual_seed(2)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices,
                                                    init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # rows unlike the base's
    model.save_pretrained(str(root / "adapter"))
    model.merge_and_unload().save_pretrained(str(root / "merged"))
    return root


def test_the_merge_replaces_the_rows_as_peft_does(tokens, tmp_path):
    ours, peft_merged, base = plain_merge(tokens / "base", tokens / "adapter", tokens / "merged", tmp_path / "out")
    assert not torch.equal(peft_merged[EMBED], base[EMBED])  # the fixture changes rows
    assert set(ours) == set(peft_merged) and all(torch.equal(ours[n], peft_merged[n]) for n in ours)


def test_in_place_sweeps_load_the_rows(tokens):
    from repair.detection.detector import DetectOptions
    from repair.edit.inplace import InPlacePatcher

    opts = DetectOptions(top_k=4, cache=False)
    model = tiny_llama(seed=5)
    InPlacePatcher(model, opts.pairs(str(tokens / "base"), str(tokens / "adapter")), opts)
    merged = load_file(tokens / "merged" / "model.safetensors")
    assert torch.equal(model.get_parameter(EMBED).detach(), merged[EMBED])


def test_the_embedding_is_analysed_as_merged_and_kept_by_the_adapter_format(tokens, tmp_path):
    import json

    res = CliRunner().invoke(main, ["detect", str(tokens / "base"), str(tokens / "adapter"), "--modules", "embed_tokens",
                                    "--no-cache", "--json", str(tmp_path / "d.json")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "d.json").read_text())["matrices"]
    assert [r["name"] for r in rows] == [EMBED]
    merged, base = load_file(tokens / "merged" / "model.safetensors"), load_file(tokens / "base" / "model.safetensors")
    want = torch.linalg.svdvals(merged[EMBED].double())[:len(rows[0]["sigma"])]
    assert torch.allclose(torch.tensor(rows[0]["sigma"], dtype=torch.float64), want, rtol=1e-4)
    out = tmp_path / "adapter"
    res = CliRunner().invoke(main, ["patch", str(tokens / "base"), str(tokens / "adapter"), "--scale", "0.0",
                                    "--format", "adapter", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = load_file(tokens / "adapter" / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    key = next(k for k in saved if "trainable_tokens_delta" in k)
    assert torch.equal(written[key], saved[key])
    assert not base[EMBED].equal(merged[EMBED])


def test_a_patch_of_the_embedding_cannot_be_written_as_trainable_tokens(tokens, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["patch", str(tokens / "base"), str(tokens / "adapter"), "--scale", "0.0",
                                    "--format", "adapter", "--modules", "embed_tokens", "--no-cache", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert f"--format adapter: {EMBED} is changed by trainable tokens" in res.output and not out.exists()
    res = CliRunner().invoke(main, ["patch", str(tokens / "base"), str(tokens / "adapter"), "--scale", "0.0",
                                    "--modules", "embed_tokens", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output  # merged: the patched embedding, written whole
