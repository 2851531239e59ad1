"""Forgetting of the pre-training distribution: mean NLL per predicted token on a reference corpus.

Causal LMs: each document is scored on its own, as ``model(input_ids=ids, labels=ids)`` scores it,
and documents are weighted by their number of predicted tokens. Masked LMs (RoBERTa-like, as in the
paper): pseudo-log-likelihood (Salazar et al., 2020), masking one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evals.measure.models import is_masked_lm


@dataclass(frozen=True)
class ForgettingScore:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int
    documents: int
    kind: str  # "nll" or "pseudo-nll"
    doc_nll: list[float] = field(default_factory=list)  # each scored document's summed NLL (nats)
    doc_tokens: list[int] = field(default_factory=list)  # and its number of scored tokens


def context_length(model, tok) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return int(min(n or tok.model_max_length, tok.model_max_length or n))


def encode(tok, docs: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each document, with the tokenizer's default special tokens, truncated to the context."""
    return [ids[:max_len] for ids in tok(docs)["input_ids"]]


@torch.no_grad()
def causal_nll(model, tok, docs: list[str], batch_size: int = 8) -> ForgettingScore:
    """Token-weighted mean NLL over documents, batched with right padding (each scored independently)."""
    seqs = [s for s in encode(tok, docs, context_length(model, tok)) if len(s) >= 2]
    total, count = 0.0, 0
    doc_nll: list[float] = []
    doc_tokens: list[int] = []
    dev = next(model.parameters()).device
    for i in tqdm(range(0, len(seqs), batch_size), desc="forgetting", unit="batch", disable=None):
        chunk = seqs[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()  # (b, t, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(dev), reduction="none")  # (b, t-1)
        keep = mask[:, 1:].to(dev).bool()
        per_doc = (nll.double() * keep).sum(1)  # (b,)
        doc_nll += per_doc.tolist()
        doc_tokens += keep.sum(1).tolist()
        total += float(per_doc.sum())
        count += int(keep.sum())
    return ForgettingScore(total / max(count, 1), count, len(seqs), "nll", doc_nll, doc_tokens)


@torch.no_grad()
def pseudo_nll(model, tok, docs: list[str], batch_size: int = 32) -> ForgettingScore:
    """Pseudo-NLL per token of a masked LM: −Σ log p(x_i | x_without_i) / n (Salazar et al., 2020)."""
    special = set(tok.all_special_ids)
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    doc_nll: list[float] = []
    for ids in tqdm(encode(tok, docs, context_length(model, tok)), desc="pseudo-LL", unit="doc", disable=None):
        positions = [i for i, t in enumerate(ids) if t not in special]
        seq = torch.tensor(ids)
        doc = 0.0
        for k in range(0, len(positions), batch_size):
            pos = torch.tensor(positions[k:k + batch_size])
            batch = seq.repeat(len(pos), 1)
            batch[torch.arange(len(pos)), pos] = tok.mask_token_id
            logp = model(input_ids=batch.to(dev)).logits.float().log_softmax(-1)  # (b, t, V)
            doc -= float(logp[torch.arange(len(pos)), pos, seq[pos]].double().sum())
        doc_nll.append(doc)
        total += doc
        count += len(positions)
    tokens = [sum(t not in special for t in ids) for ids in encode(tok, docs, context_length(model, tok))]
    return ForgettingScore(total / max(count, 1), count, len(docs), "pseudo-nll", doc_nll, tokens)


def document_tokens(model, tok, docs: list[str]) -> list[int]:
    """Scored tokens of each scored document, in the order the forgetting score lists them."""
    seqs = encode(tok, docs, context_length(model, tok))
    if is_masked_lm(model):
        special = set(tok.all_special_ids)
        return [sum(t not in special for t in s) for s in seqs]
    return [len(s) - 1 for s in seqs if len(s) >= 2]


def kind(model) -> str:
    return "pseudo-nll" if is_masked_lm(model) else "nll"


def forgetting(model, tok, docs: list[str], batch_size: int = 8) -> ForgettingScore:
    """NLL per token for causal LMs, pseudo-NLL for masked LMs."""
    return pseudo_nll(model, tok, docs) if is_masked_lm(model) else causal_nll(model, tok, docs, batch_size)
