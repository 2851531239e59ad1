"""lm-eval's own result files for each evaluated point, written by lm-eval's ``EvaluationTracker``.

``DIR/lm-eval/<label>/`` gets exactly what ``lm_eval --output_path DIR/lm-eval/<label>`` writes:
``<model name>/results_<date>.json`` per ``simple_evaluate`` call, and ``samples_<task>_<date>.jsonl``
with ``--log-samples``, so dashboards and scripts that read lm-eval's outputs read these. The tracker
writes into a temporary sibling folder that replaces the point's folder only when every file is there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from repair.errors import OutputError
from repair.runtime.durable import atomic_output_dir

logger = logging.getLogger(__name__)

LM_EVAL_DIR = "lm-eval"


class LmEvalRecord:
    """Collects lm-eval's outputs of one point's ``simple_evaluate`` calls in a staging folder."""

    def __init__(self, staging: Path, dest: Path):
        self.staging, self.dest = staging, dest

    def tracker(self):
        from lm_eval.loggers import EvaluationTracker

        return EvaluationTracker(output_path=str(self.staging))

    def save(self, tracker, results: dict | None) -> None:
        """Write one call's results (and samples, when logged) as lm-eval's CLI does after ``simple_evaluate``."""
        if results is None:
            return
        samples = results.pop("samples", None)
        before = set(self.staging.rglob("results_*.json"))
        tracker.save_results_aggregated(results=results, samples=samples)
        written = set(self.staging.rglob("results_*.json")) - before
        if not written:  # lm-eval logs the refused write as a warning and carries on: the machine refused it (exit 3)
            raise OutputError(f"{self.dest}: lm-eval could not write its results file there (see its warning).")
        for task_name in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
            if not any(self.staging.rglob(f"samples_{task_name}_{tracker.date_id}.jsonl")):
                raise OutputError(f"{self.dest}: lm-eval could not write the samples of {task_name} there.")


@contextlib.contextmanager
def lm_eval_record(dest: Path) -> Iterator[LmEvalRecord]:
    """A record whose files replace ``dest`` when the block succeeds (nothing is left half-written). A failed
    write of the record (staging, syncing, publishing) is one sentence; errors of the block pass unchanged."""
    in_block = False
    try:
        with atomic_output_dir(dest, overwrite=True) as staging:
            in_block = True
            yield LmEvalRecord(staging, dest)
            in_block = False
    except OSError as e:
        if in_block:
            raise
        raise OutputError(f"{dest}: writing lm-eval's result files failed ({e.strerror or e}); the points "
                          "finished before are kept, so a rerun resumes.") from e
