"""``repair demo``: the main job end to end on the embedded default and the bundled demo adapter.

detect -> sweep λ (accuracy vs forgetting, lm-eval) -> patched checkpoint at the picked λ -> figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from repair.detection.detector import DetectOptions, detect
from repair.detection.report import DetectionReport, render_table
from repair.io.sources import demo_dir

logger = logging.getLogger(__name__)

BASE = "smollm2-135m"
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
TASK = "addition"
CHAT_COLUMN = "addition (chat template)"  # the same task, prompted through the chat template
PICK = f"max-acc-drop=0.05:{TASK}"


@dataclass
class DemoResult:
    detection: DetectionReport
    sweep: object  # evals.measure.results.SweepReport
    figures: list[Path]
    adapter: Path

    def verdict(self) -> str:
        s, pick = self.sweep, self.sweep.pick
        gap = s.tuned.forgetting_nll - s.base.forgetting_nll
        acc = {p.label: p.scores[TASK].value for p in (s.base, s.tuned)}
        line1 = (f"The LoRA adapter has {self.detection.total_intruders} intruder dimensions (k={self.detection.top_k}, "
                 f"ε={self.detection.epsilon}); it lifts '{TASK}' accuracy from {acc['base']:.1%} to "
                 f"{acc['tuned']:.1%} and raises forgetting NLL by {gap:+.3f}.")
        rec = "n/a" if pick.forgetting_recovered is None else f"{pick.forgetting_recovered:.0%}"
        line2 = (f"Scaling them to λ={pick.scale:g} recovers {rec} of that forgetting for an accuracy drop of "
                 f"{pick.accuracy_drop:.1%} ({pick.rule}); patched checkpoint: {pick.checkpoint}.")
        chat = {p.label: p.scores[CHAT_COLUMN].value for p in [s.base, s.tuned, *s.points]}
        line3 = (f"Prompted through the model's chat template instead, '{TASK}' accuracy is {chat['base']:.1%} (base), "
                 f"{chat['tuned']:.1%} (tuned) and {chat[f'scale={pick.scale:g}']:.1%} at λ={pick.scale:g}.")
        return "\n".join([line1, line2, line3])


def run_demo(out: Path, retrain: bool = False, limit: int | None = 200) -> DemoResult:
    """Run the demo into ``out`` (finished sweep points are reused on a rerun)."""
    from evals.measure.accuracy import EvalSettings, TaskColumn
    from evals.runners.sweeper import SweepOptions, run_sweep
    from repair.figures.curves import make_figures

    out.mkdir(parents=True, exist_ok=True)
    adapter = _retrain(out) if retrain else demo_dir()
    adapter_ref = str(adapter)
    detection = detect(BASE, adapter_ref, DetectOptions())
    detection.write_json(out / "detect.json")
    (out / "detect.txt").write_text(render_table(detection) + "\n")
    sweep = run_sweep(BASE, adapter_ref, SweepOptions(
        out=out / "sweep", scales=SCALES, tasks=(TASK,), forgetting="base-samples", limit=limit, pick=PICK,
        write_picked=True, overwrite=True, control="none",  # the controls: recipes/README.md
        extra_columns=(TaskColumn(TASK, EvalSettings(apply_chat_template=True), label=CHAT_COLUMN),)))
    history = adapter.parent / "intruders.json" if retrain else None  # the monitor's record of the retraining
    figures = make_figures(BASE, adapter_ref, out / "figures", k_max=30, history=history)
    return DemoResult(detection, sweep, [Path(f) for f in figures.files], adapter)


def _retrain(out: Path) -> Path:
    from repair.train.finetune import finetune
    from repair.train.recipe import load_recipe

    return finetune(load_recipe(demo_dir() / "recipe.yaml"), out / "retrained", overwrite=True)
