"""Reference corpora for forgetting: a local file, an lm-eval rolling task, or samples of the base model.

``base-samples[:N]`` draws N documents from the base model itself (fixed seed, cached). Tuned NLL
minus base NLL on them is then a Monte-Carlo estimate of KL(base ‖ tuned) on the base's own
distribution: the forgetting the paper measures, without any third-party data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from evals.measure.accuracy import load_tasks, task_manager_for
from repair.errors import RepairError
from repair.runtime.cache import CORPORA, cache_path
from repair.runtime.durable import write_text_atomic

logger = logging.getLogger(__name__)

BASE_SAMPLES = "base-samples"
DEFAULT_SAMPLES, SAMPLE_TOKENS, SAMPLE_SEED = 64, 64, 0


def read_documents(path: Path) -> list[str]:
    """One document per non-empty line of a .txt, or the ``text`` field of each .jsonl record."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RepairError(f"forgetting {path}: cannot be read ({e}).") from e
    if Path(path).suffix != ".jsonl":
        docs = [line for line in lines if line.strip()]
    else:
        try:
            docs = [json.loads(line)["text"] for line in lines if line.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise RepairError(f"forgetting {path}: expected one JSON object with a 'text' field per line.") from e
    if not docs:
        raise RepairError(f"forgetting {path}: holds no documents.")
    return docs


def task_documents(name: str, limit: int | None = None) -> list[str]:
    """Documents of an lm-eval ``loglikelihood_rolling`` task (e.g. wikitext), by name or YAML path."""
    tm, task_name = task_manager_for(name)
    tasks = load_tasks(tm, task_name, f"forgetting {name} (not a file)")
    task = tasks[task_name]
    if task.OUTPUT_TYPE != "loglikelihood_rolling":
        raise RepairError(f"forgetting {name}: lm-eval task has output_type {task.OUTPUT_TYPE!r}, "
                          "expected 'loglikelihood_rolling'.")
    docs = [str(task.doc_to_target(d)) for d in task.eval_docs]
    return docs[:limit] if limit else docs


def parse_samples(spec: str, default: int = DEFAULT_SAMPLES, what: str = "forgetting") -> int:
    """N of ``base-samples[:N]`` (``default`` without it); an input error naming ``what`` otherwise."""
    n = spec.partition(":")[2]
    if n and not (n.isdigit() and int(n) > 0):
        raise RepairError(f"{what} {spec}: expected {BASE_SAMPLES} or {BASE_SAMPLES}:N with N > 0.")
    return int(n) if n else default


def chat_prompt(tok) -> list[int] | None:
    """Token ids that open an assistant turn after an empty user turn, through the tokenizer's chat template
    (with its default system turn, if any), or None without a template: an instruct model prompted with nothing
    asked."""
    from jinja2 import TemplateError

    if not getattr(tok, "chat_template", None):
        return None
    try:
        text = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError) as e:
        raise RepairError(f"forgetting base-samples: the base's chat template cannot render an empty user turn "
                          f"({e}); pass a --forgetting file or task instead.") from e
    return tok(text, add_special_tokens=False).input_ids


def base_samples(model, tok, model_key: str, n: int = DEFAULT_SAMPLES, tokens: int = SAMPLE_TOKENS,
                 seed: int = SAMPLE_SEED, chat: bool = False) -> list[str]:
    """``n`` samples of the model (ancestral sampling, temperature 1), cached by key: unconditional from BOS, or
    with ``chat`` and a chat template, the answers to an empty user turn (only the answer is kept)."""
    prompt = chat_prompt(tok) if chat and tok is not None else None
    key = hashlib.sha256(json.dumps([model_key, n, tokens, seed] + (["chat", prompt] if prompt else []))
                         .encode()).hexdigest()[:16]
    path = cache_path(CORPORA, f"base-samples-{key}.jsonl")
    if path.is_file():
        return read_documents(path)
    if prompt is None:
        prompt = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=next(model.parameters()).device), do_sample=True,
                             top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens,
                             num_return_sequences=n, pad_token_id=tok.eos_token_id)
    docs = [d for d in tok.batch_decode(out[:, len(prompt):], skip_special_tokens=True) if d.strip()]
    write_text_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    logger.info("cached %d base samples at %s", len(docs), path)
    return docs


def is_base_samples(spec: str) -> bool:
    return spec == BASE_SAMPLES or spec.startswith(BASE_SAMPLES + ":")


def load_corpus(spec: str, model=None, tok=None, model_key: str = "", limit: int | None = None,
                chat: bool = False) -> list[str]:
    """Resolve ``--forgetting``: ``base-samples[:N]`` (drawn through the chat template with ``chat``), a
    .txt/.jsonl file, or an lm-eval rolling task (a registered name or a local task YAML)."""
    if is_base_samples(spec):
        docs = base_samples(model, tok, model_key, parse_samples(spec), chat=chat)
    elif Path(spec).is_file() and Path(spec).suffix not in (".yaml", ".yml"):
        docs = read_documents(Path(spec))
    else:
        docs = task_documents(spec)
    return docs[:limit] if limit else docs
