"""``repair fit``: the gradient of the per-direction scales, the calibration's disjointness from the evaluation,
and the written checkpoint, each against an independent oracle (float64 numpy SVD of peft's merge, transformers'
own loss, peft's ``merge_and_unload`` of the written adapter)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CORPUS, merged_state, tiny_llama
from safetensors.torch import load_file

from evals.measure.calibration import (
    Calibration,
    Example,
    calibration_documents,
    disjoint,
    evaluated_contexts,
    task_examples,
)
from evals.measure.corpus import load_corpus
from evals.measure.models import load_model
from evals.measure.objective import Sequence, mean_nll
from repair.detection.detector import DetectOptions
from repair.edit.inplace import InPlacePatcher
from repair.edit.scaled import DirectionScales, delta_groups, intruder_groups
from repair.errors import RepairError

OPTS = DetectOptions(cache=False, threads=1)


def _scales(base, adapter, directions: str):
    src = OPTS.pairs(str(base), str(adapter))
    model, tok, _ = load_model(str(base))
    patcher = InPlacePatcher(model, src, OPTS)
    groups = intruder_groups(patcher) if directions == "intruders" else delta_groups(src, patcher, OPTS.top_k)
    assert groups
    return DirectionScales(model, src, groups, patcher.param), model, tok


def _oracle_weights(base, adapter, groups, lam: np.ndarray, directions: str) -> dict[str, np.ndarray]:
    """W' = W_tuned + Σ (λ_i − 1) σ_i u_i v_iᵀ in float64, from peft's merge and numpy's SVD of W_tuned or ΔW."""
    tuned = merged_state(tiny_llama, adapter)
    w0 = load_file(base / "model.safetensors")
    out = {}
    for g in groups:
        W = tuned[g.name].double().numpy()
        M = W if directions == "intruders" else W - w0[g.name].double().numpy()
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
        for j, rank in enumerate(g.indices):
            W = W + (lam[g.offset + j] - 1.0) * S[rank] * np.outer(U[:, rank], Vh[rank])
        out[g.name] = W
    return out


def _docs(n: int = 3, length: int = 12) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(3, 120, (n, length), generator=gen).tolist()


@pytest.mark.parametrize("directions", ["delta", "intruders"])
def test_gradient_of_the_scales_is_a_float64_central_difference(llama_base, llama_adapter, directions):
    scales, model, _ = _scales(llama_base, llama_adapter, directions)
    rng = np.random.default_rng(0)
    lam = rng.uniform(0.2, 0.9, scales.size)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = _docs()
    with scales.hooked() as leaf:
        leaf.data = torch.tensor(lam, dtype=torch.float32)
        loss = mean_nll(model, [Sequence(s, len(s) - 1) for s in ids])
        loss.backward()
        grad = leaf.grad.double().numpy()

    model64 = tiny_llama().double()
    state = {k: v.double() for k, v in merged_state(tiny_llama, llama_adapter).items()}
    batch = torch.tensor(ids)

    def loss64(x: np.ndarray) -> float:  # mean next-token NLL of the float64 model, weights from the formula
        for name, W in _oracle_weights(llama_base, llama_adapter, scales.groups, x, directions).items():
            state[name] = torch.from_numpy(W)
        model64.load_state_dict(state)
        with torch.no_grad():  # (transformers' own loss casts logits to float32: too coarse for differences)
            logits = model64(input_ids=batch).logits  # (b, t, V) float64
            return float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:]))

    h = 1e-2  # transformers' RMSNorm rounds to float32 inside the float64 model: a small h differences noise
    fd = np.array([(loss64(lam + h * e) - loss64(lam - h * e)) / (2 * h) for e in np.eye(scales.size)])
    assert abs(float(loss.detach()) - loss64(lam)) < 1e-4
    assert np.abs(grad - fd).max() <= 1e-3 * np.abs(fd).max() + 1e-6, (grad, fd)
    assert np.abs(fd).max() > 1e-4  # the directions matter to the loss: the comparison is not of zeros


