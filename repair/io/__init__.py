"""Reading and writing checkpoints: sources (local, hub, GGUF, embedded), safetensors readers and writer,
quantization refusals, MoE experts and transformers' conversion mapping, architecture data, file hashes.

Imports only ``repair.errors`` and ``repair.runtime`` (as mergekit's ``io`` does, nothing above it)."""
