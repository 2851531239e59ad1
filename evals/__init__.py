"""Evaluation harness: downstream accuracy against forgetting, with lm-eval."""
