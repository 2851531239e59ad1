"""Continual learning (the paper's Fig. 8), with optional repair between stages: ``repair continual``.

A recipe's ``stages`` are trained one after another from one model. LoRA stages train a fresh adapter on
the model as it stands and merge it in (re-initialised each stage, as in the paper); full fine-tuning
trains the model as it stands (each stage with its own optimizer and schedule, as LoRA's). After every stage the model is written to ``DIR/stage-N/`` and measured as a user
would measure a release: intruders against the *original* base (``repair detect``), lm-eval accuracy on
every task seen so far, and forgetting NLL on the base's own samples. With ``repair: {scale: λ}`` the
stage's intruders (against the original base) are rescaled by ``repair patch`` before the next stage
starts from the patched weights, so the table shows whether repairing each release stops them piling up.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from pydantic import BaseModel, Field

from evals.measure.accuracy import EvalSettings, TaskColumn, check_columns, evaluate_columns, make_lm
from evals.measure.forgetting import forgetting
from evals.measure.models import Placement, check_batch_size, forgetting_batch
from evals.measure.results import Score
from evals.measure.stats import nll
from evals.runners.comparison import forgetting_corpus
from repair import __version__
from repair.detection.detector import DetectOptions
from repair.detection.report import SCHEMA_VERSION
from repair.runtime.durable import atomic_output_dir, write_text_atomic
from repair.train.recipe import Recipe

logger = logging.getLogger(__name__)


class StageResult(BaseModel):
    """The model after one stage (stage 0: the base, before any training)."""

    stage: int
    task: str | None = Field(description="the task trained in this stage (None for the base)")
    intruders_found: int | None = Field(None, description="intruders against the original base after training")
    intruders: int | None = Field(None, description="intruders in the model carried forward (after repair, if any)")
    by_module_type: dict[str, int] = Field(default_factory=dict, description="`intruders`, per module type")
    accuracy: dict[str, Score] = Field(description="every task seen so far (the base: every task of the recipe)")
    forgetting_nll: float
    forgetting_stderr: float | None
    train_loss: float | None = None
    seconds: float = 0.0


class ContinualReport(BaseModel):
    schema_version: str = SCHEMA_VERSION
    tool_version: str = __version__
    recipe: dict
    forgetting: str
    limit: int | None
    top_k: int
    epsilon: float
    stages: list[StageResult] = Field(default_factory=list)

    def write(self, out: Path) -> None:
        write_text_atomic(out / "continual.json", self.model_dump_json(indent=2) + "\n")
        write_text_atomic(out / "continual.md", markdown_table([(self.recipe["name"], self)]) + "\n")


def accuracy_cell(value: float | None, stderr: float | None) -> str:
    """``93.5% ± 1.7`` (percent), ``–`` when not measured."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" + (f" ± {100 * stderr:.1f}" if stderr else "")


def nll_cell(value: float, stderr: float | None) -> str:
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr else "")


def _intruders(r: StageResult) -> str:
    if r.intruders is None:
        return "–"
    return str(r.intruders) if r.intruders_found == r.intruders else f"{r.intruders_found} → {r.intruders}"


def markdown_table(reports: list[tuple[str, ContinualReport]]) -> str:
    """One row per (run, stage): intruders against the original base, accuracy on each task, forgetting."""
    tasks = list(dict.fromkeys(t for _, rep in reports for r in rep.stages for t in r.accuracy))
    lines = ["| run | after stage | intruders | " + " | ".join(tasks) + " | forgetting NLL |",
             "|---|---|---|" + "---|" * len(tasks) + "---|"]
    for label, rep in reports:
        for r in rep.stages:
            after = "base" if r.task is None else f"{r.stage}: {r.task}"
            cells = [accuracy_cell(*((s.value, s.stderr) if (s := r.accuracy.get(t)) else (None, None))) for t in tasks]
            lines.append(f"| {label} | {after} | {_intruders(r)} | " + " | ".join(cells)
                         + f" | {nll_cell(r.forgetting_nll, r.forgetting_stderr)} |")
    return "\n".join(lines)


class _Measure:
    """Accuracy on the tasks seen so far and forgetting on the base's samples, for the model as it is."""

    def __init__(self, docs: list[str], limit: int | None, batch_size: int | str, settings: EvalSettings):
        self.docs, self.limit, self.batch_size, self.settings = docs, limit, batch_size, settings

    def __call__(self, model, tok, tasks: list[str]) -> tuple[dict[str, Score], float, float | None]:
        model.eval()
        columns = [TaskColumn(t, self.settings) for t in tasks]
        scores = evaluate_columns(make_lm(model, tok, self.batch_size), columns, self.limit)
        f = forgetting(model, tok, self.docs, forgetting_batch(self.batch_size))
        mean, stderr = nll(f.doc_nll, f.doc_tokens)
        return {k: Score(metric=v.metric, value=v.value, stderr=v.stderr) for k, v in scores.items()}, mean, stderr


