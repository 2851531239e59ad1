"""`repair continual` on a tiny model: stages chained as the paper chains them, intruders against the original
base as float64 SVDs count them, stage-wise repair, and forgetting as plain torch computes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from repair.cli import main

TASKS = ["addition", "difference", "joining"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
R = 2


def stages_recipe(base: Path, method: str = "lora", **over) -> dict:
    d = {"name": f"tiny-continual-{method}", "base": str(base), "method": method, "seed": 0,
         "stages": [{"generated": {"task": t, "n": 24}} for t in TASKS],
         "train": {"steps": 3, "batch_size": 4, "learning_rate": 5e-2 if method == "lora" else 2e-3,
                   "max_length": 48, "logging_steps": 1}}
    if method == "lora":
        d["lora"] = {"r": R, "alpha": 64, "target_modules": TARGETS}
    d.update(over)
    return d


def run(tmp_path: Path, recipe: dict, corpus: Path, name: str) -> tuple[Path, dict]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    res = CliRunner().invoke(main, ["continual", str(path), "--out", str(out), "--limit", "4",
                                    "--forgetting", str(corpus)])
    assert res.exit_code == 0, res.output
    assert "| run | after stage | intruders |" in res.output
    return out, json.loads((out / "continual.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}


def oracle_intruders(W0: dict, W: dict, k: int = 10, eps: float = 0.5) -> int:
    """Definition 1 in float64: top-k left singular vectors of W with |cos| < ε to every left vector of W0."""
    total = 0
    for name, w in W.items():
        if w.ndim != 2 or "layers." not in name:
            continue
        U0 = torch.linalg.svd(W0[name], full_matrices=False)[0]
        U = torch.linalg.svd(w, full_matrices=False)[0][:, :k]
        total += int(((U0.T @ U).abs().amax(0) < eps).sum())
    return total


def torch_nll(folder: Path, docs: list[str]) -> float:
    """Mean NLL per token, each document scored alone with plain torch (no padding, no batching)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([tok(d)["input_ids"][:64]])
            logits = model(input_ids=ids).logits[0]
            total += float(F.cross_entropy(logits[:-1].double(), ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def test_lora_stages_merge_a_fresh_low_rank_update_each(llama_base, corpus_file, tmp_path):
    out, rep = run(tmp_path, stages_recipe(llama_base), corpus_file, "lora")
    stages = rep["stages"]
    assert [s["task"] for s in stages] == [None, *TASKS]
    assert list(stages[0]["accuracy"]) == TASKS  # the base on every task; then every task seen so far
    assert [list(s["accuracy"]) for s in stages[1:]] == [TASKS[:1], TASKS[:2], TASKS]
    prev = weights(llama_base)
    for i, s in enumerate(stages[1:], 1):
        W = weights(out / f"stage-{i}")
        for name, w in W.items():
            delta = w - prev[name]
            if any(f"{t}.weight" in name for t in TARGETS):  # a rank-r LoRA update merged in, re-initialised
                assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-5) <= R, (i, name)
            else:
                assert torch.equal(w, prev[name]), (i, name)
        assert s["intruders_found"] == s["intruders"] == oracle_intruders(weights(llama_base), W)
        assert sum(s["by_module_type"].values()) == s["intruders"]
        prev = W
    assert stages[-1]["intruders"] > 0  # alpha/r = 32 makes every stage outgrow the tiny base spectrum
    docs = [line for line in corpus_file.read_text().splitlines() if line.strip()]
    assert stages[-1]["forgetting_nll"] == pytest.approx(torch_nll(out / "stage-3", docs), rel=1e-5)
    assert stages[0]["forgetting_nll"] == pytest.approx(torch_nll(llama_base, docs), rel=1e-5)
    assert (out / "continual.md").read_text().count("| tiny-continual-lora |") == 4


def test_stagewise_repair_removes_the_intruders_before_the_next_stage(llama_base, corpus_file, tmp_path):
    out, rep = run(tmp_path, stages_recipe(llama_base, repair={"scale": 0.0}), corpus_file, "repaired")
    W0 = weights(llama_base)
    docs = [line for line in corpus_file.read_text().splitlines() if line.strip()]  # measured: the repaired model
    for i, s in enumerate(rep["stages"][1:], 1):
        assert s["intruders_found"] == oracle_intruders(W0, weights(out / f"stage-{i}")) > 0
        # λ=0 removes the stage's intruders; a lower-ranked one may rise into the top k, so fewer, not always 0
        assert s["intruders"] == oracle_intruders(W0, weights(out / f"stage-{i}-repaired")) < s["intruders_found"]
        assert s["forgetting_nll"] == pytest.approx(torch_nll(out / f"stage-{i}-repaired", docs), rel=1e-5)
        if i > 1:  # the next stage trains on the repaired weights, not on the unrepaired ones
            delta = weights(out / f"stage-{i}")["model.layers.0.self_attn.q_proj.weight"] - \
                weights(out / f"stage-{i - 1}-repaired")["model.layers.0.self_attn.q_proj.weight"]
            assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= R
    assert f"{rep['stages'][1]['intruders_found']} → {rep['stages'][1]['intruders']}" in (out / "continual.md").read_text()


def test_full_finetuning_stages_continue_one_model(llama_base, corpus_file, tmp_path):
    recipe = stages_recipe(llama_base, "full", stages=[{"generated": {"task": t, "n": 24}} for t in TASKS[:2]])
    out, rep = run(tmp_path, recipe, corpus_file, "full")
    W0, W1, W2 = weights(llama_base), weights(out / "stage-1"), weights(out / "stage-2")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.linalg.matrix_rank(W2[q] - W1[q], rtol=1e-5) > R  # dense updates, not low-rank
    assert [s["intruders"] for s in rep["stages"][1:]] == [oracle_intruders(W0, W1), oracle_intruders(W0, W2)]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(data={"generated": {"task": "addition", "n": 4}}), "exactly one of 'data'"),
    (lambda d: (d.pop("stages"), d.update(data={"generated": {"task": "addition", "n": 4}},
                                          repair={"scale": 0})), "'repair' applies between stages"),
    (lambda d: d.update(stages=[{"jsonl": "x.jsonl"}]), "needs an 'eval_task'"),
    (lambda d: d.update(repair={"scale": 2}), "repair.scale"),
    (lambda d: d["train"].update(save_steps=[2]), "every stage is written whole"),
])
def test_stage_recipe_errors_name_the_field(llama_base, tmp_path, edit, message):
    d = stages_recipe(llama_base)
    edit(d)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(main, ["continual", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in res.output and str(path) in res.output
    assert not (tmp_path / "o").exists()


def test_finetune_and_continual_refuse_each_others_recipes(llama_base, tmp_path):
    staged = tmp_path / "staged.yaml"
    staged.write_text(yaml.safe_dump(stages_recipe(llama_base)))
    res = CliRunner().invoke(main, ["finetune", str(staged), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "repair continual" in res.output and not (tmp_path / "a").exists()
    single = stages_recipe(llama_base)
    single.pop("stages")
    single["data"] = {"generated": {"task": "addition", "n": 4}}
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(single))
    res = CliRunner().invoke(main, ["continual", str(plain), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "lists no stages" in res.output and not (tmp_path / "b").exists()


def test_set_overrides_a_recipe_field(llama_base, tmp_path):
    from repair.errors import RepairError
    from repair.train.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(stages_recipe(llama_base)))
    r = load_recipe(path, ["lora.r=8", "lora.alpha=2r", "repair.scale=0.25", "name=x"])
    assert (r.lora.r, r.lora.lora_alpha, r.repair.scale, r.name) == (8, 16.0, 0.25, "x")
    with pytest.raises(RepairError, match="lora.r"):
        load_recipe(path, ["lora.r=zero"])
    with pytest.raises(RepairError, match="expected KEY=VALUE"):
        load_recipe(path, ["lora.r"])
    with pytest.raises(RepairError, match="is not a section"):
        load_recipe(path, ["name.x=1"])
    assert load_recipe(path, ["stages.2.generated.n=7"]).stages[2].generated.n == 7  # a list item by index
    with pytest.raises(RepairError, match="'3' is not an index of a list of 3 items"):
        load_recipe(path, ["stages.3.eval_task=x"])