@pytest.mark.parametrize("directions", ["delta", "intruders"])
@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_fitted_checkpoint_is_the_formula(llama_base, llama_adapter, tmp_path, directions, fmt):
    from peft import PeftModel

    from repair.edit.patcher import PatchOptions, patch

    scales, _, _ = _scales(llama_base, llama_adapter, directions)
    lam = np.random.default_rng(1).uniform(0.0, 1.0, scales.size)
    out = tmp_path / "fitted"
    report = patch(str(llama_base), str(llama_adapter), PatchOptions(
        out=out, detect=OPTS, format=fmt, patches=scales.patches(torch.tensor(lam), directions)))
    expected = _oracle_weights(llama_base, llama_adapter, scales.groups, lam, directions)
    if fmt == "merged":
        written = load_file(out / "model.safetensors")
    else:
        written = {k: v.detach() for k, v in
                   PeftModel.from_pretrained(tiny_llama(), str(out)).merge_and_unload().state_dict().items()}
    for name, W in expected.items():
        err = np.abs(written[name].double().numpy() - W).max()
        assert err <= 1e-5 * max(1.0, np.abs(W).max()), (name, err)
    recorded = {e.name: e for e in report.matrices}
    for g in scales.groups:
        assert recorded[g.name].scales == pytest.approx(lam[g.offset:g.offset + g.size].tolist(), abs=1e-6)
        assert recorded[g.name].directions == directions and recorded[g.name].scale is None


def test_hooks_and_in_place_weights_agree_and_restore_exactly(llama_base, llama_adapter):
    scales, model, _ = _scales(llama_base, llama_adapter, "delta")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lam = torch.rand(scales.size)
    batch = torch.tensor(_docs())
    with torch.no_grad(), scales.hooked() as leaf:
        leaf.data = lam.clone()
        hooked = model(input_ids=batch).logits
    scales.apply(lam)
    with torch.no_grad():
        edited = model(input_ids=batch).logits
    scales.restore()
    assert torch.allclose(hooked, edited, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_is_disjoint_from_the_evaluation():
    from importlib import resources

    examples, tested = task_examples("addition", 500, seed=0), evaluated_contexts("addition")
    shipped = resources.files("evals.tasks") / "addition_test.jsonl"
    test_prompts = {json.loads(line)["prompt"] for line in shipped.read_text().splitlines()}
    assert set(tested) == test_prompts  # lm-eval's evaluated contexts are the shipped test split
    assert len(examples) == 500 and not {e.context for e in examples} & test_prompts
    gold = {json.loads(line)["prompt"]: json.loads(line)["completion"]
            for line in (resources.files("evals.tasks") / "addition_train.jsonl").read_text().splitlines()}
    assert all(gold[e.context] == e.target for e in examples)  # the gold choice, lm-eval's delimiter ("")


def test_calibration_samples_are_not_the_evaluation_samples(llama_base):
    model, tok, _ = load_model(str(llama_base))
    evaluated = load_corpus("base-samples:6", model, tok, "tiny")
    calib = calibration_documents("base-samples:6", model, tok, "tiny", 6, chat=False)
    assert len(calib) == 6 and not set(calib) & set(evaluated)


def test_overlap_is_dropped_and_total_overlap_refused():
    calib = Calibration(documents=[CORPUS[0], " A  stitch in time saves nine.", "fresh text"],
                        examples=[Example("2+2=", "4"), Example("3+3=", "6")])
    kept = disjoint(calib, eval_documents=CORPUS, eval_contexts=["2+2="])
    assert kept.documents == ["fresh text"] and kept.examples == [Example("3+3=", "6")]
    assert (kept.dropped_documents, kept.dropped_examples) == (2, 1)
    with pytest.raises(RepairError, match="calibration"):
        disjoint(Calibration(documents=CORPUS[:2], examples=[]), eval_documents=CORPUS, eval_contexts=[])
    with pytest.raises(RepairError, match="calibration"):
        disjoint(Calibration(documents=["new"], examples=[Example("2+2=", "4")]), CORPUS, ["2+2="])


def _calibration_file(path):
    """Sums the tiny task never asks (its operands are below 6 and 4)."""
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                            for a in range(6, 10) for b in range(4, 8)))
    return path


