"""Reliability, round two: confinement, permissions, atomic overwrite, shared and failing caches, fuzzed inputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_model, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from repair.cli import main
from repair.runtime.durable import TMP_MARKER


def sharded(base: Path, dest: Path) -> Path:
    """A copy of a one-file checkpoint, split into two shards with an index."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    for p in base.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, dest / p.name)
    tensors = load_file(str(base / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(dest / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def detect(*args) -> object:
    return CliRunner().invoke(main, ["detect", *map(str, args)])


# ---- confinement -----------------------------------------------------------------------------------------------

def test_index_entries_outside_the_folder_are_refused(llama_base, llama_adapter, tmp_path):
    base = sharded(llama_base, tmp_path / "base")
    assert detect(base, llama_adapter).exit_code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(base / "model-00002-of-00002.safetensors", outside / "evil.safetensors")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: ("../outside/evil.safetensors" if f.startswith("model-00002") else f)
                           for n, f in index["weight_map"].items()}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    res = detect(base, llama_adapter)
    assert res.exit_code == 2 and "'../outside/evil.safetensors' points outside the checkpoint folder" in res.output
    for bad in ("/etc/passwd", 3):
        index["weight_map"] = {n: bad for n in index["weight_map"]}
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
        res = detect(base, llama_adapter)
        assert res.exit_code == 2 and res.output.count("\n") == 1, res.output


def test_symlinks_are_followed_only_inside_the_folder(llama_base, llama_adapter, tmp_path):
    inside = tmp_path / "inside"
    inside.mkdir()
    for p in llama_base.iterdir():
        shutil.copy(p, inside / p.name)
    (inside / "weights").mkdir()
    os.replace(inside / "model.safetensors", inside / "weights" / "real.safetensors")
    (inside / "model.safetensors").symlink_to("weights/real.safetensors")  # inside: fine
    assert detect(inside, llama_adapter).exit_code == 0
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(inside / "weights" / "real.safetensors", outside)
    (inside / "model.safetensors").unlink()
    (inside / "model.safetensors").symlink_to(outside)  # a link out of the folder: refused
    res = detect(inside, llama_adapter)
    assert res.exit_code == 2 and "is a link to" in res.output and "outside the checkpoint folder" in res.output
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_adapter, adapter)
    os.replace(adapter / "adapter_model.safetensors", tmp_path / "a.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "a.safetensors")
    res = detect(llama_base, adapter)
    assert res.exit_code == 2 and "outside the checkpoint folder" in res.output


def test_hub_cache_snapshots_may_link_into_their_blob_store(llama_base, llama_adapter, tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/file -> ../../blobs/<sha>."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    base = sharded(llama_base, tmp_path / "plain")
    for i, p in enumerate(sorted(base.iterdir())):
        shutil.copy(p, blobs / f"blob{i}")
        (snap / p.name).symlink_to(Path("../../blobs") / f"blob{i}")
    res = detect(snap, llama_adapter)
    assert res.exit_code == 0, res.output


# ---- permissions, overwrite, concurrent creation ----------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_reports_respect_the_umask(llama_base, llama_adapter, tmp_path, umask):
    old = os.umask(umask)
    try:
        res = detect(llama_base, llama_adapter, "--json", tmp_path / "r.json", "--plan-out", tmp_path / "p.json")
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0",
                                        "--out", str(tmp_path / "out")])
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    for p in [tmp_path / "r.json", tmp_path / "p.json", *(tmp_path / "out").iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_overwrite_swaps_the_folder_in_one_rename(tmp_path, monkeypatch):
    from repair.runtime import durable

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    moved: list[tuple] = []
    for name in ("replace", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda a, b, real=real, name=name: (moved.append((name, a, b)), real(a, b))[1])
    if not _exchange_works(tmp_path):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    with durable.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # the old output stays readable until the swap
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert not [m for m in moved if Path(m[1]) == out]  # out itself was never renamed away
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]


def _exchange_works(tmp_path: Path) -> bool:
    from repair.runtime import durable

    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir()
    b.mkdir()
    try:
        return durable._exchange(a, b)
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


def test_an_out_created_during_the_run_is_never_replaced(llama_base, llama_adapter, tmp_path, monkeypatch):
    import repair.io.writer

    out = tmp_path / "out"
    real = repair.io.writer.TensorWriter.finalize

    def meanwhile(self):  # someone else writes to --out while the patch runs
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("mine")
        return real(self)

    monkeypatch.setattr(repair.io.writer.TensorWriter, "finalize", meanwhile)
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0", "--out", str(out)])
    assert res.exit_code == 2 and "something was written there during the run" in res.output
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]


# ---- caches --------------------------------------------------------------------------------------------------------

