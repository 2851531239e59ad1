"""``repair finetune``, ``continual``, ``figures``, ``demo`` and ``cache``: the subcommands for training runs,
the paper's figures and the tool's own housekeeping (registered on ``repair.cli.commands``)."""

from __future__ import annotations

from pathlib import Path

import click

from repair.cli.options import batch_size_option, detect_options, eval_options, handle_errors


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field before validation, e.g. --set lora.r=4 --set lora.alpha=2r (repeatable).")
@handle_errors
def finetune(recipe, out, overwrite, overrides):
    """Fine-tune (LoRA or full) as RECIPE.yaml says; see recipes/."""
    from repair.train.finetune import finetune as run_finetune
    from repair.train.recipe import load_recipe

    final = run_finetune(load_recipe(recipe, overrides), out, overwrite)
    made = [f"checkpoints in {out / 'checkpoints'}", f"log in {out / 'training_log.json'}"]
    if (out / "intruders.json").is_file():
        made.append(f"intruders over training in {out / 'intruders.json'}")
    click.echo(f"Wrote {final} ({', '.join(made)})")


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--limit", type=int, default=None, help="Evaluate at most N examples per task.")
@click.option("--forgetting", default="base-samples:64", show_default=True,
              help="Forgetting corpus (see `repair sweep`): base-samples:N, a text file, or a dataset.")
@batch_size_option("Documents per forward pass and lm-eval's batch size (an integer, or auto).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field before validation, e.g. --set repair.scale=0 (repeatable).")
@eval_options
@detect_options
@handle_errors
def continual(recipe, out, limit, forgetting, batch_size, overwrite, overrides, eval_settings, detect_opts):
    """Continual learning as RECIPE.yaml's stages say: train each stage on the model so far (LoRA: a fresh
    adapter, merged), optionally repair, and measure intruders against the base, accuracy on every task seen
    and forgetting after each stage (continual.json, continual.md, DIR/stage-N/)."""
    from evals.runners.continual import markdown_table, run_continual
    from repair.train.recipe import load_recipe

    if limit is not None and limit < 1:
        raise click.BadParameter(f"expected a positive integer, got {limit}.", param_hint="--limit")
    loaded = load_recipe(recipe, overrides)
    report = run_continual(loaded, out, limit=limit, forgetting_spec=forgetting, batch_size=batch_size,
                           opts=detect_opts, overwrite=overwrite, settings=eval_settings)
    click.echo(markdown_table([(loaded.name, report)]))


@click.command()
@click.argument("base")
@click.argument("tuned", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--k-max", default=50, show_default=True, type=int, help="Largest k in the intruders-vs-k curve.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of step-N checkpoints for the Fig. 7 plot (one detection per step).")
@click.option("--history", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="intruders.json from `repair finetune` (IntruderMonitor) for the Fig. 7 plot, without detection.")
@click.option("--forgetting", "forgetting_spec", default=None,
              help="Also measure each TUNED's forgetting on this corpus (base-samples:N, a text file, or a dataset) "
                   "and draw intruders against it with Spearman's rho.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Documents per forward pass (--forgetting).")
@click.option("--labels", default=None, help="Comma-separated names for the TUNED models in the figures "
                                             "(default: their folder names).")
@detect_options
@handle_errors
def figures(base, tuned, out, k_max, checkpoints, history, forgetting_spec, batch_size, labels, detect_opts):
    """Draw the paper's diagnostics for BASE vs one or more TUNED: similarity matrix, ε and k curves (one curve
    per TUNED), effective rank; with --forgetting, intruders against forgetting across the TUNED models."""
    if checkpoints is not None and history is not None:
        raise click.UsageError("--checkpoints and --history both give Fig. 7's data; pass one of them.")
    if forgetting_spec is not None and (checkpoints is not None or history is not None):
        raise click.UsageError("--forgetting compares several fine-tunes; Fig. 7 (--checkpoints/--history) follows "
                               "one: run them separately.")
    names = None if labels is None else [n.strip() for n in labels.split(",")]
    if forgetting_spec is not None:
        from evals.measure.models import Placement
        from evals.runners.across import figures_with_forgetting

        report = figures_with_forgetting(base, tuned, out, forgetting_spec, detect_opts.top_k, k_max, detect_opts,
                                         Placement(detect_opts.device), batch_size, names)
    else:
        from repair.figures.curves import make_figures

        report = make_figures(base, list(tuned), out, detect_opts.top_k, k_max, detect_opts, checkpoints, history,
                              names)
    for f in report.files:
        click.echo(f"wrote {f}")
    if report.spearman is not None:
        click.echo(f"intruders against forgetting: Spearman rho {report.spearman.rho:.3f} "
                   f"(p = {report.spearman.p_value:.2g}, n = {report.spearman.n})")
    click.echo(f"wrote {out / 'figures.json'}")


@click.command()
@click.option("--out", default="intruder-repair-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder (replaced on a rerun).")
@click.option("--retrain", is_flag=True, help="Rebuild the demo adapter from its recipe first (about 5 min).")
@click.option("--limit", default=100, show_default=True, type=int, help="Task examples per evaluation.")
@handle_errors
def demo(out, retrain, limit):
    """`repair release` on the embedded default (SmolLM2-135M) and its bundled LoRA adapter: detect, sweep three λ,
    pick within a 2-point accuracy budget, and write the folder to publish."""
    import os
    import sys

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the demo's data is all local: never wait on a hub
        os.environ.setdefault(var, "1")
    from repair.cli.demo import BASE, demo_adapter, demo_options
    from repair.cli.release import release_and_report

    adapter = demo_adapter(out, retrain)
    sys.exit(release_and_report(BASE, str(adapter), demo_options(out, limit)))


@click.group()
def cache() -> None:
    """Manage the cache: base spectra, resolved adapter configs, file hashes, converted models."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@handle_errors
def cache_ls(as_json):
    """Show what the cache holds and how much space each part takes."""
    from repair.runtime.cache import cache_report

    report = cache_report()
    click.echo(report.model_dump_json(indent=2) if as_json else report.render())


@cache.command("clear")
@click.option("--models", "with_models", is_flag=True, help="Also delete converted embedded models.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def cache_clear(with_models, yes):
    """Delete computed entries (spectra, adapter settings, file hashes); models only with --models."""
    from repair.runtime.cache import cache_report, clear_cache

    report = cache_report()
    if not yes:
        click.confirm(f"Delete {report.describe(with_models)} from {report.folder}?", abort=True)
    freed = clear_cache(with_models)
    click.echo(f"Freed {freed / 2**20:.1f} MiB in {report.folder}.")


RESEARCH_COMMANDS = (finetune, continual, figures, demo, cache)
