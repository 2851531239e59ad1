"""`repair patch` killed with SIGKILL mid-write leaves nothing at --out, and a rerun succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_adapter, save_model

from repair.writer import TMP_MARKER


def medium_llama():
    """About 40 MB of float32 weights: large enough that writing takes a measurable time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False))


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    base = save_model(medium_llama(), root / "base")
    adapter = make_adapter(medium_llama, base, root / "adapter", r=2, target_modules=["q_proj", "v_proj"], b_scale=3)
    return base, adapter


def _patch_cmd(base, adapter, out):
    return [sys.executable, "-m", "repair.cli", "patch", str(base), str(adapter), "--scale", "0",
            "--out", str(out), "--max-shard-size", "2MB"]


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8])
def test_sigkill_mid_write_leaves_no_output(medium, tmp_path, delay):
    base, adapter = medium
    out = tmp_path / "out"
    proc = subprocess.Popen(_patch_cmd(base, adapter, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".out{TMP_MARKER}*")):  # wait until writing has begun
        assert proc.poll() is None, "finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    assert proc.poll() is None, "finished before it could be interrupted: make the model larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(TMP_MARKER in n and n.startswith(".") for n in leftovers)  # hidden, named to spot
    done = subprocess.run(_patch_cmd(base, adapter, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "repair_report.json").is_file()
