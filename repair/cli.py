"""The ``repair`` command line: each subcommand parses, validates and calls one library function.

Heavy modules (torch, transformers, peft) are imported inside commands so ``repair --help`` is instant.
"""

from __future__ import annotations

import functools
import logging
import os
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


_DETECT_PARAMS = ("top_k", "epsilon", "side", "modules", "allow_pickle", "no_cache", "threads", "device", "method",
                  "exact", "revision", "token")


def _method(method: str | None, exact: bool) -> str:
    if exact and method not in (None, "exact"):
        raise click.UsageError(f"--exact contradicts --method {method}; pass one of them.")
    return "exact" if exact else method or "auto"


def _detect_options(f):
    """The detector's options, shared by the commands that detect before they act.

    The command receives them as one ``detect_opts`` (a ``DetectOptions``).
    """
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from .detector import DetectOptions

        p = {name: kwargs.pop(name) for name in _DETECT_PARAMS}
        kwargs["detect_opts"] = DetectOptions(
            top_k=p["top_k"], epsilon=p["epsilon"], side=p["side"], modules=p["modules"],
            allow_pickle=p["allow_pickle"], cache=not p["no_cache"], threads=p["threads"], device=p["device"],
            method=_method(p["method"], p["exact"]), revision=p["revision"], token=p["token"])
        return f(*args, **kwargs)

    for opt in reversed([
        click.option("--top-k", default=10, show_default=True, type=int, help="Tuned singular vectors to examine."),
        click.option("--epsilon", default=0.5, show_default=True, type=float, help="Cosine threshold in (0, 1]."),
        click.option("--side", default="left", show_default=True, type=click.Choice(["left", "right", "both"]),
                     help="Compare left, right, or both singular vectors."),
        click.option("--modules", default=None, help="Regex on base tensor names (default: all but embeddings/heads)."),
        click.option("--allow-pickle", is_flag=True, help="Also read *.bin/*.pt checkpoints (pickle can run code)."),
        click.option("--no-cache", is_flag=True, help="Neither read nor store base spectra (see `repair cache`)."),
        click.option("--threads", default=0, show_default=True, type=int,
                     help="Matrices processed side by side (0: one per core)."),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu or cuda."),
        click.option("--method", type=click.Choice(["auto", "certified", "exact"]), default=None,
                     help="certified: bounds from each base matrix's top singular triplets; exact: complete base "
                          "decompositions; auto (default): certified where the smaller side is >= 1024."),
        click.option("--exact", is_flag=True, help="Same as --method exact."),
        click.option("--revision", default=None,
                     help="Hub ids: the branch, tag or commit to fetch (ID@REV in a reference overrides it)."),
        click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True,
                     help="Hub token for private or gated repositories (never recorded in outputs)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


@main.command()
@click.argument("base")
@click.argument("tuned")
@_detect_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report.")
@click.option("--fail-above", type=int, default=None, help="Exit 1 when total intruders exceed N.")
@click.option("--worst", default=10, show_default=True, type=int, help="Matrices listed in the table.")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an editable patch plan for `repair patch --plan`.")
@click.option("--per-matrix", type=int, default=None,
              help="With --plan-out: plan only the N top-ranked intruders of each matrix (1: the paper's NeurIPS setting).")
@_handle_errors
def detect(base, tuned, detect_opts, json_path, fail_above, worst, plan_out, per_matrix):
    """Find intruder dimensions of TUNED (a LoRA adapter or a full checkpoint) against BASE.

    BASE and TUNED are local folders, hub ids, or an embedded model name (smollm2-135m).
    """
    from .detector import detect as run_detect
    from .report import render_table

    report = run_detect(base, tuned, detect_opts)
    click.echo(render_table(report, worst=worst))
    if json_path is not None:
        report.write_json(json_path)
        click.echo(f"\nReport written to {json_path}")
    if plan_out is not None:
        from .plan import Plan, check_per_matrix

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
@_detect_options
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
@_handle_errors
def patch(base, tuned, scale, detect_opts, out, fmt, max_shard_size, plan, allow_amplify, overwrite, per_matrix):
    """Rescale the intruder singular values of TUNED and write a patched checkpoint to --out.

    W' = W_tuned + sum over intruders of (λ - 1) σ u vᵀ, from the SVD of W_tuned.
    """
    from .patcher import PatchOptions
    from .patcher import patch as run_patch
    from .writer import parse_size

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


def _scales(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError as e:
        raise UsageFailure(f"--scales: expected comma-separated numbers such as 0,0.5,1, got {value!r}.") from e


def _batch_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError as e:
        raise UsageFailure(f"--batch-size: expected a positive integer or auto, got {value!r}.") from e


def _task_list(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable option whose values may also be comma lists."""
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())


def _eval_options(f):
    """lm-eval's evaluation flags, with lm-eval's meanings; the command receives them as ``eval_settings``."""
    names = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs", "seed", "log_samples")

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from evals.accuracy import EvalSettings

        kwargs["eval_settings"] = EvalSettings(**{n: kwargs.pop(n) for n in names})
        return f(*args, **kwargs)

    for opt in reversed([
        click.option("--num-fewshot", type=int, default=None, help="Few-shot examples per prompt (lm-eval's)."),
        click.option("--apply-chat-template", is_flag=True, help="Prompt through the tokenizer's chat template."),
        click.option("--fewshot-as-multiturn/--no-fewshot-as-multiturn", default=None,
                     help="Few-shot examples as chat turns (lm-eval's default: on with --apply-chat-template)."),
        click.option("--gen-kwargs", default=None, help="Generation arguments for generate_until tasks, e.g. "
                                                        "temperature=0,max_gen_toks=32."),
        click.option("--seed", type=int, default=None, help="lm-eval's random, numpy, torch and few-shot seeds."),
        click.option("--log-samples", is_flag=True, help="Also write lm-eval's per-sample records."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--scales", default="0,0.25,0.5,0.75,1", show_default=True, callback=_scales,
              help="Comma-separated λ values.")
@click.option("--task", "tasks", multiple=True, callback=_task_list,
              help="lm-eval task: a registered name or a local task YAML path (repeatable, or a comma list).")
@click.option("--forgetting", default="base-samples", show_default=True,
              help="Reference corpus: a .txt/.jsonl file, an lm-eval rolling task, or base-samples[:N].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--limit", type=int, default=None, help="Evaluate at most N task examples.")
@click.option("--pick", default=None,
              help="Choose λ: max-acc-drop=X bounds the mean accuracy drop, max-acc-drop=X:TASK one task's.")
@click.option("--write-picked", is_flag=True,
              help="Also write the merged checkpoint at the picked λ: the weights the sweep measured.")
@click.option("--overwrite", is_flag=True, help="Let --write-picked replace a non-empty DIR/picked.")
@click.option("--control", default="matched", show_default=True, type=click.Choice(["matched", "neighbour", "none"]),
              help="Also scale, at each λ, control directions instead of the intruders: the non-intruder of "
                   "closest σ removing the same Frobenius mass (matched), or the next in rank (neighbour).")
@click.option("--per-matrix", type=int, default=None,
              help="Scale only the N top-ranked intruders of each matrix (1: the paper's NeurIPS setting).")
@click.option("--batch-size", default="8", show_default=True, callback=_batch_size,
              help="Documents per forward pass, or auto (lm-eval's detection; forgetting then uses 8).")
@click.option("--allow-amplify", is_flag=True, help="Allow λ outside [0, 1].")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="dtype of the evaluated model.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread the model over the devices with accelerate (chosen by itself when it does not fit "
                   "--device).")
@_eval_options
@_detect_options
@_handle_errors
def sweep(base, tuned, scales, tasks, forgetting, out, limit, pick, write_picked, overwrite, control, per_matrix,
          batch_size, allow_amplify, dtype, device_map, detect_opts, eval_settings):
    """Measure task accuracy against forgetting for each λ (one SVD pass, weights patched in place)."""
    from evals.results import control_verdict, markdown_table
    from evals.sweeper import SweepOptions, run_sweep

    opts = SweepOptions(out=out, scales=scales, tasks=tasks, forgetting=forgetting, limit=limit, pick=pick,
                        write_picked=write_picked, overwrite=overwrite, control=control, per_matrix=per_matrix,
                        batch_size=batch_size, allow_amplify=allow_amplify, detect=detect_opts, dtype=dtype,
                        device_map=device_map, eval=eval_settings)
    report = run_sweep(base, tuned, opts)
    click.echo(markdown_table(report))
    if (verdict := control_verdict(report)) is not None:
        click.echo("\n" + verdict)
    if report.pick is not None:
        click.echo(f"\nPicked λ={report.pick.scale:g} ({report.pick.rule}): accuracy drop "
                   f"{report.pick.accuracy_drop:+.4f}" + (f", checkpoint {report.pick.checkpoint}"
                                                          if report.pick.checkpoint else ""))
    click.echo(f"\nWrote {out / 'sweep.json'}, sweep.csv and tradeoff.png")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--tasks", required=True, multiple=True, callback=_task_list,
              help="lm-eval task names or local task YAML paths (repeatable, or a comma list).")
@click.option("--limit", type=int, default=None, help="Evaluate at most N examples per task.")
@click.option("--base", default=None, help="Base model for LoRA adapter folders (default: the adapter's own).")
@click.option("--forgetting", default=None, help="Also score forgetting on this corpus (see `repair sweep`).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write compare.json and compare.md.")
@click.option("--batch-size", default="8", show_default=True, callback=_batch_size,
              help="Documents per forward pass, or auto (lm-eval's detection; forgetting then uses 8).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="dtype of the evaluated models.")
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread each model over the devices with accelerate (chosen by itself when it does not fit).")
@_eval_options
@_handle_errors
def compare(models, tasks, limit, base, forgetting, out, batch_size, device, dtype, device_map, eval_settings):
    """Side-by-side lm-eval table of MODELS (folders, hub ids, smollm2-135m, LoRA adapters, or a sweep folder:
    its base, tuned and picked checkpoints)."""
    from evals.comparison import run_compare
    from evals.models import Placement

    placement = Placement(device, dtype, device_map)
    placement.validate()
    report = run_compare(list(models), list(tasks), limit, base, forgetting, out, batch_size, placement, eval_settings)
    click.echo(report.markdown())


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field before validation, e.g. --set lora.r=4 --set lora.alpha=2r (repeatable).")
@_handle_errors
def finetune(recipe, out, overwrite, overrides):
    """Fine-tune (LoRA or full) as RECIPE.yaml says; see recipes/."""
    from .finetune import finetune as run_finetune
    from .recipe import load_recipe

    final = run_finetune(load_recipe(recipe, overrides), out, overwrite)
    made = [f"checkpoints in {out / 'checkpoints'}", f"log in {out / 'training_log.json'}"]
    if (out / "intruders.json").is_file():
        made.append(f"intruders over training in {out / 'intruders.json'}")
    click.echo(f"Wrote {final} ({', '.join(made)})")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--limit", type=int, default=None, help="Evaluate at most N examples per task.")
@click.option("--forgetting", default="base-samples:64", show_default=True,
              help="Forgetting corpus (see `repair sweep`): base-samples:N, a text file, or a dataset.")
@click.option("--batch-size", default="8", show_default=True, callback=_batch_size,
              help="Documents per forward pass and lm-eval's batch size (an integer, or auto).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field before validation, e.g. --set repair.scale=0 (repeatable).")
@_eval_options
@_detect_options
@_handle_errors
def continual(recipe, out, limit, forgetting, batch_size, overwrite, overrides, eval_settings, detect_opts):
    """Continual learning as RECIPE.yaml's stages say: train each stage on the model so far (LoRA: a fresh
    adapter, merged), optionally repair, and measure intruders against the base, accuracy on every task seen
    and forgetting after each stage (continual.json, continual.md, DIR/stage-N/)."""
    from evals.continual import markdown_table, run_continual

    from .recipe import load_recipe

    if limit is not None and limit < 1:
        raise click.BadParameter(f"expected a positive integer, got {limit}.", param_hint="--limit")
    loaded = load_recipe(recipe, overrides)
    report = run_continual(loaded, out, limit=limit, forgetting_spec=forgetting, batch_size=batch_size,
                           opts=detect_opts, overwrite=overwrite, settings=eval_settings)
    click.echo(markdown_table([(loaded.name, report)]))


@main.command()
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
@_detect_options
@_handle_errors
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
        from evals.across import figures_with_forgetting
        from evals.models import Placement

        report = figures_with_forgetting(base, tuned, out, forgetting_spec, detect_opts.top_k, k_max, detect_opts,
                                         Placement(detect_opts.device), batch_size, names)
    else:
        from .figures import make_figures

        report = make_figures(base, list(tuned), out, detect_opts.top_k, k_max, detect_opts, checkpoints, history,
                              names)
    for f in report.files:
        click.echo(f"wrote {f}")
    if report.spearman is not None:
        click.echo(f"intruders against forgetting: Spearman rho {report.spearman.rho:.3f} "
                   f"(p = {report.spearman.p_value:.2g}, n = {report.spearman.n})")
    click.echo(f"wrote {out / 'figures.json'}")


@main.command()
@click.option("--out", default="intruder-repair-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder (reruns reuse it).")
@click.option("--retrain", is_flag=True, help="Rebuild the demo adapter from its recipe first (about 5 min).")
@click.option("--limit", default=200, show_default=True, type=int, help="Task examples per evaluation.")
@_handle_errors
def demo(out, retrain, limit):
    """Detect, sweep and patch the bundled LoRA adapter of the embedded default model (SmolLM2-135M)."""
    import os

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the demo's data is all local: never wait on a hub
        os.environ.setdefault(var, "1")
    from evals.results import markdown_table

    from .demo import run_demo
    from .report import render_table

    result = run_demo(out, retrain, limit)
    click.echo(render_table(result.detection, worst=5))
    click.echo("\n" + markdown_table(result.sweep) + "\n")
    click.echo(f"Detection report: {out / 'detect.json'}")
    click.echo(f"Sweep: {out / 'sweep' / 'sweep.json'} and {out / 'sweep' / 'tradeoff.png'}")
    click.echo(f"Figures: {out / 'figures'}")
    click.echo("\n" + result.verdict())


@main.group()
def cache() -> None:
    """Manage the cache: base spectra, resolved adapter configs, file hashes, converted models."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@_handle_errors
def cache_ls(as_json):
    """Show what the cache holds and how much space each part takes."""
    from .cache import cache_report

    report = cache_report()
    click.echo(report.model_dump_json(indent=2) if as_json else report.render())


@cache.command("clear")
@click.option("--models", "with_models", is_flag=True, help="Also delete converted embedded models.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_handle_errors
def cache_clear(with_models, yes):
    """Delete computed entries (spectra, adapter settings, file hashes); models only with --models."""
    from .cache import cache_report, clear_cache

    report = cache_report()
    if not yes:
        click.confirm(f"Delete {report.describe(with_models)} from {report.folder}?", abort=True)
    freed = clear_cache(with_models)
    click.echo(f"Freed {freed / 2**20:.1f} MiB in {report.folder}.")


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


if __name__ == "__main__":
    run()
