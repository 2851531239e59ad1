"""Evaluation harness: downstream accuracy against forgetting, with lm-eval.

``sweep``, ``fit``, ``release``, ``compare`` and ``continual_learning`` are the functions behind ``repair sweep``,
``repair fit``, ``repair release``, ``repair compare`` and ``repair continual`` (see ``evals.api``), imported on
first use.
"""

from importlib import import_module

__all__ = ["sweep", "fit", "release", "compare", "continual_learning"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("evals.api"), name)
    raise AttributeError(f"module 'evals' has no attribute {name!r}")
