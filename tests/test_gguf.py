"""GGUF files as BASE or TUNED: dequantized through transformers, cached, and analysed like any checkpoint.

The fixtures are tiny Llama GGUF files written here with the ``gguf`` package from weights we choose,
so the oracle is independent: the converted folder must hold exactly those weights (q/k pass through
llama.cpp's head permutation and transformers' reverse permutation), a Q8_0 tensor must equal the
``gguf`` package's own dequantization, and the report's max|cos| must equal a float64 SVD's.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_structured import reference

from repair.cli import main
from repair.errors import SourceError
from repair.io.sources import resolve

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 96, 2, 48
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_weights(seed: int) -> dict[str, torch.Tensor]:
    """A tiny Llama state dict in transformers' names and layouts, float32."""
    gen = torch.Generator().manual_seed(seed)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN), "self_attn.v_proj": (kv, HIDDEN),
              "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN),
              "mlp.down_proj": (HIDDEN, FFN)}
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1,
          "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
          "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1}
    for i in range(LAYERS):
        for mod, shape in shapes.items():
            sd[f"model.layers.{i}.{mod}.weight"] = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
    return sd


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary embeddings (convert_hf_to_gguf's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, sd: dict[str, torch.Tensor], q8: tuple[str, ...] = ()) -> None:
    """Write ``sd`` as a Llama GGUF file; tensors named in ``q8`` are stored quantized to Q8_0."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    for name, t in sd.items():
        a = t.numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, HEADS)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, KV_HEADS)
        if name in q8:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, i, *rest = name.split(".")
    return f"blk.{i}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def converted(folder) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def test_gguf_file_is_dequantized_once_into_the_weights_it_holds(tmp_path, cache, monkeypatch):
    sd = llama_weights(0)
    q8 = ("model.layers.1.mlp.up_proj.weight",)
    write_gguf(tmp_path / "base.gguf", sd, q8=q8)
    folder = resolve(str(tmp_path / "base.gguf")).path
    assert folder.parent == cache / "models" and json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    got = converted(folder)
    for name, t in sd.items():
        if name in q8:  # the gguf package's own dequantization is the oracle
            a = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            want = torch.from_numpy(gguf.quants.dequantize(a, gguf.GGMLQuantizationType.Q8_0).copy())
            assert not torch.equal(want, t)  # Q8_0 is lossy: this row is really dequantized
            assert torch.equal(got[name], want.reshape(t.shape)), name
        else:
            assert torch.equal(got[name], t), name  # q/k: permuted on write, reverse-permuted by transformers
    from repair.io import sources

    monkeypatch.setattr(sources, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve(str(tmp_path / "base.gguf")).path == folder  # cached by content
    (tmp_path / "only").mkdir()
    (tmp_path / "base.gguf").rename(tmp_path / "only" / "model.gguf")
    assert resolve(str(tmp_path / "only")).path == folder  # a folder holding one GGUF file: the same


def test_detect_on_gguf_base_and_tuned_matches_float64(tmp_path, cache):
    base = llama_weights(0)
    tuned = dict(base)
    name = "model.layers.0.mlp.down_proj.weight"
    gen = torch.Generator().manual_seed(5)
    B, A = torch.randn(HIDDEN, 2, generator=gen), torch.randn(2, FFN, generator=gen)
    tuned[name] = base[name] + 3.0 * (B / B.norm(dim=0)) @ (A / A.norm(dim=1, keepdim=True))
    write_gguf(tmp_path / "base.gguf", base)
    write_gguf(tmp_path / "tuned.gguf", tuned)
    out = tmp_path / "report.json"
    main(["detect", str(tmp_path / "base.gguf"), str(tmp_path / "tuned.gguf"), "--json", str(out), "--exact"],
         standalone_mode=False)
    report = json.loads(out.read_text())
    rows = {m["name"]: m for m in report["matrices"]}
    assert name in rows
    _, left, _ = reference(base[name].double(), tuned[name].double(), 10)
    assert np.allclose(rows[name]["max_cos"], left.numpy(), atol=1e-4)
    assert rows[name]["intruders"] == [i for i, c in enumerate(left.tolist()) if c < 0.5]
    assert rows[name]["intruders"]  # the planted update is an intruder
    unchanged = [m for n, m in rows.items() if n != name]
    assert all(not m["intruders"] for m in unchanged)


def test_folder_with_several_gguf_files_is_refused(tmp_path, cache):
    sd = llama_weights(0)
    (tmp_path / "two").mkdir()
    write_gguf(tmp_path / "two" / "a.gguf", sd)
    write_gguf(tmp_path / "two" / "b.gguf", sd)
    with pytest.raises(SourceError, match=r"several GGUF files \(a.gguf, b.gguf\); pass the one to use"):
        resolve(str(tmp_path / "two"))
    assert not (cache / "models").exists()  # nothing converted, nothing half-written
