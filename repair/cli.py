"""The ``repair`` command line: each subcommand parses, validates and calls one library function.

Heavy modules (torch, transformers, peft) are imported inside commands so ``repair --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from . import __version__


class UsageFailure(click.ClickException):
    """An input error: one sentence on stderr, exit code 2."""

    exit_code = 2


def _handle_errors(fn):
    """Turn the library's ``RepairError`` into one clear sentence and exit 2 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import RepairError

        try:
            return fn(*args, **kwargs)
        except RepairError as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise UsageFailure(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="intruder-repair")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(verbose: int, debug: bool) -> None:
    """Detect and repair intruder dimensions in LoRA fine-tuned models."""
    level = logging.DEBUG if (debug or verbose > 1) else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--top-k", default=10, show_default=True, type=int, help="Tuned singular vectors to examine.")
@click.option("--epsilon", default=0.5, show_default=True, type=float, help="Cosine threshold in (0, 1].")
@click.option("--side", default="left", show_default=True, type=click.Choice(["left", "right", "both"]),
              help="Compare left, right, or both singular vectors.")
@click.option("--modules", default=None, help="Regex on base tensor names (default: all but embeddings/heads).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report.")
@click.option("--fail-above", type=int, default=None, help="Exit 1 when total intruders exceed N.")
@click.option("--worst", default=10, show_default=True, type=int, help="Matrices listed in the table.")
@click.option("--allow-pickle", is_flag=True, help="Also read *.bin/*.pt checkpoints (pickle can run code).")
@_handle_errors
def detect(base, tuned, top_k, epsilon, side, modules, json_path, fail_above, worst, allow_pickle):
    """Find intruder dimensions of TUNED (a LoRA adapter or a full checkpoint) against BASE.

    BASE and TUNED are local folders, hub ids, or an embedded model name (smollm2-135m).
    """
    from .detector import DetectOptions
    from .detector import detect as run_detect
    from .report import render_table

    opts = DetectOptions(top_k=top_k, epsilon=epsilon, side=side, modules=modules, allow_pickle=allow_pickle)
    report = run_detect(base, tuned, opts)
    click.echo(render_table(report, worst=worst))
    if json_path is not None:
        report.write_json(json_path)
        click.echo(f"\nReport written to {json_path}")
    if fail_above is not None and report.total_intruders > fail_above:
        click.echo(f"{report.total_intruders} intruders exceed --fail-above {fail_above}.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
