"""Deterministic, self-made downstream tasks: training data and their local lm-eval tasks.

``addition``: "In Zorblax arithmetic, 37 zap 48 is" -> " 85". The operator word is made up, so the
base model cannot know it; LoRA learns it in minutes on a CPU. Training and test pairs are disjoint.
``difference`` ("37 zop 48 is" -> " 11") and ``joining`` ("37 zup 48 is" -> " 4837") use the same prompt
and operands with another made-up word: trained one after another (continual learning), they compete
for the same weights.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from repair.errors import RepairError
from repair.runtime.cache import TASKS, cache_path
from repair.runtime.durable import write_text_atomic

PROMPT = "In Zorblax arithmetic, {a} {op} {b} is"


@dataclass(frozen=True)
class Operator:
    """A made-up Zorblax operator: its word, its answer, and the wrong answers that sit next to it."""

    word: str
    answer: Callable[[int, int], int]
    near: Callable[[int, int, int], tuple[int, ...]]  # (a, b, answer) -> candidate wrong answers


OPERATORS = {
    "addition": Operator("zap", lambda a, b: a + b, lambda a, b, c: (c - 10, c - 1, c + 1, c + 10, c + 2, c - 2)),
    "difference": Operator("zop", lambda a, b: abs(a - b), lambda a, b, c: (c - 10, c - 1, c + 1, c + 10, c + 2, c - 2)),
    "joining": Operator("zup", lambda a, b: 100 * b + a,
                        lambda a, b, c: (100 * a + b, c - 1, c + 1, c + 10, c - 10, c + 100)),
}


def _pairs(seed: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def zorblax_examples(task: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of ``task``'s train or test split: prompt, completion, and 4 choices for evaluation.

    Every task draws its two-digit operands from the same shuffled pairs (the first 1000 are the test split),
    so the tasks differ only in the operator word and its answer: they compete for the same weights."""
    op = OPERATORS[task]
    pairs = _pairs(seed)
    pool = pairs[:1000] if split == "test" else pairs[1000:]
    if n > len(pool):
        raise RepairError(f"{task}: at most {len(pool)} {split} examples, asked for {n}.")
    # addition keeps its original seed string, so its data (and every recipe trained on it) is unchanged
    rng = random.Random(f"{seed}-{split}" if task == "addition" else f"{task}-{seed}-{split}")
    rows = []
    for a, b in pool[:n]:
        c = op.answer(a, b)
        wrong = rng.sample(list(dict.fromkeys(x for x in op.near(a, b, c) if x >= 0 and x != c)), 3)
        choices = [f" {x}" for x in [c, *wrong]]
        rng.shuffle(choices)
        rows.append({"prompt": PROMPT.format(a=a, op=op.word, b=b), "completion": f" {c}", "choices": choices,
                     "answer": choices.index(f" {c}")})
    return rows


def addition_examples(split: str, n: int, seed: int = 0) -> list[dict]:
    """``zorblax_examples`` of ``addition``: "In Zorblax arithmetic, 37 zap 48 is" -> " 85"."""
    return zorblax_examples("addition", split, n, seed)


GENERATORS = {name: functools.partial(zorblax_examples, name) for name in OPERATORS}


def shipped_task_names() -> list[str]:
    return sorted(p.stem for p in resources.files("evals.tasks").iterdir() if p.name.endswith(".yaml"))


def materialize_task(name: str) -> Path:
    """Write a shipped task's YAML with the absolute paths of its data, test and train
    splits (lm-eval resolves paths from the cwd)."""
    pkg = resources.files("evals.tasks")
    template = (pkg / f"{name}.yaml").read_text()
    data = Path(str(pkg / f"{name}_test.jsonl"))
    train = Path(str(pkg / f"{name}_train.jsonl"))
    out = cache_path(TASKS, name, f"{name}.yaml")
    text = template.replace("__DATA__", str(data.resolve())).replace("__TRAIN__", str(train.resolve()))
    if not out.is_file() or out.read_text() != text:
        write_text_atomic(out, text)
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
