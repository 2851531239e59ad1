"""The evaluation harness on a tiny model: forgetting, lm-eval accuracy, sweeps and comparisons."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import CORPUS, char_tokenizer, tiny_llama, write_mc_task

from evals.measure.corpus import load_corpus, read_documents
from evals.measure.forgetting import causal_nll, pseudo_nll
from repair.cli import main


def direct_nll(model, tok, docs):
    """The definition: each document alone, model(input_ids=ids, labels=ids), token-weighted."""
    total, n = 0.0, 0
    for d in docs:
        ids = tok(d, return_tensors="pt").input_ids[:, :64]
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return total / n


@pytest.mark.parametrize("batch_size", [1, 4])
def test_forgetting_nll_equals_direct_transformers(batch_size):
    model, tok = tiny_llama(), char_tokenizer()
    score = causal_nll(model, tok, CORPUS, batch_size=batch_size)
    assert score.nll == pytest.approx(direct_nll(model, tok, CORPUS), rel=1e-5)
    assert score.documents == 5 and score.tokens == sum(len(d) - 1 for d in CORPUS if len(d) > 1)
    assert score.doc_tokens == [len(d) - 1 for d in CORPUS if len(d) > 1]  # what the standard errors pair on
    assert sum(score.doc_nll) / sum(score.doc_tokens) == pytest.approx(score.nll, rel=1e-12)


def test_corpus_files(tmp_path, corpus_file):
    assert read_documents(corpus_file) == CORPUS
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(CORPUS)))
    assert load_corpus(str(jl)) == CORPUS


def test_pseudo_nll_of_masked_lm_matches_its_definition():
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    tok = char_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=80, pad_token_id=0)).eval()
    docs = CORPUS[:2]
    score = pseudo_nll(model, tok, docs, batch_size=5)
    total, n = 0.0, 0
    for d in docs:  # one masked copy per token, scored one at a time
        ids = tok(d).input_ids
        for i, t in enumerate(ids):
            masked = torch.tensor([ids])
            masked[0, i] = tok.mask_token_id
            with torch.no_grad():
                total -= float(model(input_ids=masked).logits[0, i].log_softmax(-1)[t])
            n += 1
    assert score.kind == "pseudo-nll" and score.tokens == n and score.nll == pytest.approx(total / n, rel=1e-5)


def test_rolling_task_corpus(tmp_path):
    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in CORPUS))
    yaml = tmp_path / "tiny_wiki.yaml"
    yaml.write_text(f"task: tiny_wiki\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                    "doc_to_target: '{{page}}'\nmetric_list:\n  - metric: word_perplexity\n")
    assert load_corpus(str(yaml)) == CORPUS


def test_base_samples_are_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path))
    model, tok = tiny_llama(), char_tokenizer()
    a = load_corpus("base-samples:5", model, tok, model_key="tiny")
    assert len(list((tmp_path / "corpora").glob("*.jsonl"))) == 1
    b = load_corpus("base-samples:5", None, None, model_key="tiny")  # from the cache: no model needed
    assert a == b and 1 <= len(a) <= 5
    (tmp_path / "corpora").rename(tmp_path / "old")
    assert load_corpus("base-samples:5", model, tok, model_key="tiny") == a  # same seed, same samples


def _sweep(base, adapter, task, corpus, out, *extra):
    return CliRunner().invoke(main, ["sweep", str(base), str(adapter), "--scales", "0,0.5,1", "--task", str(task),
                                     "--forgetting", str(corpus), "--out", str(out), *extra])


def test_sweep_matches_patch_and_lm_eval_and_resumes(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sweep"
    res = _sweep(llama_base, llama_adapter, mc_task, corpus_file, out, "--pick", "max-acc-drop=1.0")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "sweep.json").read_text())
    assert [p["scale"] for p in report["points"]] == [0.0, 0.5, 1.0]
    # header, base, tuned, 3 λ points and the matched control at λ = 0 and 0.5
    assert (out / "sweep.csv").read_text().count("\n") == 8 and (out / "tradeoff.png").stat().st_size > 1000
    one = report["points"][2]
    assert one["accuracy"] == report["tuned"]["accuracy"] and report["base"]["forgetting_delta"] == 0.0
    assert one["intruders"] == report["total_intruders"] > report["points"][0]["intruders"]
    # intruders left at λ=0 are counted without a new SVD; a real detection on the patched checkpoint agrees
    from repair.detection.detector import detect
    from repair.edit.patcher import PatchOptions, patch

    patch(str(llama_base), str(llama_adapter), PatchOptions(out=tmp_path / "zero", scale=0.0))
    assert detect(str(llama_base), str(tmp_path / "zero")).total_intruders == report["points"][0]["intruders"]

    merged = tmp_path / "merged"
    assert CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "1",
                                     "--out", str(merged)]).exit_code == 0
    lm = HFLM(pretrained=str(merged), tokenizer=AutoTokenizer.from_pretrained(str(merged)), device="cpu", batch_size=8)
    tm = TaskManager(include_path=str(mc_task.parent), include_defaults=False)  # the YAML stands alone
    ref = simple_evaluate(model=lm, tasks=["tiny_add"], task_manager=tm)
    assert one["accuracy"] == ref["results"]["tiny_add"]["acc,none"]
    assert one["accuracy_stderr"] == pytest.approx(ref["results"]["tiny_add"]["acc_stderr,none"])
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert one["forgetting_nll"] == pytest.approx(direct_nll(model, char_tokenizer(), CORPUS), rel=1e-5)

    # an interrupted sweep: one point lost; the rerun recomputes only it and gives the same numbers
    (out / "points" / "scale=0.5.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    res = _sweep(llama_base, llama_adapter, mc_task, corpus_file, out, "--pick", "max-acc-drop=1.0")
    assert res.exit_code == 0, res.output
    again = json.loads((out / "sweep.json").read_text())
    strip = ["seconds"]
    assert [{k: v for k, v in p.items() if k not in strip} for p in again["points"]] == \
           [{k: v for k, v in p.items() if k not in strip} for p in report["points"]]
    assert all((out / "points" / n).stat().st_mtime_ns == t for n, t in before.items())
    assert again["pick"]["scale"] == min(report["points"], key=lambda p: p["forgetting_nll"])["scale"]

    # a truncated point file (a crash of another tool, a full disk): measured again, with a warning
    text = (out / "points" / "scale=0.json").read_text()
    (out / "points" / "scale=0.json").write_text(text[: len(text) // 2])
    res = _sweep(llama_base, llama_adapter, mc_task, corpus_file, out, "--pick", "max-acc-drop=1.0")
    assert res.exit_code == 0, res.output
    third = json.loads((out / "sweep.json").read_text())
    assert [{k: v for k, v in p.items() if k not in strip} for p in third["points"]] == \
           [{k: v for k, v in p.items() if k not in strip} for p in report["points"]]
    assert json.loads((out / "points" / "scale=0.json").read_text())["point"]["scale"] == 0.0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("sweep.json", "sweep.csv", "sweep.md", "tradeoff.png", "points/scale=0.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600


def test_pick_rule():
    from evals.measure.results import SweepPoint
    from evals.runners.sweeper import choose

    def pt(scale, acc, nll):
        return SweepPoint(label=str(scale), scale=scale, accuracy=acc, forgetting_nll=nll, forgetting_delta=0,
                          intruders=0)

    points = [pt(0.0, 0.80, 3.0), pt(0.5, 0.895, 3.2), pt(1.0, 0.90, 3.5)]
    assert choose(points, points[2], pt(None, 0.1, 2.9), "max-acc-drop=0.01").scale == 0.5
    assert choose(points, points[2], pt(None, 0.1, 2.9), "max-acc-drop=0.2").scale == 0.0
    p = choose(points, points[2], pt(None, 0.1, 2.5), "max-acc-drop=0.01")
    assert p.forgetting_recovered == pytest.approx(0.3 / 1.0)


@pytest.mark.parametrize("extra, message", [
    (["--scales", "0,x"], "--scales"), (["--scales", "2"], "--allow-amplify"),
    (["--pick", "best"], "max-acc-drop"), (["--write-picked"], "needs --pick"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
])
def test_sweep_bad_arguments(llama_base, llama_adapter, mc_task, corpus_file, tmp_path, extra, message):
    res = _sweep(llama_base, llama_adapter, mc_task, corpus_file, tmp_path / "o", *extra)
    assert res.exit_code == 2 and message in res.output, res.output


def test_compare_table(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["compare", str(llama_base), str(llama_adapter), "--base", str(llama_base),
                                    "--tasks", str(mc_task), "--forgetting", str(corpus_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in report["rows"]] == [str(llama_base), str(llama_adapter)]
    assert all(r["scores"]["tiny_add"]["stderr"] is not None for r in report["rows"])
    assert "| model | tiny_add | forgetting NLL |" in res.output
    assert report["rows"][0]["forgetting_nll"] != report["rows"][1]["forgetting_nll"]


@pytest.mark.parametrize("task", ["addition", "difference", "joining"])
def test_shipped_zorblax_tasks_are_the_generator_output(task, tmp_path):
    from importlib import resources

    from repair.train.taskgen import GENERATORS, materialize_task, write_jsonl

    write_jsonl(GENERATORS[task]("test", 500), tmp_path / "regen.jsonl")
    shipped = resources.files("evals.tasks") / f"{task}_test.jsonl"
    assert (tmp_path / "regen.jsonl").read_text() == shipped.read_text()
    write_jsonl(GENERATORS[task]("train", 500), tmp_path / "train.jsonl")  # repair fit's calibration split
    assert (tmp_path / "train.jsonl").read_text() == (resources.files("evals.tasks") / f"{task}_train.jsonl").read_text()
    train = {r["prompt"] for r in GENERATORS[task]("train", 7000)}
    assert not train & {r["prompt"] for r in GENERATORS[task]("test", 1000)}  # disjoint splits
    assert str(Path(str(shipped)).resolve()) in materialize_task(task).read_text()
    answer = {"addition": lambda a, b: a + b, "difference": lambda a, b: abs(a - b),
              "joining": lambda a, b: int(f"{b}{a}")}[task]  # the arithmetic, written independently
    for r in (json.loads(line) for line in shipped.read_text().splitlines()):
        a, b = (int(w) for w in re.findall(r"\d+", r["prompt"]))
        assert r["completion"] == f" {answer(a, b)}" == r["choices"][r["answer"]]
        assert len(set(r["choices"])) == 4


def test_zorblax_tasks_share_operands_and_differ_in_the_operator_word():
    from repair.train.taskgen import GENERATORS

    rows = {t: GENERATORS[t]("train", 50) for t in ("addition", "difference", "joining")}
    strip = {t: [re.sub(r" z[a-z]p ", " OP ", r["prompt"]) for r in rs] for t, rs in rows.items()}
    assert strip["addition"] == strip["difference"] == strip["joining"]
    assert len({rs[0]["prompt"] for rs in rows.values()}) == 3


def test_python_api_sweep_and_compare_equal_the_commands(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    import evals

    res = _sweep(llama_base, llama_adapter, mc_task, corpus_file, tmp_path / "cli")
    assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "cli" / "sweep.json").read_text())
    api = evals.sweep(llama_base, llama_adapter, tmp_path / "api", scales=(0.0, 0.5, 1.0), tasks=str(mc_task),
                      forgetting=str(corpus_file))
    for mine, theirs in zip([api.base, api.tuned, *api.points], [cli["base"], cli["tuned"], *cli["points"]],
                            strict=True):
        assert (mine.scale, mine.accuracy, mine.forgetting_nll, mine.intruders) == \
            (theirs["scale"], theirs["accuracy"], theirs["forgetting_nll"], theirs["intruders"])
    table = evals.compare([llama_base, llama_adapter], [str(mc_task)], base=str(llama_base))
    assert table.rows[1].scores["tiny_add"].value == api.tuned.accuracy


def test_unknown_task_names_close_matches_before_loading_anything(llama_base, llama_adapter, corpus_file, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--task", "arc_easyy",
                                    "--forgetting", str(corpus_file), "--out", str(out)])
    assert res.exit_code == 2 and "lm-eval has no task 'arc_easyy'" in res.output and "arc_easy" in res.output
    assert res.output.strip().count("\n") == 0 and not out.exists()
    res = CliRunner().invoke(main, ["compare", str(llama_base), "--tasks", "zzzz_no_such", "--out", str(out)])
    assert res.exit_code == 2 and "no registered task has a similar name" in res.output and not out.exists()


def test_compare_draws_base_samples_from_base_or_refuses(llama_base, llama_adapter, mc_task, tmp_path, monkeypatch):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    args = ["compare", str(llama_adapter), "--tasks", str(mc_task), "--limit", "4", "--forgetting", "base-samples:3"]
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 2 and "needs --base" in res.output and not out.exists()
    res = CliRunner().invoke(main, [*args, "--base", str(llama_base), "--out", str(out)])
    assert res.exit_code == 0, res.output
    corpora = list((tmp_path / "cache" / "corpora").iterdir())
    assert len(corpora) == 1  # sampled once, from the base
    res = _sweep(llama_base, llama_adapter, mc_task, "base-samples:3", tmp_path / "sw", "--limit", "4")
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "cache" / "corpora").iterdir()) == corpora  # the sweep reuses the same documents
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    compare = json.loads((out / "compare.json").read_text())
    assert compare["rows"][0]["forgetting_nll"] == pytest.approx(sweep["tuned"]["forgetting_nll"], rel=1e-4)




def test_lm_eval_environment_report_is_collected_once_a_process(llama_base, llama_adapter, mc_task, corpus_file,
                                                                  tmp_path, monkeypatch):
    """simple_evaluate adds torch's environment report to every result; collecting it runs `pip list` and more
    (about a second). A sweep collects it once however many points it measures, and every result file keeps it."""
    import torch.utils.collect_env as collect_env

    from evals.measure import accuracy

    calls: list[int] = []

    def collector() -> str:
        calls.append(1)
        return "the environment report"

    monkeypatch.setattr(collect_env, "get_pretty_env_info", collector)
    monkeypatch.setattr(accuracy, "_ENVIRONMENT", [])
    res = CliRunner().invoke(main, ["sweep", str(llama_base), str(llama_adapter), "--scales", "0,0.5", "--task",
                                    str(mc_task), "--limit", "4", "--forgetting", str(corpus_file), "--out",
                                    str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    results = sorted((tmp_path / "sw").rglob("results_*.json"))
    assert len(results) >= 4 and len(calls) == 1
    assert all(json.loads(p.read_text())["pretty_env_info"] == "the environment report" for p in results)
    assert collect_env.get_pretty_env_info is collector  # lm-eval's own function is back in place


def test_shipped_tasks_load_without_indexing_every_lm_eval_task(tmp_path, monkeypatch):
    """The project's own tasks are standalone YAMLs: lm-eval's index of its own few thousand tasks (seconds to
    build, once per task folder) is not built for them, and lm-eval loads the same documents as the data file."""
    from evals.measure.accuracy import load_tasks, task_manager_for, task_yaml

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    tm, name = task_manager_for("addition")
    assert name == "addition" and tm.all_tasks == ["addition"]  # nothing of lm-eval's own
    task = load_tasks(tm, name, "--task")["addition"]
    data = task_yaml("addition").read_text().split("test: ")[1].split("\n")[0]
    first = json.loads(Path(data).read_text().splitlines()[0])
    assert task.doc_to_text(next(iter(task.test_docs()))) == first["prompt"]


def test_a_standalone_task_yaml_needs_no_lm_eval_index(tmp_path, monkeypatch):
    """A user's YAML that loads from its own folder is evaluated without lm-eval's index of every task; one that
    does not load that way gets the index (and then lm-eval's own error), and an edited YAML is judged again."""
    from lm_eval.tasks import TaskManager

    from evals.measure.accuracy import needs_lm_eval_index, task_manager_for

    alone = write_mc_task(tmp_path / "alone", name="tiny_alone")
    tm, name = task_manager_for(str(alone))
    assert not needs_lm_eval_index(str(alone)) and tm.all_tasks == ["tiny_alone"]
    assert TaskManager(include_path=str(alone.parent), include_defaults=False).all_tasks == tm.all_tasks  # oracle
    alone.write_text(alone.read_text().replace("test_split: test", "test_split: no_such_split"))
    assert needs_lm_eval_index(str(alone))  # the edited YAML is judged again, and no longer loads alone
