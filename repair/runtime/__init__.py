"""Runtime: durable atomic writes, cores and the per-matrix pipeline, and the cache's folder layout.

Imports nothing of the package but ``repair.errors``."""
