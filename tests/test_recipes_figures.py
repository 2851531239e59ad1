"""Recipes (validation, a 5-step fine-tune of a tiny model) and `repair figures` on a tiny pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from repair.cli import main
from repair.errors import RepairError
from repair.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def recipe_dict(base: Path, **over) -> dict:
    d = {"name": "tiny", "base": str(base), "method": "lora", "seed": 0,
         "lora": {"r": 2, "alpha": "2r", "target_modules": ["q_proj", "v_proj"]},
         "data": {"generated": {"task": "addition", "n": 40}},
         "train": {"steps": 5, "batch_size": 4, "learning_rate": 1e-2, "max_length": 40, "save_steps": [2, 5],
                   "logging_steps": 1}}
    d.update(over)
    return d


def write(tmp_path: Path, d: dict, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.base == "smollm2-135m"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(method="lora", lora=None), "needs a 'lora' section"),
    (lambda d: d["lora"].update(rank=2), "lora.rank: Extra inputs are not permitted"),
    (lambda d: d["lora"].update(r=0), "lora.r"),
    (lambda d: d["train"].update(save_steps=[9]), "save_steps"),
    (lambda d: d.update(data={}), "exactly one of 'generated' or 'jsonl'"),
    (lambda d: d.update(method="qlora"), "method"),
])
def test_recipe_errors_are_clear(tmp_path, edit, message):
    d = recipe_dict(tmp_path)
    edit(d)
    with pytest.raises(RepairError, match=message) as e:
        load_recipe(write(tmp_path, d))
    assert str(tmp_path / "r.yaml") in str(e.value)


def test_recipe_bad_yaml_via_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    res = CliRunner().invoke(main, ["finetune", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not valid YAML" in res.output and not (tmp_path / "o").exists()


def test_alpha_2r():
    from repair.train.recipe import LoraRecipe

    assert LoraRecipe(r=4, target_modules=["q_proj"]).lora_alpha == 8.0
    assert LoraRecipe(r=4, alpha=16, target_modules=["q_proj"]).lora_alpha == 16.0


def test_five_step_lora_finetune_of_a_tiny_model(llama_base, tmp_path):
    out = tmp_path / "ft"
    res = CliRunner().invoke(main, ["finetune", str(write(tmp_path, recipe_dict(llama_base))), "--out", str(out)])
    assert res.exit_code == 0, res.output
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000005"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in final.items())  # B moved from 0
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(out / "adapter")])
    assert res.exit_code == 0, res.output
    history = json.loads((out / "intruders.json").read_text())  # IntruderMonitor, at save_steps and the end
    assert [h["step"] for h in history["steps"]] == [0, 2, 5]
    assert [e["step"] for e in log if "intruders/total" in e] == [0, 2, 5]
    for h in history["steps"][1:]:
        ckpt = out / "checkpoints" / f"step-{h['step']:06d}"
        res = CliRunner().invoke(main, ["detect", str(llama_base), str(ckpt), "--json", str(out / "d.json")])
        assert res.exit_code == 0, res.output
        assert h["intruders/total"] == json.loads((out / "d.json").read_text())["total_intruders"]


def test_train_b_only_freezes_orthonormal_a(llama_base, tmp_path):
    d = recipe_dict(llama_base)
    d["lora"]["train_b_only"] = True
    out = tmp_path / "ftb"
    assert CliRunner().invoke(main, ["finetune", str(write(tmp_path, d)), "--out", str(out)]).exit_code == 0
    early = load_file(str(out / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k, A in final.items():
        if "lora_A" in k:
            assert torch.equal(A, early[k])
            assert torch.allclose(A @ A.T, torch.eye(A.shape[0]), atol=1e-5)  # singular values 1


def test_full_finetune_writes_a_model(llama_base, tmp_path):
    d = recipe_dict(llama_base, method="full", lora=None)
    d["train"].update(steps=3, save_steps=[], learning_rate=1e-3)
    out = tmp_path / "full"
    res = CliRunner().invoke(main, ["finetune", str(write(tmp_path, d)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["detect", str(llama_base), str(out / "model"), "--json", str(tmp_path / "d.json")])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "d.json").read_text())["matrices"]) == 14


def test_figures_on_a_tiny_pair(llama_base, tmp_path):
    ft = tmp_path / "ft"
    CliRunner().invoke(main, ["finetune", str(write(tmp_path, recipe_dict(llama_base))), "--out", str(ft)])
    out = tmp_path / "fig"
    res = CliRunner().invoke(main, ["figures", str(llama_base), str(ft / "adapter"), "--out", str(out),
                                    "--k-max", "20", "--checkpoints", str(ft / "checkpoints")])
    assert res.exit_code == 0, res.output
    for name in ["similarity", "intruders_vs_epsilon", "intruders_vs_k", "effective_rank", "training_intruders"]:
        assert (out / f"{name}.png").stat().st_size > 5000, name
    hist = tmp_path / "fig-history"  # Fig. 7 from the monitor's record, no detection per checkpoint
    res = CliRunner().invoke(main, ["figures", str(llama_base), str(ft / "adapter"), "--out", str(hist),
                                    "--k-max", "20", "--history", str(ft / "intruders.json")])
    assert res.exit_code == 0, res.output
    assert (hist / "training_intruders.png").stat().st_size > 5000
    res = CliRunner().invoke(main, ["figures", str(llama_base), str(ft / "adapter"), "--out", str(hist),
                                    "--history", str(ft / "intruders.json"), "--checkpoints", str(ft / "checkpoints")])
    assert res.exit_code == 2 and "pass one of them" in res.output


def test_intruder_curves_count_what_detect_counts(llama_base, llama_adapter):
    from repair.detection.detector import DetectOptions, detect
    from repair.figures.curves import collect

    stats = collect(str(llama_base), str(llama_adapter), 10, 20, DetectOptions())
    for eps in (0.3, 0.5, 0.7):
        expected = detect(str(llama_base), str(llama_adapter), DetectOptions(epsilon=eps)).total_intruders
        assert sum(int((m.max_cos[:10] < eps).sum()) for m in stats) == expected
    assert sum(int((m.max_cos[:20] < 0.5).sum()) for m in stats) == \
        detect(str(llama_base), str(llama_adapter), DetectOptions(top_k=20)).total_intruders


def test_bundled_demo_adapter_matches_its_recipe():
    from repair.adapters.lora import LoraAdapter
    from repair.io.sources import demo_dir

    d = demo_dir()
    assert (d / "recipe.yaml").read_text() == (ROOT / "recipes" / "smollm2-addition-lora-r1-a16.yaml").read_text()
    recipe = load_recipe(d / "recipe.yaml")
    adapter = LoraAdapter(d)
    assert adapter.config.r == recipe.lora.r and adapter.config.lora_alpha == recipe.lora.lora_alpha
    assert sorted(adapter.config.target_modules) == sorted(recipe.lora.target_modules)
    assert len(adapter.modules) == 30 * 7 and adapter.config.base_model_name_or_path == "smollm2-135m"
    log = json.loads((d / "training_log.json").read_text())
    assert log[-1]["step"] == recipe.train.steps
    assert sum(p.stat().st_size for p in d.iterdir()) < 10 * 2**20


def test_demo_retrain_uses_the_bundled_recipe(monkeypatch, tmp_path):
    import repair.train.finetune
    from repair.cli import demo

    seen = {}

    def fake_finetune(recipe, out, overwrite=False):
        seen.update(recipe=recipe, out=out, overwrite=overwrite)
        return out / "adapter"

    monkeypatch.setattr(repair.train.finetune, "finetune", fake_finetune)
    assert demo._retrain(tmp_path) == tmp_path / "retrained" / "adapter"
    assert seen["recipe"] == load_recipe(ROOT / "recipes" / "smollm2-addition-lora-r1-a16.yaml")
    assert seen["out"] == tmp_path / "retrained" and seen["overwrite"]


def test_jsonl_data_path_is_relative_to_the_recipe(llama_base, tmp_path):
    rows = [{"prompt": f"{a} plus {a} is", "completion": f" {2 * a}"} for a in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = recipe_dict(llama_base, data={"jsonl": "data.jsonl"})
    d["train"].update(steps=2, save_steps=[])
    recipe = load_recipe(write(tmp_path, d))
    assert recipe.data.jsonl == (tmp_path / "data.jsonl").resolve()
    from repair.train.finetune import training_rows

    assert training_rows(recipe.data) == rows
    res = CliRunner().invoke(main, ["finetune", str(write(tmp_path, d)), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    (tmp_path / "data.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(RepairError, match="'prompt' and 'completion'"):
        training_rows(load_recipe(write(tmp_path, d)).data)


def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (Spearman's convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_figures_across_fine_tunes_with_forgetting(llama_base, corpus_file, tmp_path):
    """Several TUNED: one ε and k curve each (what `repair detect` counts), each one's forgetting NLL as
    transformers computes it on the merged model, and Spearman's ρ of the two from ranks by hand."""
    from conftest import char_tokenizer, make_adapter, tiny_llama
    from peft import PeftModel
    from test_evals import direct_nll

    from evals.measure.corpus import load_corpus
    from repair.detection.detector import DetectOptions, detect

    adapters = [make_adapter(tiny_llama, llama_base, tmp_path / f"a{i}", seed=i, r=4, lora_alpha=8, b_scale=b,
                             target_modules=["q_proj", "v_proj", "down_proj"])
                for i, b in enumerate((0.02, 0.3, 1.0, 3.0))]
    out = tmp_path / "fig"
    res = CliRunner().invoke(main, ["figures", str(llama_base), *map(str, adapters), "--out", str(out), "--k-max", "20",
                                    "--forgetting", str(corpus_file), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "figures.json").read_text())
    assert [a["label"] for a in report["adapters"]] == ["a0", "a1", "a2", "a3"]
    W0 = tiny_llama().state_dict()
    docs = load_corpus(str(corpus_file))
    for a, path in zip(report["adapters"], adapters, strict=True):
        for eps, count in zip(a["epsilons"], a["by_epsilon"], strict=True):
            if eps in (0.3, 0.5, 0.7):
                assert count == detect(str(llama_base), str(path), DetectOptions(epsilon=eps)).total_intruders
        assert a["by_k"][19] == detect(str(llama_base), str(path), DetectOptions(top_k=20)).total_intruders
        assert a["intruders"] == a["by_k"][9]
        merged = PeftModel.from_pretrained(tiny_llama(), str(path)).merge_and_unload().eval()
        assert a["forgetting_nll"] == pytest.approx(direct_nll(merged, char_tokenizer(), docs), rel=1e-5)
        eranks = {}  # Roy & Vetterli in float64: exp of the entropy of σ/Σσ of ΔW = W_merged - W0
        for name, w in merged.state_dict().items():
            kind = name.split(".")[-2]
            if kind in ("q_proj", "v_proj", "down_proj"):
                s = torch.linalg.svdvals(w.double() - W0[name].double())
                p = s / s.sum()
                eranks.setdefault(kind, []).append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
        every = [e for v in eranks.values() for e in v]
        assert a["effective_rank"] == pytest.approx(sum(every) / len(every), rel=1e-4)
        assert a["effective_rank_by_type"] == pytest.approx({k: sum(v) / len(v) for k, v in eranks.items()}, rel=1e-4)
        assert a["forgetting_stderr"] > 0
        assert (out / a["label"] / "similarity.png").stat().st_size > 5000
    counts = [a["intruders"] for a in report["adapters"]]
    nlls = [a["forgetting_nll"] for a in report["adapters"]]
    assert len(set(counts)) > 1 and len(set(nlls)) == 4  # the fixture spreads both
    x, y = _average_ranks(counts), _average_ranks(nlls)
    mx, my = sum(x) / 4, sum(y) / 4
    rho = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / (
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) ** 0.5
    assert report["spearman"]["rho"] == pytest.approx(rho, abs=1e-12) and report["spearman"]["n"] == 4
    assert f"Spearman rho {rho:.3f}" in res.output
    for name in ("intruders_vs_epsilon", "intruders_vs_k", "intruders_vs_forgetting"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
    res = CliRunner().invoke(main, ["figures", str(llama_base), *map(str, adapters[:2]), "--out", str(tmp_path / "h"),
                                    "--history", str(corpus_file)])
    assert res.exit_code == 2 and "single TUNED" in res.output
    named = tmp_path / "named"
    res = CliRunner().invoke(main, ["figures", str(llama_base), *map(str, adapters[:2]), "--out", str(named),
                                    "--labels", "weak, strong"])
    assert res.exit_code == 0, res.output
    again = json.loads((named / "figures.json").read_text())
    assert [a["label"] for a in again["adapters"]] == ["weak", "strong"] and again["spearman"] is None
    assert [a["by_epsilon"] for a in again["adapters"]] == [a["by_epsilon"] for a in report["adapters"][:2]]
    assert (named / "strong" / "effective_rank.png").is_file()
    res = CliRunner().invoke(main, ["figures", str(llama_base), *map(str, adapters[:2]), "--out", str(named),
                                    "--labels", "one"])
    assert res.exit_code == 2 and "--labels: expected 2 labels, one per TUNED, got 1." in res.output
