"""The ``repair`` command line: each subcommand parses, validates and calls one library function.

Heavy modules (torch, transformers, peft) are imported inside commands so ``repair --help`` is instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from repair import __version__
from repair.cli.fitting import fit
from repair.cli.options import (
    batch_size_option,
    detect_options,
    eval_options,
    handle_errors,
    parse_scales,
    parse_task_list,
    task_options,
)
from repair.cli.research import RESEARCH_COMMANDS


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
@detect_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write the report as JSON to a file, or to stdout with - (the table then goes to stderr).")
@click.option("--fail-above", type=int, default=None, help="Exit 1 when total intruders exceed N.")
@click.option("--worst", default=10, show_default=True, type=int, help="Matrices listed in the table.")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an editable patch plan for `repair patch --plan`.")
@click.option("--per-matrix", type=int, default=None,
              help="With --plan-out: plan only the N top-ranked intruders of each matrix (1: the paper's NeurIPS setting).")
@handle_errors
def detect(base, tuned, detect_opts, json_path, fail_above, worst, plan_out, per_matrix):
    """Find intruder dimensions of TUNED (a LoRA adapter or a full checkpoint) against BASE.

    BASE and TUNED are local folders, hub ids, or an embedded model name (smollm2-135m).
    """
    from repair.detection.detector import detect as run_detect
    from repair.detection.report import render_table

    report = run_detect(base, tuned, detect_opts)
    to_stdout = json_path is not None and str(json_path) == "-"
    click.echo(render_table(report, worst=worst), err=to_stdout)
    if to_stdout:
        click.echo(report.model_dump_json(indent=2))
    elif json_path is not None:
        report.write_json(json_path)
        click.echo(f"\nReport written to {json_path}")
    if plan_out is not None:
        from repair.edit.plan import Plan, check_per_matrix

        check_per_matrix(per_matrix)
        Plan.from_report(report, per_matrix).write(plan_out)
        click.echo(f"Plan written to {plan_out}")
    if fail_above is not None and report.total_intruders > fail_above:
        click.echo(f"{report.total_intruders} intruders exceed --fail-above {fail_above}.", err=True)
        sys.exit(1)


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--scale", type=float, default=None, help="λ: 0 removes intruders, 1 leaves them, 0.5 halves their σ.")
@detect_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--format", "fmt", default="merged", show_default=True, type=click.Choice(["merged", "adapter"]),
              help="A full checkpoint, or a PEFT LoRA adapter of rank r + |intruders| that reproduces W' exactly.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Shard budget, e.g. 500MB or 5GB.")
@click.option("--plan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Apply a plan from `repair detect --plan-out` instead of detecting.")
@click.option("--allow-amplify", is_flag=True, help="Allow λ outside [0, 1].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--per-matrix", type=int, default=None,
              help="Scale only the N top-ranked intruders of each matrix (1: the paper's NeurIPS setting).")
@handle_errors
def patch(base, tuned, scale, detect_opts, out, fmt, max_shard_size, plan, allow_amplify, overwrite, per_matrix):
    """Rescale the intruder singular values of TUNED and write a patched checkpoint to --out.

    W' = W_tuned + sum over intruders of (λ - 1) σ u vᵀ, from the SVD of W_tuned.
    """
    from repair.edit.patcher import PatchOptions
    from repair.edit.patcher import patch as run_patch
    from repair.io.writer import parse_size

    opts = PatchOptions(
        out=out, scale=scale, format=fmt, max_shard_size=parse_size(max_shard_size), plan=plan,
        allow_amplify=allow_amplify, overwrite=overwrite, detect=detect_opts, per_matrix=per_matrix,
    )
    report = run_patch(base, tuned, opts)
    click.echo(f"Patched {report.patched_matrices} of {report.examined_matrices} matrices "
               f"({report.total_intruders} intruders); wrote {out} ({opts.format}).")
    for e in report.matrices[:10]:
        extra = f", peft would lose {e.peft_truncation_error:.2%}" if e.peft_truncation_error else ""
        old, new = (", ".join(f"{x:.3g}" for x in sig) for sig in (e.sigma_old, e.sigma_new))
        click.echo(f"  {e.name}: σ [{old}] -> [{new}]{extra}")
    click.echo(f"Report: {out / 'repair_report.json'}")


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--scales", default="0,0.25,0.5,0.75,1", show_default=True, callback=parse_scales,
              help="Comma-separated λ values.")
@task_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--pick", default=None,
              help="Choose λ: max-acc-drop=X bounds the mean accuracy drop, max-acc-drop=X:TASK one task's.")
@click.option("--write-picked", is_flag=True,
              help="Also write the checkpoint at the picked λ to DIR/picked: the weights the sweep measured.")
@click.option("--format", "fmt", default="merged", show_default=True, type=click.Choice(["merged", "adapter"]),
              help="--write-picked: a merged checkpoint, or a PEFT LoRA adapter (TUNED a LoRA adapter; λ=1: "
                   "TUNED's own, copied).")
@click.option("--overwrite", is_flag=True, help="Let --write-picked replace a non-empty DIR/picked.")
@click.option("--control", default="matched", show_default=True, type=click.Choice(["matched", "neighbour", "none"]),
              help="Also scale, at each λ, control directions instead of the intruders: the non-intruder of "
                   "closest σ removing the same Frobenius mass (matched), or the next in rank (neighbour).")
@click.option("--per-matrix", type=int, default=None,
              help="Scale only the N top-ranked intruders of each matrix (1: the paper's NeurIPS setting).")
@batch_size_option()
@click.option("--allow-amplify", is_flag=True, help="Allow λ outside [0, 1].")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="dtype of the evaluated model.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread the model over the devices with accelerate (chosen by itself when it does not fit "
                   "--device).")
@eval_options
@detect_options
@handle_errors
def sweep(base, tuned, scales, tasks, forgetting, out, limit, pick, write_picked, fmt, overwrite, control, per_matrix,
          batch_size, allow_amplify, dtype, device_map, detect_opts, eval_settings):
    """Measure task accuracy against forgetting for each λ (one SVD pass, weights patched in place).

    Exit 1 when --pick finds no λ within its bound (the points are written all the same)."""
    from evals.measure.results import control_verdict, markdown_table
    from evals.runners.sweeper import SweepOptions, check_sweep, run_sweep
    from repair.cli.terminal import library_output_to, quietly, start_log, verbosity

    opts = SweepOptions(out=out, scales=scales, tasks=tasks, forgetting=forgetting, limit=limit, pick=pick,
                        write_picked=write_picked, overwrite=overwrite, control=control, per_matrix=per_matrix,
                        batch_size=batch_size, allow_amplify=allow_amplify, detect=detect_opts, dtype=dtype,
                        device_map=device_map, eval=eval_settings, format=fmt)
    _, early = quietly(verbosity(), check_sweep, base, tuned, opts)  # exit 2 before anything is written
    start_log(out / "run.log", early)
    with library_output_to(out / "run.log", verbosity()):
        report = run_sweep(base, tuned, opts)
    click.echo(markdown_table(report))
    if (verdict := control_verdict(report)) is not None:
        click.echo("\n" + verdict)
    click.echo(f"\nWrote {out / 'sweep.json'}, sweep.csv, tradeoff.png; lm-eval's files in {out / 'lm-eval'}, "
               f"other libraries' output in {out / 'run.log'}")
    if report.pick is not None and report.pick.scale is None:
        click.echo(f"\nNo λ picked ({report.pick.rule}): {report.pick.reason}.", err=True)
        sys.exit(1)
    if report.pick is not None:
        click.echo(f"\nPicked λ={report.pick.scale:g} ({report.pick.rule}): accuracy drop "
                   f"{report.pick.accuracy_drop:+.4f}" + (f", checkpoint {report.pick.checkpoint}"
                                                          if report.pick.checkpoint else ""))


@main.command()
@click.argument("base")
@click.argument("tuned")
@task_options
@click.option("--max-acc-drop", required=True, type=float,
              help="Accuracy budget: the released λ has the least forgetting whose drop (mean over the tasks) "
                   "stays within X, e.g. 0.01.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The folder to publish (written whole at the end).")
@click.option("--scales", default="0,0.25,0.5,0.75,1", show_default=True, callback=parse_scales,
              help="λ values to measure (λ=1, TUNED unchanged, is always measured).")
@click.option("--format", "fmt", default=None, type=click.Choice(["adapter", "merged"]),
              help="adapter (default where TUNED is a LoRA adapter: rank r + |intruders|, exact) or merged.")
@click.option("--fail-above", type=int, default=None,
              help="Gate: exit 1 when more than N intruders are left in the released weights.")
@click.option("--control", default="none", show_default=True, type=click.Choice(["none", "matched", "neighbour"]),
              help="Also measure the control edit (see `repair sweep`) as evidence.")
@click.option("--per-matrix", type=int, default=None, help="Scale only the N top-ranked intruders of each matrix.")
@click.option("--fit", "fitted", is_flag=True,
              help="Release the repair of `repair fit` (one λ per direction, fitted on calibration data) instead of "
                   "one λ over the intruders, swept.")
@click.option("--directions", default="delta", show_default=True, type=click.Choice(["intruders", "delta"]),
              help="With --fit: fit every ΔW direction's λ, or only the intruders'.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --fit: task examples to fit on, a jsonl of {prompt, completion} (default: the tasks' "
                   "training split).")
@batch_size_option()
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="dtype of the evaluated model.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]), help="Spread the model with accelerate.")
@click.option("--allow-amplify", is_flag=True, help="Allow λ outside [0, 1].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@eval_options
@detect_options
@handle_errors
def release(base, tuned, tasks, forgetting, limit, max_acc_drop, out, scales, fmt, fail_above, control, per_matrix,
            fitted, directions, calibration, batch_size, dtype, device_map, allow_amplify, overwrite, eval_settings, detect_opts):
    """Make TUNED ready to publish: detect, sweep λ (or fit λ_i, --fit), pick within --max-acc-drop, and
    write --out (the adapter, its model card README.md, report.html, release.json, logs/).

    Exit 0: ready (patched, or unchanged when nothing needed it); 1: --fail-above failed, or the run failed after
    it began (measured points kept; the same command resumes); 2: bad input, before anything is loaded.
    """
    from evals.release.runner import ReleaseOptions
    from repair.cli.release import release_and_report

    opts = ReleaseOptions(
        out=out, tasks=tasks, max_acc_drop=max_acc_drop, scales=scales, forgetting=forgetting, limit=limit,
        control=control, format=fmt, fail_above=fail_above, overwrite=overwrite, batch_size=batch_size, dtype=dtype,
        device_map=device_map, per_matrix=per_matrix, allow_amplify=allow_amplify, detect=detect_opts,
        eval=eval_settings, command=command_line(), method="fit" if fitted else "uniform",
        directions=directions, calibration=calibration)
    sys.exit(release_and_report(base, tuned, opts))


def command_line() -> str:
    """The command as the user typed it, tokens quoted for a shell, the hub token left out."""
    import shlex

    args, shown, skip = sys.argv[1:], [], False
    for a in args:
        if skip:
            shown.append("***")
            skip = False
            continue
        shown.append("--token=***" if a.startswith("--token=") else a)
        skip = a == "--token"
    return "repair " + " ".join(shlex.quote(a) for a in shown)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--tasks", required=True, multiple=True, callback=parse_task_list,
              help="lm-eval task names or local task YAML paths (repeatable, or a comma list).")
@click.option("--limit", type=int, default=None, help="Evaluate at most N examples per task.")
@click.option("--base", default=None, help="Base model for LoRA adapter folders (default: the adapter's own).")
@click.option("--forgetting", default=None, help="Also score forgetting on this corpus (see `repair sweep`).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write compare.json and compare.md.")
@batch_size_option()
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="dtype of the evaluated models.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread each model over the devices with accelerate (chosen by itself when it does not fit).")
@eval_options
@handle_errors
def compare(models, tasks, limit, base, forgetting, out, batch_size, device, dtype, device_map, eval_settings):
    """Side-by-side lm-eval table of MODELS (folders, hub ids, smollm2-135m, LoRA adapters, or a sweep folder:
    its base, tuned and picked checkpoints)."""
    from evals.measure.models import Placement
    from evals.runners.comparison import run_compare

    placement = Placement(device, dtype, device_map)
    placement.validate()
    report = run_compare(list(models), list(tasks), limit, base, forgetting, out, batch_size, placement, eval_settings)
    click.echo(report.markdown())


for _command in (fit, *RESEARCH_COMMANDS):  # fit; finetune, continual, figures, demo, cache (repair.cli.research)
    main.add_command(_command)


def run() -> None:
    """Console entry point: run the command, then exit without the interpreter's teardown.

    Tearing down torch (and peft, when a config had to be parsed) takes 0.5 to 1.5 s after the work is
    done and every file is closed; ``os._exit`` skips it once the output streams are flushed.
    """
    try:
        main()
        code = 0
    except SystemExit as e:  # click ends every command with sys.exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)

