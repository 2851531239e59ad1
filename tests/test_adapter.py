"""ΔW rebuilt from adapter files equals peft's own merge_and_unload()."""

from __future__ import annotations

import pytest
from conftest import make_adapter, merged_state, tiny_gpt2, tiny_llama
from safetensors import safe_open

from repair.adapters.pairs import PairSource
from repair.io.sources import resolve

CASES = {
    "gpt2_conv1d_fan_in_fan_out": (tiny_gpt2, "gpt2_base",
                                   dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                        target_modules=["c_attn", "c_proj", "c_fc"])),
    "llama_rslora": (tiny_llama, "llama_base",
                     dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"])),
    "llama_rank_alpha_pattern": (tiny_llama, "llama_base",
                                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 7},
                                      alpha_pattern={"v_proj": 3, "layers.0.mlp.down_proj": 20})),
    "llama_dora": (tiny_llama, "llama_base",
                   dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "gate_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_delta_matches_merge_and_unload(case, request, tmp_path):
    model_fn, base_fixture, kwargs = CASES[case]
    base = request.getfixturevalue(base_fixture)
    adapter = make_adapter(model_fn, base, tmp_path / "adapter", **kwargs)
    merged = merged_state(model_fn, adapter)
    pairs = PairSource(resolve(str(base)), resolve(str(adapter)))
    n_lora = sum(k.endswith("lora_A.weight") for k in safe_open(str(adapter / "adapter_model.safetensors"), "pt").keys())
    assert len(pairs) == n_lora > 0
    for pair in pairs:
        ref = merged[pair.name].T if pair.transposed else merged[pair.name]  # (out, in)
        ref_delta = ref.double() - pair.base.double()
        ours = pair.tuned.double() - pair.base.double()
        rel = (ours - ref_delta).norm() / ref_delta.norm()
        assert rel < 1e-5, f"{pair.name}: relative error {rel:.2e}"
        if pair.factors is not None:
            B, A = pair.factors
            assert ((B @ A).double() - ref_delta).norm() / ref_delta.norm() < 1e-5


def test_gpt2_pairs_are_transposed(gpt2_base, tmp_path):
    adapter = make_adapter(tiny_gpt2, gpt2_base, tmp_path / "a", r=2, fan_in_fan_out=True,
                           target_modules=["c_attn"])
    pair = next(iter(PairSource(resolve(str(gpt2_base)), resolve(str(adapter)))))
    assert pair.transposed and pair.shape == (64, 192) and pair.tuned.shape == (192, 64)


def test_rank_pattern_is_resolved_per_module(llama_base, tmp_path):
    from repair.adapters.lora import LoraAdapter

    kwargs = CASES["llama_rank_alpha_pattern"][2]
    adapter = LoraAdapter(make_adapter(tiny_llama, llama_base, tmp_path / "a", **kwargs))
    got = {m: (lm.rank, lm.scaling) for m, lm in adapter.modules.items()}
    assert got["model.layers.0.self_attn.q_proj"] == (2, 4.0)
    assert got["model.layers.0.self_attn.v_proj"] == (4, 0.75)
    assert got["model.layers.0.mlp.down_proj"] == (4, 5.0)
    assert got["model.layers.1.mlp.down_proj"] == (7, 8 / 7)
