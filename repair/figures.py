"""``repair figures``: the paper's diagnostics for any base/tuned pair, drawn with matplotlib.

- similarity matrix of the top-k singular vectors (Fig. 1/3) for the matrix with most intruders;
- intruder count against ε (Fig. 5) and against k (Fig. 11);
- effective rank of ΔW per layer and module type (Fig. 6);
- over a folder of training checkpoints: the intruders' rank and σ against the step (Fig. 7).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .archs import module_type
from .detector import DetectOptions, analyse, analyse_pairs
from .errors import RepairError
from .pairs import PairSource
from .sources import resolve

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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def plot_similarity(m: MatrixStats, epsilon: float, path: Path) -> Path:
    plt = _plt()
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
    return _save(fig, path)


def plot_counts(stats: list[MatrixStats], k: int, epsilon: float, out: Path) -> list[Path]:
    plt = _plt()
    k_max = stats[0].max_cos.shape[0]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(EPSILONS, [sum(int((m.max_cos[:k] < e).sum()) for m in stats) for e in EPSILONS], "o-")
    ax.set_xlabel("ε (cosine similarity threshold)")
    ax.set_ylabel(f"intruders in top {k} (all matrices)")
    ax.grid(alpha=0.3)
    a = _save(fig, out / "intruders_vs_epsilon.png")
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ks = list(range(1, k_max + 1))
    ax.plot(ks, [sum(int((m.max_cos[:kk] < epsilon).sum()) for m in stats) for kk in ks], "-")
    ax.set_xlabel("k (top singular vectors examined)")
    ax.set_ylabel(f"intruders at ε={epsilon}")
    ax.grid(alpha=0.3)
    return [a, _save(fig, out / "intruders_vs_k.png")]


def plot_effective_rank(stats: list[MatrixStats], path: Path) -> Path:
    plt = _plt()
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
    return _save(fig, path)


def _step(folder: Path) -> int:
    m = re.search(r"(\d+)$", folder.name)
    return int(m[1]) if m else -1


TrainingRow = tuple[int, list[int], list[float]]  # step, intruder ranks, their σ


def checkpoint_rows(base: str, checkpoints: Path, matrix: str, k: int, opts: DetectOptions) -> list[TrainingRow]:
    """Fig. 7's data from saved step folders: one detection per checkpoint."""
    folders = sorted((p for p in checkpoints.iterdir() if p.is_dir() and _step(p) >= 0), key=_step)
    if not folders:
        raise RepairError(f"--checkpoints {checkpoints}: no step folders (e.g. step-000100) inside.")
    rows, spectra = [], opts.spectra()  # one base spectrum for every step
    for f in tqdm(folders, desc="checkpoints", unit="step", disable=None):
        src = PairSource(resolve(base), resolve(str(f)), f"^{re.escape(matrix)}$", opts.allow_pickle, spectra)
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
        raise RepairError(f"--history {history}: expected an intruders.json from repair finetune ({e}).") from e
    rows = [(step, m["intruders"], m["sigma"]) for step, m in steps if m is not None]
    if not rows:
        raise RepairError(f"--history {history}: has no record of {matrix}.")
    return rows, k


def plot_training(rows: list[TrainingRow], matrix: str, k: int, path: Path) -> Path:
    """Fig. 7: for one matrix, the rank and σ of its intruders at each measured step."""
    plt = _plt()
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
    return _save(fig, path)


def make_figures(base: str, tuned: str, out: Path, k: int = 10, k_max: int = 50, opts: DetectOptions | None = None,
                 checkpoints: Path | None = None, history: Path | None = None) -> list[Path]:
    """Draw every diagnostic into ``out``; returns the files written.

    Fig. 7 comes from ``history`` (the monitor's record, no detection) or from ``checkpoints`` (one per step).
    """
    opts = opts or DetectOptions(top_k=k)
    opts.validate()
    out.mkdir(parents=True, exist_ok=True)
    stats = collect(base, tuned, k, max(k, k_max), opts)
    worst = min(stats, key=lambda m: (-int((m.max_cos[:k] < opts.epsilon).sum()), float(m.max_cos[:k].min())))
    files = [plot_similarity(worst, opts.epsilon, out / "similarity.png"),
             *plot_counts(stats, k, opts.epsilon, out), plot_effective_rank(stats, out / "effective_rank.png")]
    if history is not None:
        rows, k_hist = history_rows(history, worst.name)
        files.append(plot_training(rows, worst.name, k_hist, out / "training_intruders.png"))
    elif checkpoints is not None:
        rows = checkpoint_rows(base, checkpoints, worst.name, k, opts)
        files.append(plot_training(rows, worst.name, k, out / "training_intruders.png"))
    return files