def test_an_unwritable_cache_is_a_warning(llama_base, llama_adapter, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(blocker / "cache"))  # every cache write fails (ENOTDIR)
    res = detect(llama_base, llama_adapter, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "fresh"))
    assert detect(llama_base, llama_adapter, "--json", tmp_path / "fresh.json").exit_code == 0
    matrices = [json.loads((tmp_path / f).read_text())["matrices"] for f in ("r.json", "fresh.json")]
    assert matrices[0] == matrices[1]


UNPRIVILEGED = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]


def test_a_read_only_cache_is_a_warning(llama_base, llama_adapter, tmp_path):
    """A cache folder the user may not write to: root ignores file modes, so as root (CI) the run is made
    unprivileged with setpriv (every capability dropped, CAP_DAC_OVERRIDE included: the modes apply)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running unprivileged as root needs setpriv (util-linux)")
    cache = tmp_path / "cache"
    (cache / "spectra").mkdir(parents=True)
    for p in (cache, cache / "spectra"):
        p.chmod(0o555)
    env = {**os.environ, "INTRUDER_REPAIR_CACHE": str(cache)}
    probe = subprocess.run([*UNPRIVILEGED, "touch", str(cache / "spectra" / "probe")] if os.geteuid() == 0
                           else ["touch", str(cache / "spectra" / "probe")], capture_output=True)
    assert probe.returncode != 0, "the cache must really be unwritable to the run"
    prefix = UNPRIVILEGED if os.geteuid() == 0 else []
    done = subprocess.run([*prefix, *_detect_cmd(llama_base, llama_adapter, tmp_path / "r.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "could not store a base spectrum" in done.stderr and "Traceback" not in done.stderr
    assert list((cache / "spectra").iterdir()) == []
    fresh = detect(llama_base, llama_adapter, "--no-cache", "--json", tmp_path / "fresh.json")
    assert fresh.exit_code == 0, fresh.output
    matrices = [json.loads((tmp_path / f).read_text())["matrices"] for f in ("r.json", "fresh.json")]
    assert matrices[0] == matrices[1]


def _detect_cmd(base, adapter, out):
    return [sys.executable, "-m", "repair.cli", "detect", str(base), str(adapter), "--json", str(out)]


def test_three_processes_share_a_fresh_cache_with_one_killed(tmp_path):
    """Three `repair detect` on one empty cache, one SIGKILLed at a random moment: the others agree, and every
    entry in the cache reads back whole."""
    base = save_model(tiny_llama(), tmp_path / "base")
    from conftest import make_adapter

    adapter = make_adapter(tiny_llama, base, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"], b_scale=10)
    env = {**os.environ, "INTRUDER_REPAIR_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(_detect_cmd(base, adapter, tmp_path / f"r{i}.json"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(3)]
    victim = random.Random(0).randrange(3)
    spectra = tmp_path / "cache" / "spectra"
    deadline = time.monotonic() + 120
    while not (spectra.is_dir() and any(spectra.iterdir())):  # kill it while the cache is being filled
        assert time.monotonic() < deadline and procs[victim].poll() is None
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.0, 0.2))
    procs[victim].send_signal(signal.SIGKILL)
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        if i != victim:
            assert p.returncode == 0, err.decode()[-2000:]
    reports = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(3) if i != victim]
    assert reports[0]["matrices"] == reports[1]["matrices"] and reports[0]["total_intruders"] > 0
    entries = [p for p in (tmp_path / "cache" / "spectra").iterdir() if not p.name.startswith(".")]
    assert entries
    for p in entries:
        with safe_open(str(p), framework="pt") as f:
            assert all(f.get_tensor(k).numel() > 0 for k in f.keys())
    res = CliRunner().invoke(main, ["cache", "ls", "--json"], env={"INTRUDER_REPAIR_CACHE": str(tmp_path / "cache")})
    spectra = next(p for p in json.loads(res.output)["parts"] if p["name"] == "spectra")
    assert spectra["entries"] == len(entries)  # leftover temporaries of the killed process are not counted


# ---- negative λ ----------------------------------------------------------------------------------------------------

def test_negative_scale_gives_nonnegative_sigma_and_the_right_count(llama_base, llama_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from repair.detection.detector import DetectOptions
    from repair.edit.inplace import InPlacePatcher

    out = tmp_path / "neg"
    res = CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "-0.5",
                                    "--allow-amplify", "--out", str(out)])
    assert res.exit_code == 0, res.output
    edits = json.loads((out / "repair_report.json").read_text())["matrices"]
    for e in edits:
        assert e["sigma_new"] == pytest.approx([0.5 * s for s in e["sigma_old"]], abs=2e-6)
    opts = DetectOptions()
    patcher = InPlacePatcher(AutoModelForCausalLM.from_pretrained(str(llama_base), dtype=torch.float32),
                             opts.pairs(str(llama_base), str(llama_adapter)), opts)
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(out), "--json", str(tmp_path / "d.json")])
    assert patcher.intruders_at(-0.5) == json.loads((tmp_path / "d.json").read_text())["total_intruders"]
    assert patcher.intruders_at(-0.5) == patcher.intruders_at(0.5)


# ---- fuzzing ------------------------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "Q4", "", "f32"]


@st.composite
def headers(draw):
    n = draw(st.integers(1, 3))
    entries, end = {}, 0
    for i in range(n):
        shape = draw(st.lists(st.one_of(st.integers(-2, 70), st.just(2**40)), min_size=0, max_size=3))
        start = draw(st.one_of(st.just(end), st.integers(0, 4096)))
        stop = draw(st.one_of(st.integers(0, 8192), st.just(start + 4)))
        entries[draw(st.sampled_from(["model.layers.0.self_attn.q_proj.weight", f"t{i}", "x" * 300]))] = {
            "dtype": draw(st.sampled_from(DTYPES)), "shape": shape, "data_offsets": [start, stop]}
        end = max(end, stop if isinstance(stop, int) else 0)
    payload = draw(st.integers(0, 4096))
    return entries, payload


def write_raw(path: Path, header: dict, payload: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(payload))


def one_sentence(res) -> bool:
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    return res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in res.output


def svd_oracle(report_path: Path, tuned: dict) -> None:
    """Every matrix the report compares has the σ of a float64 SVD of the tensor as ``tuned`` gives it."""
    report = json.loads(report_path.read_text())
    for m in report["matrices"]:
        assert m["name"] in tuned, m["name"]
        S = torch.linalg.svdvals(tuned[m["name"]].double())[: len(m["sigma"])]
        # Weyl: float32 work moves every σ by up to a few float32 roundings of the largest (fuzzed α reach 1e4)
        assert m["sigma"] == pytest.approx(S.tolist(), rel=1e-4, abs=1e-6 + 2e-6 * float(S[0])), m["name"]


def safetensors_reads(path: Path) -> dict | None:
    """Every tensor of the file as safetensors itself reads it, or None where safetensors refuses the file."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError):
        return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers())
