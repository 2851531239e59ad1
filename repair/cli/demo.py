"""``repair demo``: the release path (``repair release``) on the embedded default and the bundled demo adapter.

What it measures is sized for a 2-core CPU (``bench/bench_demo.py``): three λ, 100 test examples of the
``addition`` task, 64 documents of the base model's own samples for forgetting.
"""

from __future__ import annotations

from pathlib import Path

BASE = "smollm2-135m"
SCALES = (0.0, 0.5, 1.0)
TASK = "addition"
MAX_ACC_DROP = 0.02
LIMIT = 100


def demo_options(out: Path, limit: int = LIMIT, command: str = "repair demo"):
    """The release the demo makes (``out`` is replaced: the demo measures every time)."""
    from evals.release.runner import ReleaseOptions

    return ReleaseOptions(out=out, tasks=(TASK,), max_acc_drop=MAX_ACC_DROP, scales=SCALES, limit=limit,
                          overwrite=True, command=command)


def demo_adapter(out: Path, retrain: bool) -> Path:
    """The bundled adapter, or one retrained from its recipe into ``out``'s work folder."""
    from repair.io.sources import demo_dir

    return _retrain(out.parent / f".{out.name}.retrained") if retrain else demo_dir()


def _retrain(out: Path) -> Path:
    from repair.io.sources import demo_dir
    from repair.train.finetune import finetune
    from repair.train.recipe import load_recipe

    return finetune(load_recipe(demo_dir() / "recipe.yaml"), out / "retrained", overwrite=True)
