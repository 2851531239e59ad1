"""``IntruderMonitor``: count intruders in the model being trained, through the Trainer's own logging.

Base spectra are computed once, at the start of training (or read from the spectra cache); every
``every`` steps and at the end the monitor runs the detector on the live adapter (``detect_model``)
and logs ``intruders/total`` and ``intruders/<module type>``. It keeps the rank and σ of every
intruder per step (``history``) for a Fig. 7 plot, and can stop training when the total exceeds a bound.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from transformers import TrainerCallback

from repair.detection.report import SCHEMA_VERSION, DetectionReport
from repair.errors import RepairError
from repair.runtime.durable import write_text_atomic

logger = logging.getLogger(__name__)


def metrics_of(report: DetectionReport) -> dict[str, float]:
    """What the monitor logs: the total and the count per module type."""
    out = {"intruders/total": float(report.total_intruders)}
    for kind, summary in sorted(report.by_module_type.items()):
        out[f"intruders/{kind}"] = float(summary.intruders)
    return out


class IntruderMonitor(TrainerCallback):
    """A ``transformers.TrainerCallback`` that counts intruders every ``every`` steps and at the end.

    ``trainer.add_callback(monitor)`` or ``Trainer(callbacks=[monitor])`` both work; ``attach(trainer)``
    also routes the counts through ``trainer.log``, so they reach TensorBoard, W&B or whatever
    ``report_to`` names. Without it they go to ``trainer.state.log_history`` and this module's logger.
    ``steps`` adds fixed steps to measure at; ``stop_above`` ends training when the total exceeds it.
    Detection options (top_k, epsilon, side, modules, method, ...) are those of ``repair.detect``.
    """

    def __init__(self, every: int | None = 25, stop_above: int | None = None, steps: Iterable[int] = (),
                 **options):
        from repair.detection.detector import detect_options

        if every is not None and every < 1:
            raise RepairError(f"every: expected a number of steps >= 1 (or None), got {every}.")
        self.every, self.stop_above, self.steps = every, stop_above, set(steps)
        self.options = detect_options(options)  # validated now, not in the middle of training
        self.history: list[dict] = []  # per measured step: step, total, by type, intruders per matrix
        self.trainer = None
        self._src = None

    def attach(self, trainer) -> IntruderMonitor:
        """Add this callback to ``trainer`` and log through ``trainer.log``."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from repair.adapters.live import LivePairSource

        if self.trainer is None:
            logger.info("IntruderMonitor is not attached to a Trainer: counts go to state.log_history and the log")
        self._src = LivePairSource(model, self.options.modules, self.options.spectra())
        if self.options.device == "auto":  # where the model is, as detect_model does
            self.options = replace(self.options, device=str(next(model.parameters()).device))
        self.measure(state, control)  # step 0 (or the resumed step); also computes the base spectra once

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if (self.every and step % self.every == 0) or step in self.steps:
            self.measure(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.measure(state, control)

    def measure(self, state, control) -> DetectionReport:
        """Detect now, log the counts, record them, and stop training above ``stop_above``."""
        from repair.detection.detector import detect_source

        start = time.perf_counter()
        report = detect_source(self._src, self.options, base="<model>", tuned=f"<adapter {self._src.adapter_name}>")
        metrics = metrics_of(report)
        self.history.append({"step": state.global_step, **metrics, "seconds": round(time.perf_counter() - start, 4),
                             "matrices": {m.name: {"intruders": m.intruders, "sigma": [m.sigma[i] for i in m.intruders]}
                                          for m in report.matrices}})
        if self.trainer is not None:
            pending = control.should_log  # trainer.log clears it: the Trainer's own loss log must still happen
            self.trainer.log(dict(metrics))
            control.should_log = pending
        else:
            state.log_history.append({**metrics, "step": state.global_step})
        logger.info("step %d: %d intruders", state.global_step, report.total_intruders)
        if self.stop_above is not None and report.total_intruders > self.stop_above:
            logger.warning("step %d: %d intruders > stop_above=%d; stopping training", state.global_step,
                           report.total_intruders, self.stop_above)
            control.should_training_stop = True
        return report

    def write_history(self, path: Path) -> None:
        """The recorded counts and intruders per step as JSON (read by ``repair figures --history``)."""
        o = self.options
        doc = {"schema_version": SCHEMA_VERSION, "top_k": o.top_k, "epsilon": o.epsilon, "side": o.side,
               "steps": self.history}
        write_text_atomic(Path(path), json.dumps(doc, indent=2) + "\n")
