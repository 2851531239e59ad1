"""The harness with several tasks and lm-eval's own flags and result files, checked against lm-eval itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import char_tokenizer, tiny_llama, write_mc_task

from repair.cli import main

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
SEED_KWARGS = {f"{k}_seed": 1 for k in ("random", "numpy_random", "torch_random", "fewshot_random")}


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """The tiny Llama with a chat template and a context long enough for two-shot prompts."""
    base = tmp_path_factory.mktemp("chat") / "base"
    model = tiny_llama()
    model.config.max_position_embeddings = 256
    model.save_pretrained(str(base))
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 256
    tok.save_pretrained(str(base))
    return base


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> tuple[Path, Path]:
    """Two local tasks in two folders (two include paths in one lm-eval call)."""
    return (write_mc_task(tmp_path_factory.mktemp("t1"), "tiny_add"),
            write_mc_task(tmp_path_factory.mktemp("t2"), "tiny_mul", op="*"))


def sweep(base, adapter, corpus, out, *extra):
    return CliRunner().invoke(main, ["sweep", str(base), str(adapter), "--forgetting", str(corpus),
                                     "--out", str(out), *extra])


def direct(checkpoint: Path, tasks: tuple[Path, Path], **flags) -> dict[str, float]:
    """``simple_evaluate`` on a checkpoint written to disk, loaded by lm-eval itself."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(checkpoint), device="cpu", batch_size=8)
    tm = TaskManager(include_path=[str(t.parent) for t in tasks], include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tiny_add", "tiny_mul"], task_manager=tm, **flags)
    return {t: out["results"][t]["acc,none"] for t in ("tiny_add", "tiny_mul")}


def test_two_tasks_with_lm_eval_flags_equal_simple_evaluate(chat_base, llama_adapter, two_tasks, corpus_file,
                                                            tmp_path):
    """Two tasks, --num-fewshot 2 --apply-chat-template --seed 1: every per-task accuracy equals lm-eval's
    `simple_evaluate` with those settings on the merged checkpoint, at λ = 1 (`repair patch --scale 1`) and
    λ = 0 (the sweep's own --write-picked checkpoint, which holds exactly the weights it measured)."""
    from transformers import AutoModelForCausalLM

    from repair.detection.detector import DetectOptions
    from repair.edit.inplace import InPlacePatcher

    out = tmp_path / "sw"
    flags = ["--num-fewshot", "2", "--apply-chat-template", "--seed", "1", "--limit", "8"]
    res = sweep(chat_base, llama_adapter, corpus_file, out, "--task", str(two_tasks[0]), "--task",
                str(two_tasks[1]), "--scales", "0", "--pick", "max-acc-drop=1.0:tiny_mul", "--write-picked", *flags)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "sweep.json").read_text())
    assert report["arguments"]["lm_eval"] == {"num_fewshot": 2, "apply_chat_template": True, "seed": 1,
                                              "fewshot_as_multiturn": None, "gen_kwargs": None,
                                              "log_samples": False}
    tuned, zero = report["tuned"], report["points"][0]
    assert set(tuned["scores"]) == {"tiny_add", "tiny_mul"}
    assert tuned["accuracy"] == pytest.approx((tuned["scores"]["tiny_add"]["value"] +
                                               tuned["scores"]["tiny_mul"]["value"]) / 2)
    assert report["pick"]["task"] == "tiny_mul" and report["pick"]["scale"] == 0.0
    kwargs = dict(limit=8, num_fewshot=2, apply_chat_template=True, **SEED_KWARGS)
    merged = tmp_path / "merged"
    assert CliRunner().invoke(main, ["patch", str(chat_base), str(llama_adapter), "--scale", "1",
                                     "--out", str(merged)]).exit_code == 0
    for point, checkpoint in ((tuned, merged), (zero, out / "picked")):
        ref = direct(checkpoint, two_tasks, **kwargs)
        assert {t: s["value"] for t, s in point["scores"].items()} == ref, point["label"]
    # the picked checkpoint is the sweep's in-place model at λ = 0, bit for bit (no second detection)
    model = AutoModelForCausalLM.from_pretrained(str(chat_base))
    InPlacePatcher(model, DetectOptions().pairs(str(chat_base), str(llama_adapter)), DetectOptions()).apply(0.0)
    picked = AutoModelForCausalLM.from_pretrained(str(out / "picked")).state_dict()
    assert all(torch.equal(v, picked[k]) for k, v in model.state_dict().items())
    assert json.loads((out / "picked" / "repair_report.json").read_text())[
        "provenance"]["arguments"]["patches_from"] == f"repair sweep {report['fingerprint']}"
    # lm-eval's own result file per point, as `lm_eval --output_path DIR/lm-eval/<label>` lays it out
    for label in ("base", "scale=1", "scale=0"):
        (results,) = (out / "lm-eval" / label).glob("*/results_*.json")
        assert set(json.loads(results.read_text())["results"]) == {"tiny_add", "tiny_mul"}


