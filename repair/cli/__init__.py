"""The ``repair`` command line: ``main`` (the click group) and ``run`` (the console entry point).

``commands.py`` holds the group and the release-path commands (detect, patch, sweep, compare), ``research.py``
the research ones (finetune, continual, figures, demo, cache), ``options.py`` the shared options and the
mapping from library errors to flags and exit codes. Only this package imports ``evals``.
"""

from repair.cli.commands import main, run

__all__ = ["main", "run"]
