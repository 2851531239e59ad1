"""TensorWriter sharding, canonical metadata and size parsing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from repair.errors import RepairError
from repair.io.writer import TensorWriter, parse_size


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1024") == 1024
    with pytest.raises(RepairError, match="^max_shard_size: expected a size"):
        parse_size("big")


def test_writer_shards_by_budget_and_writes_the_index(tmp_path):
    w = TensorWriter(tmp_path, "model", max_shard_size=4000, metadata={"zeta": "1", "alpha": "2é"})
    tensors = {f"t{i}": torch.full((300,), float(i)) for i in range(10)}  # 1200 bytes each
    for name, t in tensors.items():
        w.save(name, t)
    files = w.finalize()
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 12000 and len(index["weight_map"]) == 10
    for name, fname in index["weight_map"].items():
        with safe_open(str(tmp_path / fname), "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
            assert f.metadata() == {"format": "pt", "zeta": "1", "alpha": "2é"}


def test_metadata_order_is_canonical(tmp_path):
    blobs = set()
    for i in range(12):  # safetensors writes metadata in random order; the writer sorts it
        folder = tmp_path / str(i)
        folder.mkdir()
        w = TensorWriter(folder, "model", metadata={f"k{j}": str(j) for j in range(6)})
        w.save("x", torch.ones(3))
        blobs.add(w.finalize()[0].read_bytes())
    assert len(blobs) == 1
    header = blobs.pop()[8:200].decode(errors="ignore")
    assert header.index('"format"') < header.index('"k0"') < header.index('"k5"')
