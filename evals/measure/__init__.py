"""Measurements: models for lm-eval, corpora, forgetting, accuracy, statistics, lm-eval files, result tables."""
