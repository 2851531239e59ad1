"""``python -m repair.cli``: the same as the ``repair`` command."""

from repair.cli.commands import run

run()
