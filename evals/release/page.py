"""``report.html``: one self-contained page (inline style, figures as data URIs, no script, nothing fetched)."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from evals.release.card import table_cells, what_was_done
from evals.release.model import ReleaseReport
from repair.detection.report import DetectionReport

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d2430}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d8dee8}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d8dee8;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f5f8}
.verdict{padding:.8rem 1rem;border-radius:6px;font-weight:600}
.patched,.unchanged{background:#e6f4ea;color:#14532d}.gate-failed{background:#fde8e8;color:#7f1d1d}
figure{margin:1rem 0}img{max-width:100%;border:1px solid #d8dee8}code{background:#f3f5f8;padding:0 .2rem}
.small{color:#5b6678;font-size:.85rem}
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(png: Path | None, caption: str) -> str:
    if png is None or not png.is_file():
        return ""
    return (f'<figure><img alt="{escape(caption)}" src="{data_uri(png)}">'
            f"<figcaption class=small>{escape(caption)}</figcaption></figure>")


def render(report: ReleaseReport, detection: DetectionReport, tradeoff: Path | None, similarity: Path | None,
           worst: int = 8) -> str:
    """The whole page as a string."""
    tasks = report.tasks
    types = [[t, str(s.matrices), str(s.matrices_with_intruders), str(s.intruders)]
             for t, s in sorted(detection.by_module_type.items())]
    flagged = [m for m in detection.worst(worst) if m.intruders]
    worst_rows = [[m.name, str(len(m.intruders)), ", ".join(f"{m.sigma[i]:.3g}" for i in m.intruders),
                   f"{min(m.max_cos[i] for i in m.intruders):.3f}"] for m in flagged]
    evidence_head = ["model", "λ", *tasks, "forgetting NLL", "forgetting removed", "intruders left"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Release report: {escape(report.tuned)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Release report</h1><p class=small>{escape(report.tuned)} on {escape(report.base)}; "
        f"intruder-repair {escape(report.tool_version)}, {escape(report.created)}</p>",
        f'<p class="verdict {escape(report.verdict)}">{escape(report.verdict)}: {escape(report.reason)}</p>',
        f"<p>{escape(what_was_done(report))}</p>",
        "<h2>Evidence</h2>", _table(evidence_head, [table_cells(r, tasks) for r in report.rows]),
        f"<p class=small>Accuracy: lm-eval{'' if report.limit is None else f', {report.limit} examples per task'}. "
        f"Forgetting: NLL per token on {report.corpus_documents} documents of {escape(report.forgetting)}.</p>",
        _figure(tradeoff, "Accuracy against forgetting for each λ of the sweep"),
        f"<h2>Detection</h2><p>{report.found.intruders} intruder dimensions (top k={report.found.top_k}, "
        f"ε={report.found.epsilon:g}) in {report.found.matrices_with_intruders} of {report.found.matrices} "
        "matrices.</p>",
        _table(["module type", "matrices", "with intruders", "intruders"], types),
        "<h3>Worst matrices</h3>" + _table(["matrix", "intruders", "σ", "least max|cos|"], worst_rows)
        if worst_rows else "",
        _figure(similarity, "|cos| between the top singular vectors of the worst matrix, tuned against base "
                            "(red: intruders)"),
        f"<h2>Command</h2><p><code>{escape(report.command)}</code></p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