def test_fewshot_as_multiturn_off_is_passed_through(chat_base, llama_adapter, two_tasks, corpus_file, tmp_path):
    """--no-fewshot-as-multiturn is passed through (the test above keeps lm-eval's default: on with the
    template); a comma list of tasks is the same as the repeated flag."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    res = sweep(chat_base, llama_adapter, corpus_file, tmp_path / "off", "--task", f"{two_tasks[0]},{two_tasks[1]}",
                "--scales", "1", "--limit", "8", "--num-fewshot", "2", "--apply-chat-template",
                "--no-fewshot-as-multiturn", "--seed", "1")
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "off" / "sweep.json").read_text())["base"]["scores"]
    lm = HFLM(pretrained=str(chat_base), device="cpu", batch_size=8)
    ref = simple_evaluate(model=lm, tasks=["tiny_add", "tiny_mul"], limit=8, num_fewshot=2, apply_chat_template=True,
                          fewshot_as_multiturn=False, **SEED_KWARGS,
                          task_manager=TaskManager(include_path=[str(t.parent) for t in two_tasks],
                                                   include_defaults=False))  # standalone YAMLs: no index needed
    assert {t: s["value"] for t, s in got.items()} == {t: ref["results"][t]["acc,none"] for t in got}


def test_result_files_are_what_the_lm_eval_cli_writes(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    """Each point's files have the layout, names and schema of `lm_eval run --output_path ... --log_samples` on
    the same tiny model (run here as lm-eval's own CLI), lm-eval's file-name readers find them, and the base
    point's scores equal the CLI's."""
    from lm_eval.utils import get_latest_filename, get_results_filenames, get_sample_results_filenames

    res = sweep(llama_base, llama_adapter, corpus_file, tmp_path / "sw", "--task", str(mc_task), "--scales", "1",
                "--limit", "6", "--log-samples")
    assert res.exit_code == 0, res.output
    cli = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                          f"pretrained={llama_base}", "--tasks", "tiny_add", "--include_path", str(mc_task.parent),
                          "--limit", "6", "--batch_size", "8", "--device", "cpu", "--log_samples",
                          "--output_path", str(cli)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    def files(folder: Path) -> tuple[dict, list[dict], list[str]]:
        names = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        assert all(Path(n).parent.parent == folder for n in names)  # <output_path>/<model name>/<file>
        (results,) = get_results_filenames(names)
        (samples,) = get_sample_results_filenames(names)
        assert get_latest_filename([results]) == results and Path(samples).name.startswith("samples_tiny_add_")
        return (json.loads(Path(results).read_text()),
                [json.loads(line) for line in Path(samples).read_text().splitlines()], names)

    ours, our_samples, _ = files(tmp_path / "sw" / "lm-eval" / "base")
    theirs, their_samples, _ = files(cli)
    assert set(ours) == set(theirs)
    for key in ("results", "configs", "higher_is_better", "n-samples"):
        assert set(ours[key]["tiny_add"]) == set(theirs[key]["tiny_add"]), key
    for key in ("versions", "n-shot", "n-samples"):
        assert ours[key] == theirs[key], key
    assert ours["results"]["tiny_add"]["acc,none"] == theirs["results"]["tiny_add"]["acc,none"]
    assert set(ours["config"]) == set(theirs["config"])
    assert [set(s) for s in our_samples] == [set(s) for s in their_samples]
    assert [s["acc"] for s in our_samples] == [s["acc"] for s in their_samples]
    assert ours["task_hashes"] == theirs["task_hashes"]  # the same documents, prompts and targets


def test_several_tasks_in_tables_plots_and_pick(llama_base, llama_adapter, two_tasks, corpus_file, tmp_path):
    """Per-task columns in sweep.md and sweep.csv, one panel per task (and the mean) in tradeoff.png, and
    --pick bounding one named task; a pick naming a task not swept is a sentence before anything runs."""
    import csv

    from PIL import Image

    out = tmp_path / "sw"
    res = sweep(llama_base, llama_adapter, corpus_file, out, "--task", f"{two_tasks[0]},{two_tasks[1]}",
                "--scales", "0,1", "--limit", "6", "--pick", "max-acc-drop=0:tiny_add", "--batch-size", "auto")
    assert res.exit_code == 0, res.output
    assert "| point | λ | tiny_add | tiny_mul | mean accuracy |" in (out / "sweep.md").read_text()
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert {"tiny_add", "tiny_add_stderr", "tiny_mul", "tiny_mul_stderr"} <= set(rows[0])
    report = json.loads((out / "sweep.json").read_text())
    points = [report["base"], report["tuned"], *report["points"], *report["control"]["points"]]
    for row, point in zip(rows, points, strict=True):
        assert float(row["tiny_mul"]) == point["scores"]["tiny_mul"]["value"]
    tuned = report["tuned"]["scores"]["tiny_add"]["value"]
    allowed = [p for p in report["points"] if p["scores"]["tiny_add"]["value"] >= tuned]
    assert report["pick"]["scale"] == min(allowed, key=lambda p: p["forgetting_nll"])["scale"]
    width, _ = Image.open(out / "tradeoff.png").size
    assert width == 3 * 6 * 120  # tiny_add, tiny_mul and the mean
    bad = sweep(llama_base, llama_adapter, corpus_file, tmp_path / "bad", "--task", str(two_tasks[0]),
                "--pick", "max-acc-drop=0.1:tiny_mul")
    assert bad.exit_code == 2 and "'tiny_mul' is not one of the swept tasks (tiny_add)" in bad.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra, message", [
    (["--fewshot-as-multiturn"], "--fewshot-as-multiturn: needs --apply-chat-template"),
    (["--num-fewshot", "-1"], "--num-fewshot: expected an integer >= 0"),
    (["--batch-size", "big"], "--batch-size: expected a positive integer or auto, got 'big'"),
])
def test_lm_eval_flag_errors(llama_base, llama_adapter, mc_task, corpus_file, tmp_path, extra, message):
    res = sweep(llama_base, llama_adapter, corpus_file, tmp_path / "o", "--task", str(mc_task), *extra)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_flag_the_installed_lm_eval_lacks_names_its_version(llama_base, llama_adapter, mc_task, corpus_file,
                                                             tmp_path, monkeypatch):
    import lm_eval

    def old_simple_evaluate(model, tasks=None, num_fewshot=None, limit=None):  # an lm-eval without these flags
        raise AssertionError("not reached")

    monkeypatch.setattr(lm_eval, "simple_evaluate", old_simple_evaluate)
    res = sweep(llama_base, llama_adapter, corpus_file, tmp_path / "o", "--task", str(mc_task), "--gen-kwargs",
                "temperature=0")
    assert res.exit_code == 2, res.output
    assert f"--gen-kwargs: the installed lm-eval {lm_eval.__version__} does not support it" in res.output


def test_write_picked_honours_overwrite(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    """A non-empty DIR/picked is refused before anything is measured, and replaced with --overwrite."""
    out = tmp_path / "sw"
    (out / "picked").mkdir(parents=True)
    (out / "picked" / "keep.txt").write_text("mine")
    args = ["--task", str(mc_task), "--scales", "0", "--limit", "4", "--pick", "max-acc-drop=1", "--write-picked"]
    res = sweep(llama_base, llama_adapter, corpus_file, out, *args)
    assert res.exit_code == 2 and "pass --overwrite to replace it" in res.output, res.output
    assert not (out / "points").exists() and (out / "picked" / "keep.txt").read_text() == "mine"
    res = sweep(llama_base, llama_adapter, corpus_file, out, *args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "picked" / "keep.txt").exists() and (out / "picked" / "config.json").is_file()


def test_compare_takes_a_sweep_folder(llama_base, llama_adapter, mc_task, two_tasks, corpus_file, tmp_path):
    """A sweep folder stands for its base, tuned and picked checkpoints (the sweep's base is --base); the rows
    equal the sweep's own points, and lm-eval's files are written per model."""
    sw = tmp_path / "sw"
    res = sweep(llama_base, llama_adapter, corpus_file, sw, "--task", str(two_tasks[0]), "--scales", "0",
                "--limit", "6", "--pick", "max-acc-drop=1", "--write-picked")
    assert res.exit_code == 0, res.output
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["compare", str(sw), "--tasks", str(two_tasks[0]), "--tasks", str(two_tasks[1]),
                                    "--limit", "6", "--forgetting", str(corpus_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in report["rows"]] == ["base", "tuned", "picked λ=0"]
    assert [r["model"] for r in report["rows"]] == [str(llama_base), str(llama_adapter), str(sw / "picked")]
    swept = json.loads((sw / "sweep.json").read_text())
    for row, point in zip(report["rows"], (swept["base"], swept["tuned"], swept["points"][0]), strict=True):
        assert row["scores"]["tiny_add"]["value"] == point["scores"]["tiny_add"]["value"]
        assert row["forgetting_nll"] == pytest.approx(point["forgetting_nll"], rel=1e-5)
    assert sorted(p.name for p in (out / "lm-eval").iterdir()) == ["0-base", "1-tuned", "2-picked"]


def test_base_samples_are_drawn_through_the_chat_template(chat_base, tmp_path, monkeypatch):
    """With the chat template on, base samples answer an empty user turn (only the answer is kept):
    the same draws as transformers' `generate` from `apply_chat_template`'s ids, cached apart from plain ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.measure.corpus import load_corpus

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(chat_base))
    tok = AutoTokenizer.from_pretrained(str(chat_base))
    chat = load_corpus("base-samples:4", model, tok, model_key="k", chat=True)
    plain = load_corpus("base-samples:4", model, tok, model_key="k")
    assert len(list((tmp_path / "corpora").glob("*.jsonl"))) == 2 and chat != plain
    prompt = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<user>\n<assistant>"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=64,
                         num_return_sequences=4, pad_token_id=tok.eos_token_id)
    expected = [d for d in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True) if d.strip()]
    assert chat == expected


