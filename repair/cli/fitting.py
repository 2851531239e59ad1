"""``repair fit``: per-direction λ fitted to an accuracy budget, measured beside one λ and the whole update."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from repair.cli.options import (
    batch_size_option,
    detect_options,
    eval_options,
    handle_errors,
    parse_scales,
    task_options,
)


@click.command()
@click.argument("base")
@click.argument("tuned")
@task_options
@click.option("--max-acc-drop", required=True, type=float,
              help="Accuracy budget: the picked point has the least forgetting whose drop (mean over the tasks, "
                   "a fraction: 0.005 is half a point) stays within X.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--directions", default="delta", show_default=True, type=click.Choice(["intruders", "delta"]),
              help="Fit one λ per singular direction of ΔW in every adapted matrix, or per intruder of W_tuned "
                   "(the directions the paper edits, and no others).")
@click.option("--format", "fmt", default="merged", show_default=True, type=click.Choice(["merged", "adapter"]),
              help="The picked checkpoint (DIR/fitted): merged, or a PEFT LoRA adapter of rank r + n (exact).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Task examples to fit on, a jsonl of {prompt, completion} (default: the tasks' training split).")
@click.option("--calibration-corpus", default="base-samples", show_default=True,
              help="Forgetting documents to fit on: base-samples[:N] (drawn with a seed of their own), a "
                   ".txt/.jsonl file or a rolling lm-eval task; never the evaluation's documents.")
@click.option("--penalties", default="30,10,3,1", show_default=True, callback=parse_scales,
              help="Task-loss weights of the path, in this order, warm-started (largest first keeps the path near "
                   "the tuned model at its start); each gives one fitted point.")
@click.option("--steps", default=4, show_default=True, type=int, help="Adam steps per penalty.")
@click.option("--uniform-scales", default="0,0.5", show_default=True, callback=parse_scales,
              help="λ values of the uniform front (one λ over the intruders), measured beside the fit.")
@click.option("--whole-scales", default="0.25,0.5,0.75", show_default=True, callback=parse_scales,
              help="λ values of the baseline front W0 + λ·ΔW, measured beside the fit.")
@click.option("--calibration-seed", default=0, show_default=True, type=int,
              help="Seed of the calibration examples' order and minibatches.")
@batch_size_option()
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="dtype of the model.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]), help="Spread the model with accelerate.")
@click.option("--allow-amplify", is_flag=True, help="Let fitted λ_i exceed 1.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DIR/fitted.")
@eval_options
@detect_options
@handle_errors
def fit(base, tuned, tasks, forgetting, limit, max_acc_drop, out, directions, fmt, calibration, calibration_corpus,
        penalties, steps, uniform_scales, whole_scales, calibration_seed, batch_size, dtype, device_map, allow_amplify, overwrite,
        eval_settings, detect_opts):
    """Fit one λ per direction on calibration data (forgetting against the task loss), measure the fitted front,
    the uniform-λ front and the whole-update front on held-out data, and write DIR/fitted at the point with the
    least forgetting within --max-acc-drop (fit.json, fit.md, front.png beside it).

    Exit 1 when no fitted point is within the budget (the fronts are written all the same)."""
    from evals.measure.fit_report import markdown
    from evals.runners.fitter import FitOptions, check_fit, run_fit
    from repair.cli.terminal import library_output_to, quietly, start_log, verbosity

    opts = FitOptions(out=out, tasks=tasks, max_acc_drop=max_acc_drop, directions=directions, format=fmt,
                      forgetting=forgetting, limit=limit, calibration=calibration,
                      calibration_corpus=calibration_corpus, penalties=penalties, steps=steps,
                      uniform_scales=uniform_scales, whole_scales=whole_scales, seed=calibration_seed, detect=detect_opts,
                      batch_size=batch_size, dtype=dtype, device_map=device_map, overwrite=overwrite, allow_amplify=allow_amplify,
                      eval=eval_settings)
    _, early = quietly(verbosity(), check_fit, base, tuned, opts)  # exit 2 before anything is written
    start_log(out / "run.log", early)
    with library_output_to(out / "run.log", verbosity()):
        report = run_fit(base, tuned, opts)
    click.echo(markdown(report))
    click.echo(f"\nWrote {out / 'fit.json'}, fit.md, front.png; other libraries' output in {out / 'run.log'}")
    if report.pick.label is None:
        click.echo(f"\nNo fitted point picked: {report.pick.reason}.", err=True)
        sys.exit(1)
    click.echo(f"\nPicked {report.pick.label}: accuracy drop {report.pick.accuracy_drop:+.4f}, forgetting removed "
               f"{100 * (report.pick.forgetting_removed or 0):.1f}%, checkpoint {report.pick.checkpoint}")