def _fit_args(llama_base, llama_adapter, mc_task, corpus_file, calib, out, *extra):
    return ["fit", str(llama_base), str(llama_adapter), "--task", str(mc_task), "--forgetting", str(corpus_file),
            "--calibration", str(calib), "--calibration-corpus", "base-samples:4", "--max-acc-drop", "1",
            "--penalties", "3,1", "--steps", "2", "--uniform-scales", "0", "--whole-scales", "0.5", "--no-cache",
            "--out", str(out), *extra]


def _recorded_formula(base, adapter, directions: list[dict], scales) -> dict[str, np.ndarray]:
    """W' from fit.json's own record (matrix, rank, σ, λ_i), in float64 from numpy's SVD of peft's ΔW."""
    tuned = merged_state(tiny_llama, adapter)
    w0 = load_file(base / "model.safetensors")
    expected: dict[str, np.ndarray] = {}
    for d, x in zip(directions, scales, strict=True):
        name = d["matrix"]
        U, S, Vh = np.linalg.svd(tuned[name].double().numpy() - w0[name].double().numpy())
        assert abs(S[d["rank"]] - d["sigma"]) <= 5e-7 + 1e-5 * S[0]  # fit.json keeps σ to 6 decimals
        W = expected.get(name, tuned[name].double().numpy())
        expected[name] = W + (x - 1.0) * S[d["rank"]] * np.outer(U[:, d["rank"]], Vh[d["rank"]])
    return expected


def _release_fit(base, adapter, task, corpus, tmp_path, max_acc_drop: str):
    """``repair release --fit`` on the tiny model (calibration from a jsonl: the tiny task has no train split)."""
    from click.testing import CliRunner

    from repair.cli import main

    calib = _calibration_file(tmp_path / "calib.jsonl")
    out = tmp_path / "release"
    res = CliRunner().invoke(main, [
        "release", str(base), str(adapter), "--task", str(task), "--forgetting", str(corpus), "--max-acc-drop",
        max_acc_drop, "--fit", "--calibration", str(calib), "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_fit_writes_three_fronts_and_the_picked_checkpoint_exactly(llama_base, llama_adapter, mc_task, corpus_file,
                                                                   tmp_path):
    from click.testing import CliRunner

    from repair.cli import main

    out = tmp_path / "fit"
    calib = _calibration_file(tmp_path / "calib.jsonl")
    res = CliRunner().invoke(main, _fit_args(llama_base, llama_adapter, mc_task, corpus_file, calib, out))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "fit.json").read_text())
    assert {f["front"] for f in report["fronts"]} == {"fitted", "uniform", "whole"}
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["calibration"]["examples"] == 16 and report["calibration"]["documents"] == 4
    picked = next(f for f in report["fronts"] if f["point"]["label"] == report["pick"]["label"])
    lam = np.array(picked["scales"])
    assert ((lam >= 0) & (lam <= 1)).all() and len(lam) == len(report["directions"])
    # the oracle: W' from fit.json's own record (matrix, rank, λ_i) and numpy's SVD of peft's ΔW
    written = load_file(out / "fitted" / "model.safetensors")
    for name, W in _recorded_formula(llama_base, llama_adapter, report["directions"], lam).items():
        assert np.abs(written[name].double().numpy() - W).max() <= 1e-5 * max(1.0, np.abs(W).max()), name


