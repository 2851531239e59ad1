"""``repair figures``: the paper's diagnostics for any base/tuned pair, drawn with matplotlib.

- similarity matrix of the top-k singular vectors (Fig. 1/3) for the matrix with most intruders;
- intruder count against ε (Fig. 5) and against k (Fig. 11), one curve per fine-tune when several
  of one base are given;
- effective rank of ΔW per layer and module type (Fig. 6);
- over a folder of training checkpoints: the intruders' rank and σ against the step (Fig. 7).

The curves' numbers go to ``figures.json`` (``FiguresReport``) beside the images.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from repair import __version__
from repair.adapters.pairs import PairSource
from repair.detection.detector import DetectOptions, analyse, analyse_pairs
from repair.detection.report import SCHEMA_VERSION
from repair.errors import RepairError
from repair.figures.render import data_digest, draw_once, pyplot, save_figure
from repair.io.archs import module_type
from repair.io.sources import resolve
from repair.runtime.durable import write_text_atomic

logger = logging.getLogger(__name__)
EPSILONS = [round(0.1 * i, 1) for i in range(1, 10)]
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class MatrixStats:
    name: str
    max_cos: torch.Tensor  # (k_max,) decisive |cos| of the top k_max tuned vectors
    sigma: torch.Tensor  # (k_max,)
    similarity: torch.Tensor  # (k, k) |cos| of top-k tuned (columns) vs top-k base (rows) left vectors
    erank: float


class AdapterCurves(BaseModel):
    """One fine-tune's intruder counts, summed over every analysed matrix (Fig. 5 and Fig. 11)."""

    label: str = Field(description="the fine-tune's name in the figures (its folder name, made unique)")
    tuned: str
    top_k: int
    epsilon: float = Field(description="the ε of the k curve and of `intruders`")
    epsilons: list[float]
    by_epsilon: list[int] = Field(description="intruders among the top `top_k` at each of `epsilons`")
    by_k: list[int] = Field(description="intruders at `epsilon` among the top k, for k = 1, 2, ...")
    intruders: int = Field(description="intruders at (`epsilon`, `top_k`), as `repair detect` counts them")
    effective_rank: float | None = Field(None, description="effective rank of ΔW, the mean over the matrices (Fig. 6)")
    effective_rank_by_type: dict[str, float] = Field(default_factory=dict,
                                                     description="that mean per module type")
    forgetting_nll: float | None = None
    forgetting_stderr: float | None = None


class Spearman(BaseModel):
    rho: float
    p_value: float
    n: int


class FiguresReport(BaseModel):
    schema_version: str = SCHEMA_VERSION
    tool_version: str = __version__
    base: str
    adapters: list[AdapterCurves]
    forgetting: str | None = Field(None, description="the forgetting corpus, when forgetting was measured")
    spearman: Spearman | None = Field(None, description="intruders against forgetting NLL, over the adapters")
    files: list[str] = Field(default_factory=list)

    def write(self, out: Path) -> None:
        write_text_atomic(out / "figures.json", json.dumps(self.model_dump(), indent=2) + "\n")


def collect(base: str, tuned: str, k: int, k_max: int, opts: DetectOptions) -> list[MatrixStats]:
    """One pass: everything the figures need for every selected matrix.

    The counts are exact: every top-k vector is decided at each ε of the ε curve, and every top
    k_max vector at ε for the k curve (the certified path refines, or solves exactly, what it must).
    """
    stats = []
    decisions = (*((e, k) for e in EPSILONS), (opts.epsilon, k_max))
    for _, report, found in analyse(opts.pairs(base, tuned), opts, top_k=k_max, decisions=decisions):
        sim = found.tuned.cos_head("left", k)[:k].T  # (k base, k tuned)
        stats.append(MatrixStats(report.name, found.max_cos, found.tuned.S[:k_max], sim, report.effective_rank_delta))
    return stats


def plot_similarity(m: MatrixStats, epsilon: float, path: Path) -> Path:
    """The |cos| of the top-k singular vectors of one matrix, intruders marked (not redrawn from the same data)."""
    digest = data_digest("similarity", m.name, epsilon, m.similarity.numpy().tobytes(), m.max_cos.numpy().tobytes())
    return draw_once(path, digest, lambda: _similarity(m, epsilon))


