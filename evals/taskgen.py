"""Deterministic, self-made downstream tasks: training data and their local lm-eval tasks.

``addition``: "In Zorblax arithmetic, 37 zap 48 is" -> " 85". The operator word is made up, so the
base model cannot know it; LoRA learns it in minutes on a CPU. Training and test pairs are disjoint.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from repair.durable import write_text_atomic
from repair.errors import RepairError
from repair.sources import cache_dir

PROMPT = "In Zorblax arithmetic, {a} zap {b} is"


def _pairs(seed: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def addition_examples(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of the train or test split: prompt, completion, and 4 choices for evaluation."""
    pairs = _pairs(seed)
    pool = pairs[:1000] if split == "test" else pairs[1000:]
    if n > len(pool):
        raise RepairError(f"addition: at most {len(pool)} {split} examples, asked for {n}.")
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for a, b in pool[:n]:
        c = a + b
        wrong = rng.sample([x for x in (c - 10, c - 1, c + 1, c + 10, c + 2, c - 2) if x >= 0], 3)
        choices = [f" {x}" for x in [c, *wrong]]
        rng.shuffle(choices)
        rows.append({"prompt": PROMPT.format(a=a, b=b), "completion": f" {c}", "choices": choices,
                     "answer": choices.index(f" {c}")})
    return rows


GENERATORS = {"addition": addition_examples}


def shipped_task_names() -> list[str]:
    return sorted(p.stem for p in resources.files("evals.tasks").iterdir() if p.name.endswith(".yaml"))


def materialize_task(name: str) -> Path:
    """Write a shipped task's YAML with the absolute path of its data (lm-eval resolves paths from the cwd)."""
    pkg = resources.files("evals.tasks")
    template = (pkg / f"{name}.yaml").read_text()
    data = Path(str(pkg / f"{name}_test.jsonl"))
    out = cache_dir() / "tasks" / name / f"{name}.yaml"
    text = template.replace("__DATA__", str(data.resolve()))
    if not out.is_file() or out.read_text() != text:
        write_text_atomic(out, text)
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