def test_fuzzed_safetensors_headers(llama_base, tmp_path_factory, case):
    """Exit 0 only for a file safetensors itself reads whole, and then with the σ of what it reads."""
    header, payload = case
    tuned = tmp_path_factory.mktemp("fuzz")
    shutil.copy(llama_base / "config.json", tuned / "config.json")
    write_raw(tuned / "model.safetensors", header, payload)
    res = detect(llama_base, tuned, "--json", tuned / "r.json")
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    if res.exit_code == 0:
        read = safetensors_reads(tuned / "model.safetensors")
        assert read is not None, f"accepted a file safetensors refuses: {header}"
        svd_oracle(tuned / "r.json", read)
    else:
        assert one_sentence(res), res.output


JUNK = st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def peft_merge(adapter: Path) -> dict | None:
    """peft's own merge of the adapter onto the tiny llama, or None where peft refuses the adapter."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(tiny_llama(), str(adapter)).merge_and_unload()
    except Exception:  # noqa: BLE001 (the oracle: whatever peft refuses, for whatever reason)
        return None
    return {k: v.detach() for k, v in model.state_dict().items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional={"r": st.one_of(st.integers(-2, 8), JUNK),
                                           "lora_alpha": st.one_of(st.integers(-8, 16), JUNK),
                                           "target_modules": st.one_of(st.lists(JUNK, max_size=2), JUNK),
                                           "use_rslora": JUNK, "rank_pattern": JUNK, "fan_in_fan_out": JUNK,
                                           "peft_type": st.sampled_from(["LORA", "IA3", "", 3])}))
def test_fuzzed_adapter_configs(llama_base, llama_adapter, tmp_path_factory, fields):
    """Exit 0 only for a config peft itself loads, and then with the σ of peft's own merge."""
    adapter = tmp_path_factory.mktemp("cfg") / "adapter"
    shutil.copytree(llama_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    res = detect(llama_base, adapter, "--no-cache", "--json", adapter.parent / "r.json")
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if res.exit_code == 0:  # one documented leniency: a JSON null pattern is peft's default, an empty mapping
        (adapter / "adapter_config.json").write_text(json.dumps(
            {**cfg, **fields, **{k: {} for k in ("rank_pattern", "alpha_pattern") if fields.get(k, {}) is None}}))
        merged = peft_merge(adapter)
        assert merged is not None, f"accepted a config peft refuses: {fields}"
        svd_oracle(adapter.parent / "r.json", merged)
    else:
        assert one_sentence(res), res.output
