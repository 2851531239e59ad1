"""Runners: sweep, compare, continual learning and comparisons across fine-tunes, built on ``evals.measure``."""