def _train_stage(model, tok, recipe: Recipe, stage: int, rows: list[dict], scratch: Path):
    """One stage: LoRA trains a fresh adapter and merges it in; full fine-tuning trains the model itself (a new
    optimizer and schedule each stage, as each stage is its own fine-tune)."""
    import shutil

    from transformers import set_seed

    from repair.train.finetune import lora_model, make_trainer

    set_seed(recipe.seed + stage)  # lm-eval reseeds torch when it measures: each stage's LoRA init is its own
    if recipe.method == "lora":
        model = lora_model(model, recipe)
    trainer = make_trainer(model, tok, rows, recipe, scratch)
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    loss = next((e["train_loss"] for e in reversed(trainer.state.log_history) if "train_loss" in e), None)
    if recipe.method == "lora":
        model = model.merge_and_unload()
    return model, loss


def _detect_and_repair(base: Path, folder: Path, recipe: Recipe, opts: DetectOptions):
    """``(intruders found, intruders kept, by module type, folder of the model carried forward)``."""
    from repair.detection.detector import detect
    from repair.edit.patcher import PatchOptions, patch

    found = detect(str(base), str(folder), opts)
    if recipe.repair is None:
        return found.total_intruders, found, folder
    patched = folder.with_name(folder.name + "-repaired")
    patch(str(base), str(folder), PatchOptions(out=patched, scale=recipe.repair.scale, detect=opts,
                                               per_matrix=recipe.repair.per_matrix))
    return found.total_intruders, detect(str(base), str(patched), opts), patched


def run_continual(recipe: Recipe, out: Path, *, limit: int | None = None, forgetting_spec: str = "base-samples:64",
                  batch_size: int | str = 8, opts: DetectOptions | None = None, overwrite: bool = False,
                  settings: EvalSettings | None = None) -> ContinualReport:
    """Train the recipe's stages one after another and measure the model after each; writes ``out``."""
    from repair.errors import RepairError
    from repair.io.sources import resolve
    from repair.io.writer import check_output_dir
    from repair.train.finetune import load_for_training

    if recipe.stages is None:
        raise RepairError(f"recipe {recipe.name}: it lists no stages; `repair finetune` trains a single fine-tune.")
    opts, settings = opts or DetectOptions(), settings or EvalSettings()
    opts.validate()
    settings.validate()
    check_batch_size(batch_size)
    tasks = list(dict.fromkeys(s.task for s in recipe.stages))
    check_columns([TaskColumn(t, settings) for t in tasks], "stages[].eval_task")
    base = resolve(recipe.base)
    check_output_dir(out, [base.path], overwrite)
    measure = _Measure(forgetting_corpus(forgetting_spec, recipe.base, Placement("cpu"), chat=False),
                       limit, batch_size, settings)
    report = ContinualReport(recipe=recipe.model_dump(mode="json"), forgetting=forgetting_spec, limit=limit,
                             top_k=opts.top_k, epsilon=opts.epsilon)
    with atomic_output_dir(out, overwrite) as tmp:
        _, tok, model = load_for_training(recipe)
        model = model.to(_device())  # where the Trainer puts it: every stage is measured there
        acc, f, se = measure(model, tok, tasks)
        report.stages.append(StageResult(stage=0, task=None, accuracy=acc, forgetting_nll=f, forgetting_stderr=se))
        for i in range(1, len(recipe.stages) + 1):
            model, result = _stage(model, tok, recipe, i, base.path, tmp, opts, measure)
            report.stages.append(result)
        report.write(tmp)
    return report


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stage(model, tok, recipe: Recipe, i: int, base: Path, tmp: Path, opts: DetectOptions, measure: _Measure):
    """Train stage ``i``, write it to ``tmp/stage-i``, repair it if the recipe says so, and measure the model
    carried forward; returns that model and the stage's record."""
    import torch
    from transformers import AutoModelForCausalLM

    from repair.train.finetune import training_rows

    stage = recipe.stages[i - 1]
    t0 = time.perf_counter()
    model, loss = _train_stage(model, tok, recipe, i, training_rows(stage), tmp / "trainer")
    folder = tmp / f"stage-{i}"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    found, kept, carried = _detect_and_repair(base, folder, recipe, opts)
    if carried != folder:  # the next stage starts from the repaired weights, and they are what is measured
        del model
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(str(carried), dtype=torch.float32).to(_device())
    acc, f, se = measure(model, tok, list(dict.fromkeys(s.task for s in recipe.stages[:i])))
    logger.info("stage %d (%s): %d intruders, %s", i, stage.task, kept.total_intruders,
                json.dumps({k: round(v.value, 4) for k, v in acc.items()}))
    return model, StageResult(
        stage=i, task=stage.task, intruders_found=found, intruders=kept.total_intruders,
        by_module_type={k: v.intruders for k, v in sorted(kept.by_module_type.items())}, accuracy=acc,
        forgetting_nll=f, forgetting_stderr=se, train_loss=loss, seconds=round(time.perf_counter() - t0, 1))
