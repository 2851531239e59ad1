"""Adapters: settings as peft resolves them, LoRA factors, peft-merged adapter types, and the pair
sources (files and live models) that give each base matrix with its fine-tuned counterpart."""