def _similarity(m: MatrixStats, epsilon: float):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.5), dpi=120)
    im = ax.imshow(m.similarity.numpy(), cmap="viridis", vmin=0, vmax=1, origin="lower")
    k = m.similarity.shape[0]
    for j in range(k):
        if m.max_cos[j] < epsilon:
            ax.axvline(j, color="red", lw=0.8, ls="--")
    ax.set_xlabel("fine-tuned singular vector (rank)")
    ax.set_ylabel("pre-trained singular vector (rank)")
    ax.set_title(f"{m.name}\n|cos| of top-{k} singular vectors (red: intruders)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def curves(stats: list[MatrixStats], label: str, tuned: str, k: int, epsilon: float) -> AdapterCurves:
    """The ε curve at k and the k curve at ε, from the decisive |cos| of every matrix."""
    k_max = max(k, max((m.max_cos.shape[0] for m in stats), default=k))
    by_eps = [sum(int((m.max_cos[:k] < e).sum()) for m in stats) for e in EPSILONS]
    by_k = [sum(int((m.max_cos[:kk] < epsilon).sum()) for m in stats) for kk in range(1, k_max + 1)]
    by_type: dict[str, list[float]] = {}
    for m in stats:
        by_type.setdefault(module_type(m.name), []).append(m.erank)
    return AdapterCurves(label=label, tuned=tuned, top_k=k, epsilon=epsilon, epsilons=EPSILONS, by_epsilon=by_eps,
                         by_k=by_k, intruders=by_k[k - 1],
                         effective_rank=sum(m.erank for m in stats) / len(stats) if stats else None,
                         effective_rank_by_type={t: sum(v) / len(v) for t, v in sorted(by_type.items())})


def plot_counts(adapters: list[AdapterCurves], out: Path) -> list[Path]:
    """Fig. 5 (intruders against ε) and Fig. 11 (against k): one curve per fine-tune."""
    plt = pyplot()
    several = len(adapters) > 1
    a0 = adapters[0]
    styles = _styles(plt, len(adapters))
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for a, (color, dash) in zip(adapters, styles, strict=True):
        ax.plot(a.epsilons, a.by_epsilon, "o", ls=dash, color=color, ms=3, label=a.label)
    ax.set_xlabel("ε (cosine similarity threshold)")
    ax.set_ylabel(f"intruders in top {a0.top_k} (all matrices)")
    ax.grid(alpha=0.3)
    if several:
        ax.legend(fontsize=7)
    a = save_figure(fig, out / "intruders_vs_epsilon.png")
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for c, (color, dash) in zip(adapters, styles, strict=True):
        ax.plot(range(1, len(c.by_k) + 1), c.by_k, ls=dash, color=color, label=c.label)
    ax.set_xlabel("k (top singular vectors examined)")
    ax.set_ylabel(f"intruders at ε={a0.epsilon}")
    ax.grid(alpha=0.3)
    if several:
        ax.legend(fontsize=7)
    return [a, save_figure(fig, out / "intruders_vs_k.png")]


def _styles(plt, n: int) -> list[tuple]:
    """A distinct (colour, dash) per curve: matplotlib's 10 colours, then tab20's with dashes alternating."""
    if n <= 10:
        return [(f"C{i}", "-") for i in range(n)]
    return [(plt.cm.tab20(i % 20), "-" if i % 2 == 0 else "--") for i in range(n)]


def plot_effective_rank(stats: list[MatrixStats], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    by_type: dict[str, list[tuple[int, float]]] = {}
    for m in stats:
        layer = _LAYER.search(m.name)
        by_type.setdefault(module_type(m.name), []).append((int(layer[1]) if layer else 0, m.erank))
    for t, pts in sorted(by_type.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=t)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank of ΔW")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _step(folder: Path) -> int:
    m = re.search(r"(\d+)$", folder.name)
    return int(m[1]) if m else -1


TrainingRow = tuple[int, list[int], list[float]]  # step, intruder ranks, their σ


def checkpoint_rows(base: str, checkpoints: Path, matrix: str, k: int, opts: DetectOptions) -> list[TrainingRow]:
    """Fig. 7's data from saved step folders: one detection per checkpoint."""
    folders = sorted((p for p in checkpoints.iterdir() if p.is_dir() and _step(p) >= 0), key=_step)
    if not folders:
        raise RepairError(f"checkpoints {checkpoints}: no step folders (e.g. step-000100) inside.")
    rows, spectra = [], opts.spectra()  # one base spectrum for every step
    for f in tqdm(folders, desc="checkpoints", unit="step", disable=None):
        src = PairSource(resolve(base, opts.hub()), resolve(str(f), opts.hub()), f"^{re.escape(matrix)}$",
                         opts.allow_pickle, spectra, opts.settings_dir())
        [(_, found)] = analyse_pairs(src, src.names, replace(opts, top_k=k))
        rows.append((_step(f), found.intruders, found.tuned.S[found.intruders].tolist()))
    return rows


def history_rows(history: Path, matrix: str) -> tuple[list[TrainingRow], int]:
    """Fig. 7's data from an ``IntruderMonitor`` history (``repair finetune``'s intruders.json), and its k."""
    try:
        doc = json.loads(history.read_text())
        steps = [(int(e["step"]), e["matrices"].get(matrix)) for e in doc["steps"]]
        k = int(doc["top_k"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RepairError(f"history {history}: expected an intruders.json from repair finetune ({e}).") from e
    rows = [(step, m["intruders"], m["sigma"]) for step, m in steps if m is not None]
    if not rows:
        raise RepairError(f"history {history}: has no record of {matrix}.")
    return rows, k


def plot_training(rows: list[TrainingRow], matrix: str, k: int, path: Path) -> Path:
    """Fig. 7: for one matrix, the rank and σ of its intruders at each measured step."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for step, ranks, sig in rows:
        left.scatter([step] * len(ranks), ranks, color="tab:red", s=14)
        right.scatter([step] * len(sig), sig, color="tab:red", s=14)
    left.set_ylim(k - 0.5, -0.5)
    left.set_ylabel(f"rank of intruder (top {k})")
    right.set_ylabel("σ of intruder")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(matrix, fontsize=8)
    return save_figure(fig, path)


def adapter_labels(refs: Sequence[str], given: Sequence[str] | None = None) -> list[str]:
    """The labels given, or each fine-tune's folder name; file-name safe, numbered where two would be the same."""
    if given is not None and len(given) != len(refs):
        raise RepairError(f"labels: expected {len(refs)} labels, one per TUNED, got {len(given)}.")
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", n) or "tuned" for n in
             (given if given is not None else [Path(r.rstrip("/")).name for r in refs])]
    return [n if names.count(n) == 1 else f"{i + 1}-{n}" for i, n in enumerate(names)]


def make_figures(base: str, tuned: str | Sequence[str], out: Path, k: int = 10, k_max: int = 50,
                 opts: DetectOptions | None = None, checkpoints: Path | None = None,
                 history: Path | None = None, labels: Sequence[str] | None = None) -> FiguresReport:
    """Draw every diagnostic into ``out`` and write ``figures.json``; returns its report.

    With several fine-tunes of ``base``, the ε and k curves hold one curve each, and each one's similarity
    and effective-rank figures go to ``out/<label>/`` (``labels``, else the folder names). Fig. 7 comes from ``history`` (the monitor's record,
    no detection) or from ``checkpoints`` (one per step), for a single fine-tune.
    """
    refs = [tuned] if isinstance(tuned, str) else list(tuned)
    if not refs:
        raise RepairError("repair figures: expected at least one TUNED model.")
    several = len(refs) > 1
    if several and (history is not None or checkpoints is not None):
        raise RepairError("history/checkpoints: Fig. 7 follows one fine-tune; pass a single TUNED with them.")
    opts = opts or DetectOptions(top_k=k)
    opts.validate()
    files, adapters = [], []
    for ref, label in zip(refs, adapter_labels(refs, labels), strict=True):
        folder = out / label if several else out
        folder.mkdir(parents=True, exist_ok=True)
        stats = collect(base, ref, k, max(k, k_max), opts)
        worst = min(stats, key=lambda m: (-int((m.max_cos[:k] < opts.epsilon).sum()), float(m.max_cos[:k].min())))
        files += [plot_similarity(worst, opts.epsilon, folder / "similarity.png"),
                  plot_effective_rank(stats, folder / "effective_rank.png")]
        if history is not None:
            rows, k_hist = history_rows(history, worst.name)
            files.append(plot_training(rows, worst.name, k_hist, out / "training_intruders.png"))
        elif checkpoints is not None:
            rows = checkpoint_rows(base, checkpoints, worst.name, k, opts)
            files.append(plot_training(rows, worst.name, k, out / "training_intruders.png"))
        adapters.append(curves(stats, label, ref, k, opts.epsilon))
    files += plot_counts(adapters, out)
    report = FiguresReport(base=base, adapters=adapters, files=[str(f) for f in files])
    report.write(out)
    return report
