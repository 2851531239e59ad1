"""Calibration data for ``repair fit``, disjoint from what the evaluation scores.

Two parts: documents of the base's distribution (``base-samples`` drawn with a seed of their own, or a corpus the
user names), whose NLL is the forgetting the fit lowers; and task examples (context, target), whose target NLL
is the task loss it keeps. Examples come from a task's training (else validation) split through lm-eval's own
task object (``doc_to_text``, ``doc_to_target``, ``doc_to_choice``, ``target_delimiter``), or from a jsonl of
``{"prompt", "completion"}`` records. Anything equal to an evaluated document or test example is dropped.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from evals.measure.accuracy import load_tasks, task_manager_for
from evals.measure.corpus import base_samples, is_base_samples, load_corpus, parse_samples
from repair.errors import RepairError

logger = logging.getLogger(__name__)

CALIBRATION_SEED = 1  # base-samples for calibration; the evaluation's are drawn with seed 0


@dataclass(frozen=True)
class Example:
    context: str
    target: str


@dataclass
class Calibration:
    """What the fit trains on, and what was dropped for overlapping the evaluation."""

    documents: list[str]
    examples: list[Example]
    dropped_documents: int = 0
    dropped_examples: int = 0
    sources: dict[str, str] = field(default_factory=dict)


def _target(task, doc) -> str:
    """The gold continuation as lm-eval scores it: the (first) gold choice for multiple choice, else the
    (first) target."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    return f"{task.config.target_delimiter}{target}"


def _task(spec: str):
    tm, name = task_manager_for(spec, "--task")
    task = load_tasks(tm, name, f"--task {spec}").get(name)  # a group is keyed by its ConfigurableGroup
    if task is None or not hasattr(task, "doc_to_text"):
        raise RepairError(f"--task {spec}: is a group of lm-eval tasks; give its tasks one by one.")
    return task


def calibration_split(spec: str):
    """The task object and its docs to calibrate on: the training split, else the validation split when the
    test split is the evaluated one; an input error otherwise (checked before any model is loaded)."""
    task = _task(spec)
    if task.has_training_docs():
        return task, list(task.training_docs())
    if task.has_validation_docs() and task.has_test_docs():
        return task, list(task.validation_docs())
    raise RepairError(f"--task {spec}: has no training or validation split to calibrate on (its only split is "
                      "the evaluated one); pass --calibration FILE.jsonl with prompt/completion records.")


def task_examples(spec: str, n: int, seed: int) -> list[Example]:
    """Calibration examples of one lm-eval task (``calibration_split``, shuffled with ``seed``, the first ``n``)."""
    task, docs = calibration_split(spec)
    random.Random(seed).shuffle(docs)
    return [Example(str(task.doc_to_text(d)), _target(task, d)) for d in docs[:n]]


def evaluated_contexts(spec: str) -> list[str]:
    """The contexts of the documents lm-eval evaluates for ``spec`` (its test split, else validation)."""
    task = _task(spec)
    return [str(task.doc_to_text(d)) for d in task.eval_docs]


def jsonl_examples(path: Path, n: int) -> list[Example]:
    """``{"prompt", "completion"}`` records, the first ``n``."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        examples = [Example(str(r["prompt"]), str(r["completion"])) for r in rows]
    except OSError as e:
        raise RepairError(f"calibration {path}: cannot be read ({e.strerror or e}).") from e
    except (ValueError, KeyError, TypeError) as e:
        raise RepairError(f"calibration {path}: expected one JSON object with 'prompt' and 'completion' per "
                          "line.") from e
    if not examples:
        raise RepairError(f"calibration {path}: holds no examples.")
    return examples[:n]


def calibration_documents(spec: str, model, tok, model_key: str, n: int, chat: bool) -> list[str]:
    """``base-samples[:N]`` drawn with the calibration seed, or the corpus ``spec`` names (its first ``n``)."""
    if is_base_samples(spec):
        count = parse_samples(spec, n, "--calibration-corpus")
        return base_samples(model, tok, model_key, count, seed=CALIBRATION_SEED, chat=chat)
    return load_corpus(spec, model, tok, model_key, limit=n)


def disjoint(calibration: Calibration, eval_documents: list[str], eval_contexts: list[str]) -> Calibration:
    """Drop every calibration document that is an evaluation document and every example whose context is an
    evaluated test context (whitespace-normalised); refuse when nothing is left."""
    def norm(s: str) -> str:
        return " ".join(s.split())

    docs_seen = {norm(d) for d in eval_documents}
    contexts_seen = {norm(c) for c in eval_contexts}
    documents = [d for d in calibration.documents if norm(d) not in docs_seen]
    examples = [e for e in calibration.examples if norm(e.context) not in contexts_seen]
    dropped_d = len(calibration.documents) - len(documents)
    dropped_e = len(calibration.examples) - len(examples)
    if dropped_d or dropped_e:
        logger.warning("calibration: dropped %d documents and %d examples that the evaluation scores",
                       dropped_d, dropped_e)
    if not documents:
        raise RepairError("calibration_corpus: every calibration document is also an evaluation document; name "
                          "another corpus.")
    if calibration.examples and not examples:
        raise RepairError("calibration: every calibration example is also a test example of the evaluated "
                          "tasks; give --calibration examples from another split.")
    return Calibration(documents, examples, calibration.dropped_documents + dropped_d,
                       calibration.dropped_examples + dropped_e, calibration.sources)
