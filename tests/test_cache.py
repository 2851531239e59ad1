"""The base-spectra cache, the remembered adapter settings, `repair cache`, and threaded batching."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from repair.cli import main
from repair.detection.detector import DetectOptions, detect
from repair.runtime.pipeline import ordered_batches, ordered_map
from repair.spectral.spectra import compute_spectrum, tensor_key
from repair.spectral.store import SpectraCache


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(folder))
    return folder


def test_spectrum_is_exact_in_either_orientation():
    W = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    for M in (W, W.T.contiguous()):
        spec = compute_spectrum(M)
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
        assert torch.allclose(spec.S, S, rtol=1e-10)
        basis = U if spec.side == "left" else Vh.T  # the smaller side, complete
        assert spec.Z.shape == (min(M.shape), min(M.shape))
        assert torch.allclose((spec.Z.double().T @ basis).abs(), torch.eye(min(M.shape), dtype=torch.float64),
                              atol=1e-5)
        other = "right" if spec.side == "left" else "left"  # the implicit side's coordinates are exact too
        vecs = Vh.T if other == "right" else U
        assert torch.allclose(spec.coords(M, vecs[:, :5], other).abs(), torch.eye(48)[:5].double(), atol=1e-5)


def test_cache_roundtrip_keys_and_damaged_entries(tmp_path):
    cache = SpectraCache(tmp_path / "spectra")
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    first = cache.spectrum(W)
    again = SpectraCache(tmp_path / "spectra").spectrum(W)
    assert torch.equal(first.S, again.S) and torch.equal(first.Z, again.Z)
    assert tensor_key(W) != tensor_key(W.float()) != tensor_key(W.float().T.contiguous())
    changed = W.clone()
    changed[0, 0] += 1
    assert tensor_key(changed) != tensor_key(W)
    path = cache.path(tensor_key(W))
    path.write_bytes(b"not a safetensors file")
    fresh = SpectraCache(tmp_path / "spectra")
    assert torch.equal(fresh.spectrum(W).S, first.S) and fresh.stats == {"computed": 1, "reused": 0}
    stored = W.T.contiguous()  # a Conv1D-style (in, out) tensor, analysed as (out, in) = W
    as_out_in = fresh.spectrum(stored, transposed=True)
    assert as_out_in.side == "left" and as_out_in.shape == (20, 30)
    assert torch.equal(as_out_in.S, fresh.spectrum(stored).S) and fresh.spectrum(stored).side == "right"


def test_detect_reuses_spectra_across_adapters(llama_base, llama_adapter, cache_dir):
    certified = DetectOptions(method="certified")
    first = detect(str(llama_base), str(llama_adapter), certified)
    assert first.cache == {"computed": len(first.matrices), "reused": 0}
    files = sorted((cache_dir / "spectra").glob("*.safetensors"))
    assert len(files) == len(first.matrices)
    assert all(f.name.endswith("-top.safetensors") for f in files)  # truncated spectra only
    second = detect(str(llama_base), str(llama_adapter), certified)
    assert second.cache == {"computed": 0, "reused": len(first.matrices)}
    assert [m.intruders for m in second.matrices] == [m.intruders for m in first.matrices]
    assert all(m.method == "certified" for m in second.matrices)
    off = detect(str(llama_base), str(llama_adapter), DetectOptions(method="certified", cache=False))
    assert off.cache == {"computed": len(first.matrices), "reused": 0}
    assert [m.max_cos for m in off.matrices] == [m.max_cos for m in first.matrices]
    exact = detect(str(llama_base), str(llama_adapter))  # auto: these 64-wide matrices are solved exactly
    assert exact.cache == {"computed": len(first.matrices), "reused": 0}  # complete spectra, cached beside
    assert all(m.method == "structured" for m in exact.matrices)
    assert [m.intruders for m in exact.matrices] == [m.intruders for m in first.matrices]
    assert len(list((cache_dir / "spectra").glob("*.safetensors"))) == 2 * len(first.matrices)


def test_threads_and_batches_do_not_change_results(llama_base, llama_adapter, cache_dir):
    for method in ("certified", "exact"):
        one = detect(str(llama_base), str(llama_adapter), DetectOptions(threads=1, batch_bytes=1, method=method))
        two = detect(str(llama_base), str(llama_adapter), DetectOptions(threads=2, method=method))
        assert [m.model_dump() for m in one.matrices] == [m.model_dump() for m in two.matrices]


def test_ordered_batches_keep_order_and_budget():
    seen: list[list[int]] = []

    def work(batch):
        seen.append(batch)
        return [x * 10 for x in batch]

    assert list(ordered_batches(work, range(10), 2, size=lambda x: 3, budget=7)) == [x * 10 for x in range(10)]
    assert all(len(b) <= 2 for b in seen) and sorted(x for b in seen for x in b) == list(range(10))


def test_large_items_run_alone_on_every_thread_in_order():
    """A large item waits for the ones before it, runs on the calling thread with all the workers' threads;
    the others run on the pool with one thread each; the output keeps the input order."""
    import threading

    running: list[int] = []
    lock = threading.Lock()

    def work(x: int):
        with lock:
            running.append(x)
            overlap = len(running)
        seen = (x, threading.current_thread() is threading.main_thread(), torch.get_num_threads(), overlap)
        with lock:
            running.remove(x)
        return seen

    large = {3, 7}
    out = list(ordered_map(work, range(10), 2, depth=1, large=lambda x: x in large))
    assert [o[0] for o in out] == list(range(10))
    for x, on_main, threads, overlap in out:
        assert on_main == (x in large)
        assert threads == (2 if x in large else 1)
        if x in large:
            assert overlap == 1  # nothing else was running


def test_adapter_settings_are_remembered_without_peft(llama_base, llama_adapter, cache_dir, tmp_path):
    from repair.adapters.lora import LoraAdapter

    llama_adapter = Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))  # edited below: never the shared one
    first = LoraAdapter(llama_adapter, settings_cache=cache_dir / "adapters")
    assert not first.settings_known
    modules = first.modules  # resolved by peft and stored
    (stored,) = (cache_dir / "adapters").glob("*.json")
    assert json.loads(stored.read_text())["modules"]
    second = LoraAdapter(llama_adapter, settings_cache=cache_dir / "adapters")
    assert second.settings_known and second.modules == modules
    cfg = json.loads((llama_adapter / "adapter_config.json").read_text())
    (llama_adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": cfg["lora_alpha"] * 2}))
    assert not LoraAdapter(llama_adapter, settings_cache=cache_dir / "adapters").settings_known


def test_warm_detect_does_not_import_peft(llama_base, llama_adapter, cache_dir):
    import subprocess

    code = ("import sys; from repair.detection.detector import detect; detect(sys.argv[1], sys.argv[2]); "
            "print('peft' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(llama_base), str(llama_adapter)], capture_output=True,
                           text=True, check=True).stdout.split()[-1] for _ in range(2)]
    assert runs == ["True", "False"]  # the first run resolves the config with peft; the second remembers it


def test_cache_ls_and_clear(llama_base, llama_adapter, cache_dir):
    runner = CliRunner()
    assert runner.invoke(main, ["detect", str(llama_base), str(llama_adapter)]).exit_code == 0
    res = runner.invoke(main, ["cache", "ls"])
    assert res.exit_code == 0 and "spectra" in res.output and str(cache_dir) in res.output
    listing = json.loads(runner.invoke(main, ["cache", "ls", "--json"]).output)
    parts = {p["name"]: p for p in listing["parts"]}
    assert parts["spectra"]["entries"] > 0 and parts["spectra"]["bytes"] > 0 and parts["adapters"]["entries"] == 1
    (cache_dir / "models" / "keep").mkdir(parents=True)
    assert runner.invoke(main, ["cache", "clear"], input="n\n").exit_code == 1  # declined: nothing deleted
    assert (cache_dir / "spectra").is_dir()
    res = runner.invoke(main, ["cache", "clear", "--yes"])
    assert res.exit_code == 0 and "Freed" in res.output
    assert not (cache_dir / "spectra").exists() and not (cache_dir / "adapters").exists()
    assert (cache_dir / "models" / "keep").is_dir()  # converted models stay unless --models
    assert runner.invoke(main, ["cache", "clear", "--yes", "--models"]).exit_code == 0
    assert not (cache_dir / "models").exists()


def test_no_cache_threads_and_device_flags(llama_base, llama_adapter, cache_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--no-cache", "--threads", "1",
                               "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert not (cache_dir / "spectra").exists()
    bad = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--threads", "-1"])
    assert bad.exit_code == 2 and "--threads" in bad.output
    if not torch.cuda.is_available():
        bad = runner.invoke(main, ["detect", str(llama_base), str(llama_adapter), "--device", "cuda"])
        assert bad.exit_code == 2 and "--device cuda" in bad.output


def test_console_entry_point_exit_codes(tmp_path):
    import subprocess

    def code(*args):
        return subprocess.run([sys.executable, "-m", "repair.cli", *args], capture_output=True, text=True)

    ok = code("--version")
    assert ok.returncode == 0 and "intruder-repair" in ok.stdout
    usage = code("detect")
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
    bad = code("detect", str(tmp_path / "none"), str(tmp_path / "none"))
    assert bad.returncode == 2 and "no such file or folder" in bad.stderr
