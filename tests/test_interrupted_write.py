"""`repair patch` killed with SIGKILL mid-write leaves nothing at --out, and a rerun succeeds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_adapter, save_model

from repair.runtime.durable import TMP_MARKER


def medium_llama():
    """About 1 GB of float32 weights: large enough that writing takes a measurable time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                                        tie_word_embeddings=False))


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    base = save_model(medium_llama(), root / "base")
    adapter = make_adapter(medium_llama, base, root / "adapter", r=2, target_modules=["q_proj", "v_proj"], b_scale=3)
    return base, adapter


def _patch_cmd(base, adapter, out):
    return [sys.executable, "-m", "repair.cli", "patch", str(base), str(adapter), "--scale", "0",
            "--out", str(out), "--max-shard-size", "4MB"]


def _start_and_wait_for_writing(base, adapter, folder):
    """Start `repair patch` and return (process, time writing began) once its temporary folder exists."""
    out = folder / "out"
    proc = subprocess.Popen(_patch_cmd(base, adapter, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(folder.glob(f".out{TMP_MARKER}*")):
        assert proc.poll() is None, "finished before writing was seen"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc, time.monotonic()


@pytest.fixture(scope="module")
def write_seconds(medium, tmp_path_factory):
    """How long one uninterrupted run takes from creating its temporary folder to renaming it into place."""
    folder = tmp_path_factory.mktemp("timing")
    proc, began = _start_and_wait_for_writing(*medium, folder)
    while not (folder / "out").exists():
        assert proc.poll() in (None, 0)
        time.sleep(0.002)
    elapsed = time.monotonic() - began
    assert proc.wait() == 0
    return elapsed


@pytest.mark.parametrize("fraction", [0.05, 0.35, 0.6])
def test_sigkill_mid_write_leaves_no_output(medium, write_seconds, tmp_path, fraction):
    base, adapter = medium
    out = tmp_path / "out"
    assert write_seconds > 0.5, f"writing took {write_seconds:.2f} s: too short to interrupt reliably"
    proc, began = _start_and_wait_for_writing(base, adapter, tmp_path)
    time.sleep(max(0.0, began + fraction * write_seconds - time.monotonic()))
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(TMP_MARKER in n and n.startswith(".") for n in leftovers)  # hidden, named to spot
    done = subprocess.run(_patch_cmd(base, adapter, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "repair_report.json").is_file()
