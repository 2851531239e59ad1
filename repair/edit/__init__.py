"""Editing: the editor's arithmetic, controls, plans, and its three uses: ``patcher`` (files),
``inplace`` (a model in memory, for sweeps) and ``live_edit`` (a live PeftModel)."""
