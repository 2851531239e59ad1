"""``repair release`` and ``repair demo`` on the terminal: the checks, the quiet run, the summary and the exit code."""

from __future__ import annotations

import click


def release_and_report(base: str, tuned: str, opts) -> int:
    """Run the release (``evals.release.runner``) and print what it made; the exit code: 0 ready, 1 a gate failed."""
    from evals.release.runner import check_release, log_path, run_release
    from repair.cli.terminal import library_output_to, quietly, start_log, verbosity

    _, early = quietly(verbosity(), check_release, base, tuned, opts)  # exit 2 here: nothing loaded or written
    start_log(log_path(opts.out), early)
    with library_output_to(log_path(opts.out), verbosity()):
        report = run_release(base, tuned, opts)
    click.echo("\n" + summary(report, opts.out))
    return 0 if report.ready else 1


def summary(report, out) -> str:
    """What the release found, did and measured, and the folder it wrote."""
    from evals.release.card import evidence_table

    f = report.found
    weights = [n for n in report.files if n.endswith(".safetensors") or n in ("adapter_config.json", "config.json")]
    lines = [f"Release {report.verdict}: {report.reason}",
             f"Found {f.intruders} intruder dimensions (k={f.top_k}, ε={f.epsilon:g}) in {f.matrices_with_intruders} "
             f"of {f.matrices} matrices; edited {report.edited_directions} "
             + ("with fitted λ_i." if report.scale is None else f"at λ={report.scale:g}."), "",
             *evidence_table(report), "",
             f"Wrote {out}/: {report.format} ({', '.join(weights)}), README.md (model card), report.html, "
             "release.json, logs/"]
    if not report.ready:
        lines.append("Not ready: the gate failed (exit 1).")
    return "\n".join(lines)
