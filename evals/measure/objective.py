"""The fit's two losses, differentiable: forgetting (NLL of calibration documents per token) and the task (NLL of
calibration targets per target token, given their contexts, tokenised by lm-eval's ``HFLM``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evals.measure.calibration import Example
from evals.measure.forgetting import context_length, encode


@dataclass(frozen=True)
class Sequence:
    """Token ids and how many of the last ones are scored (all but the first for a document)."""

    ids: list[int]
    scored: int


def document_sequences(model, tok, docs: list[str]) -> list[Sequence]:
    """Each document as forgetting scores it (``evals.measure.forgetting.encode``): every token after the first."""
    return [Sequence(s, len(s) - 1) for s in encode(tok, docs, context_length(model, tok)) if len(s) >= 2]


def example_sequences(lm, examples: list[Example], chat: bool = False) -> list[Sequence]:
    """context + target, the target's tokens scored, tokenised by lm-eval's own ``HFLM`` (``lm``) as its
    ``loglikelihood`` does: ``_encode_pair`` (trailing spaces of the context move to the target), the prefix
    token for an empty context, the pair left-truncated to the model's ``max_length``. With ``chat``, the context is one
    user turn through ``HFLM.apply_chat_template``."""
    out = []
    for e in examples:
        context = lm.apply_chat_template([{"role": "user", "content": e.context}]) if chat else e.context
        if context:
            ctx, cont = lm._encode_pair(context, e.target)
        else:
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(e.target, add_special_tokens=False)
        ids = (ctx + cont)[-lm.max_length:]
        if cont and len(ids) >= 2:
            out.append(Sequence(ids, min(len(cont), len(ids) - 1)))
    return out


def mean_nll(model, seqs: list[Sequence]) -> torch.Tensor:
    """Mean NLL per scored token over ``seqs`` (one right-padded batch, not empty), differentiable."""
    dev = next(model.parameters()).device
    width = max(len(s.ids) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    scored = torch.zeros(len(seqs), width - 1, dtype=torch.bool)
    for j, s in enumerate(seqs):
        n = len(s.ids)
        ids[j, :n], mask[j, :n] = torch.tensor(s.ids), 1
        scored[j, n - 1 - s.scored:n - 1] = True  # predictions of the scored tokens
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()  # (b, t, V)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(dev), reduction="none")  # (b, t-1)
    keep = scored.to(dev)
    return (nll * keep).sum() / keep.sum()
