"""Options and error handling shared by the ``repair`` subcommands (``repair.cli``, ``repair.cli.research``)."""

from __future__ import annotations

import errno
import functools
import re

import click


class UsageFailure(click.ClickException):
    """A library error as the user meets it: one sentence on stderr, the error's exit code (2: input, 3: output
    refused by the machine; see ``repair.errors``)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# What the machine says when it refuses a file operation: the runner's to fix, not the command (exit 3).
REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EFBIG,
                      errno.EMFILE, errno.ENFILE})


def handle_errors(fn):
    """Turn the library's ``RepairError`` into one clear sentence and its exit code, and so a refusal by the
    machine that reached no handler of the library (another library's cache or lock file on a full disk):
    exit 3, the file named. A traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from repair.errors import OutputError, RepairError

        try:
            return fn(*args, **kwargs)
        except RepairError as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise UsageFailure(in_flags(str(e), click.get_current_context().command), e.exit_code) from e
        except OSError as e:
            if e.errno not in REFUSALS or click.get_current_context().find_root().params.get("debug"):
                raise
            where = e.filename if e.filename is not None else "a file"
            raise UsageFailure(f"{where}: the machine refused the operation ({e.strerror or e}); free space or fix "
                               "the permissions there, then run the same command again.",
                               OutputError.exit_code) from e

    return wrapper


_LEADING_NAMES = re.compile(r"^([a-z][a-z0-9_]*(?:/[a-z][a-z0-9_]*)*)(?=[: ])")


def in_flags(message: str, command: click.Command) -> str:
    """The library names parameters (``top_k: ...``); on the command line they are the command's flags
    (``--top-k: ...``). The map is read from the command's own options, so it cannot drift from them."""
    flags: dict[str, str] = {}
    for p in command.params:  # the first spelling of each flag (--num-fewshot, not its alias --num_fewshot)
        for opt in p.opts:
            if opt.startswith("--"):
                flags.setdefault(opt[2:].replace("-", "_"), opt)
    m = _LEADING_NAMES.match(message)
    if not m or not all(name in flags for name in m.group(1).split("/")):
        return message
    return "/".join(flags[name] for name in m.group(1).split("/")) + message[m.end():]


DETECT_PARAMS = ("top_k", "epsilon", "side", "modules", "allow_pickle", "no_cache", "threads", "device", "method",
                  "exact", "revision", "token")


def method_of(method: str | None, exact: bool) -> str:
    if exact and method not in (None, "exact"):
        raise click.UsageError(f"--exact contradicts --method {method}; pass one of them.")
    return "exact" if exact else method or "auto"


def detect_options(f):
    """The detector's options, shared by the commands that detect before they act.

    The command receives them as one ``detect_opts`` (a ``DetectOptions``).
    """
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from repair.detection.detector import DetectOptions

        p = {name: kwargs.pop(name) for name in DETECT_PARAMS}
        kwargs["detect_opts"] = DetectOptions(
            top_k=p["top_k"], epsilon=p["epsilon"], side=p["side"], modules=p["modules"],
            allow_pickle=p["allow_pickle"], cache=not p["no_cache"], threads=p["threads"], device=p["device"],
            method=method_of(p["method"], p["exact"]), revision=p["revision"], token=p["token"])
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


def parse_scales(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError as e:
        flag = param.opts[0] if param is not None else "--scales"
        raise UsageFailure(f"{flag}: expected comma-separated numbers such as 0,0.5,1, got {value!r}.") from e


def parse_batch_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError as e:
        raise UsageFailure(f"--batch-size: expected a positive integer or auto, got {value!r}.") from e


def parse_task_list(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable option whose values may also be comma lists."""
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())


def eval_options(f):
    """lm-eval's evaluation flags, with lm-eval's meanings and also lm-eval's own spellings (``--num_fewshot``);
    the command receives them as ``eval_settings``."""
    names = ("num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs", "seed", "log_samples")

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from evals.measure.accuracy import EvalSettings

        kwargs["eval_settings"] = EvalSettings(**{n: kwargs.pop(n) for n in names})
        return f(*args, **kwargs)

    for opt in reversed([
        click.option("--num-fewshot", "--num_fewshot", "num_fewshot", type=int, default=None, help="Few-shot examples per prompt (lm-eval's)."),
        click.option("--apply-chat-template", "--apply_chat_template", "apply_chat_template", is_flag=True, help="Prompt through the tokenizer's chat template."),
        click.option("--fewshot-as-multiturn/--no-fewshot-as-multiturn", "--fewshot_as_multiturn", "fewshot_as_multiturn",
                     default=None,
                     help="Few-shot examples as chat turns (lm-eval's default: on with --apply-chat-template)."),
        click.option("--gen-kwargs", "--gen_kwargs", "gen_kwargs", default=None, help="Generation arguments for generate_until tasks, e.g. "
                                                        "temperature=0,max_gen_toks=32."),
        click.option("--seed", type=int, default=None, help="lm-eval's random, numpy, torch and few-shot seeds."),
        click.option("--log-samples", "--log_samples", "log_samples", is_flag=True, help="Also write lm-eval's per-sample records."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def batch_size_option(help_text: str = "Documents per forward pass, or auto (lm-eval's detection; forgetting then "
                                       "uses 8)."):
    return click.option("--batch-size", "--batch_size", "batch_size", default="8", show_default=True,
                        callback=parse_batch_size, help=help_text)


def task_options(f):
    """What a sweep measures: ``--task`` (also lm-eval's ``--tasks``), ``--forgetting``, ``--limit``."""
    for opt in reversed([
        click.option("--task", "--tasks", "tasks", multiple=True, callback=parse_task_list,
                     help="lm-eval task: a registered name or a local task YAML path (repeatable, or a comma list)."),
        click.option("--forgetting", default="base-samples", show_default=True,
                     help="Reference corpus: a .txt/.jsonl file, an lm-eval rolling task, or base-samples[:N]."),
        click.option("--limit", type=int, default=None, help="Evaluate at most N task examples."),
    ]):
        f = opt(f)
    return f