def test_gen_kwargs_are_parsed_as_lm_eval_parses_them(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    """--gen-kwargs with a list value reaches a generate_until task as lm-eval's CLI would pass it (a list of stop
    strings, not the text of one), per the samples lm-eval records; a malformed value is a sentence."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    yaml = tmp_path / "tasks" / "tiny_gen.yaml"  # beside the test, never in the shared mc_task folder
    yaml.parent.mkdir()
    yaml.write_text(mc_task.read_text().replace("task: tiny_add", "task: tiny_gen")
                    .replace("output_type: multiple_choice", "output_type: generate_until")
                    .replace("doc_to_choice: '{{choices}}'\ndoc_to_target: answer", "doc_to_target: '{{choices[0]}}'")
                    .replace("metric: acc", "metric: exact_match"))
    res = sweep(llama_base, llama_adapter, corpus_file, tmp_path / "sw", "--task", str(yaml), "--scales", "1",
                "--limit", "3", "--log-samples", "--gen-kwargs", 'until=["=","\\n"],max_gen_toks=4')
    assert res.exit_code == 0, res.output
    (samples,) = (tmp_path / "sw" / "lm-eval" / "base").glob("*/samples_tiny_gen_*.jsonl")
    ours = [json.loads(line)["arguments"]["gen_args_0"]["arg_1"] for line in samples.read_text().splitlines()]
    lm = HFLM(pretrained=str(llama_base), device="cpu", batch_size=8)
    ref = simple_evaluate(model=lm, tasks=["tiny_gen"], limit=3, log_samples=True,
                          gen_kwargs={"until": ["=", "\n"], "max_gen_toks": 4},
                          task_manager=TaskManager(include_path=str(yaml.parent), include_defaults=False))
    assert ours == [s["arguments"][0][1] for s in ref["samples"]["tiny_gen"]]
    assert ours[0]["until"] == ["=", "\n"] and ours[0]["max_gen_toks"] == 4
    bad = sweep(llama_base, llama_adapter, corpus_file, tmp_path / "bad", "--task", str(yaml), "--gen-kwargs", "x")
    assert bad.exit_code == 2 and "--gen-kwargs: expected key=value pairs" in bad.output


def test_metric_under_a_filter_is_read():
    """gsm8k-style results (metrics only under named filters) give the first filter's metric and stderr."""
    from evals.measure.accuracy import _pick_metric

    results = {"alias": "g", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
               "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.06}
    score = _pick_metric("g", results)
    assert (score.metric, score.value, score.stderr) == ("exact_match,strict-match", 0.25, 0.05)
    assert _pick_metric("t", {"acc,none": 0.3, "acc_stderr,none": "N/A"}).stderr is None


def test_compare_log_samples_needs_out(llama_base, mc_task):
    res = CliRunner().invoke(main, ["compare", str(llama_base), "--tasks", str(mc_task), "--log-samples"])
    assert res.exit_code == 2 and "--log-samples: needs --out" in res.output