def test_fit_refuses_calibration_that_is_the_evaluation(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    from click.testing import CliRunner

    from repair.cli import main

    calib = _calibration_file(tmp_path / "calib.jsonl")
    args = _fit_args(llama_base, llama_adapter, mc_task, corpus_file, calib, tmp_path / "fit")
    args[args.index("base-samples:4")] = str(corpus_file)  # the forgetting corpus itself
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "every calibration document is also an evaluation document" in res.output
    assert not (tmp_path / "fit" / "fitted").exists()


@pytest.mark.parametrize("flags, flag", [(["--max-acc-drop", "2"], "max_acc_drop"),
                                         (["--penalties", "a"], "--penalties"), (["--steps", "0"], "steps"),
                                         (["--calibration-corpus", "base-samples:0"], "--calibration-corpus"),
                                         (["--penalties", "3,3"], "--penalties")])
def test_fit_bad_options_exit_2_before_loading(llama_base, llama_adapter, mc_task, corpus_file, tmp_path, flags,
                                               flag, monkeypatch):
    from click.testing import CliRunner

    import evals.runners.fitter
    from repair.cli import main

    def never(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(evals.runners.fitter, "load_model", never)
    calib = _calibration_file(tmp_path / "calib.jsonl")
    args = _fit_args(llama_base, llama_adapter, mc_task, corpus_file, calib, tmp_path / "fit")
    for name, value in zip(flags[::2], flags[1::2], strict=True):
        args[args.index(name) + 1] = value  # every flag of the cases is in _fit_args
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert flag.lstrip("-").replace("-", "_") in res.output.replace("-", "_")


def test_release_with_fit_publishes_the_fitted_checkpoint(llama_base, llama_adapter, mc_task, corpus_file, tmp_path):
    from peft import PeftModel

    out = _release_fit(llama_base, llama_adapter, mc_task, corpus_file, tmp_path, "1")
    release = json.loads((out / "release.json").read_text())
    fit = json.loads((out / "logs" / "fit.json").read_text())
    assert release["method"] == "fit" and release["scale"] is None and release["verdict"] == "patched"
    assert not (out / "logs" / "fitted").exists()  # the weights are the release's own, not kept twice
    picked = next(f for f in fit["fronts"] if f["point"]["label"] == fit["pick"]["label"])
    released = PeftModel.from_pretrained(tiny_llama(), str(out)).merge_and_unload().state_dict()
    for name, W in _recorded_formula(llama_base, llama_adapter, fit["directions"], picked["scales"]).items():
        assert np.abs(released[name].double().numpy() - W).max() <= 1e-5 * max(1.0, np.abs(W).max()), name
    assert any(x < 0.99 for x in picked["scales"])  # the released weights are not TUNED's own


def test_release_with_fit_and_no_point_within_the_budget_is_tuned_unchanged(llama_base, llama_adapter, mc_task,
                                                                             corpus_file, tmp_path, monkeypatch):
    import evals.runners.fitter
    from evals.measure.fit_report import FitPick

    monkeypatch.setattr(evals.runners.fitter, "choose", lambda report: FitPick(
        max_acc_drop=report.pick.max_acc_drop, label=None, reason="no fitted point within the budget (forced)"))
    out = _release_fit(llama_base, llama_adapter, mc_task, corpus_file, tmp_path, "0")
    release = json.loads((out / "release.json").read_text())
    assert release["verdict"] == "unchanged" and release["scale"] == 1.0 and release["edited_directions"] == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # TUNED's own files, byte for byte
        assert (out / name).read_bytes() == (llama_adapter / name).read_bytes()


def test_release_refuses_fit_options_without_fit(llama_base, llama_adapter, mc_task, tmp_path):
    from click.testing import CliRunner

    from repair.cli import main

    res = CliRunner().invoke(main, ["release", str(llama_base), str(llama_adapter), "--task", str(mc_task),
                                    "--max-acc-drop", "0.1", "--directions", "intruders", "--out",
                                    str(tmp_path / "r")])
    assert res.exit_code == 2 and "--directions/--calibration" in res.output and "--fit" in res.output


@pytest.mark.parametrize("n, size", [(7, 3), (8, 8), (5, 16), (64, 8)])
def test_minibatches_cover_every_item_each_pass_and_never_repeat_within_a_batch(n, size):
    import random

    from evals.runners.fitter import _Cursor

    cursor = _Cursor(n, random.Random(0))
    taken = [cursor.take(size) for _ in range(3 * n)]
    assert all(len(b) == min(size, n) and len(set(b)) == len(b) for b in taken)
    flat = [i for b in taken for i in b]
    assert set(flat) == set(range(n))
    if n % size == 0:  # passes line up with batches: each pass is a permutation
        assert all(sorted(flat[k:k + n]) == list(range(n)) for k in range(0, len(flat), n))
