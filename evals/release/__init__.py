"""``repair release``: from an adapter to a folder ready to publish (weights, model card, report, evidence)."""
