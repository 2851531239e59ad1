"""Training: recipes, ``repair finetune``, the intruder monitor callback, and the made-up Zorblax tasks."""
