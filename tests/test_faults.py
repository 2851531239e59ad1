"""Fault injection: the N-th filesystem mutation of a run fails with ENOSPC or EIO, for every N (tests/faults.py
lists what counts: opens, every write, mkstemp, mkdtemp, mkdir, chmod, fsync, renames, copies, the exchange).

Each matrix runs onto a new --out, and with --overwrite onto an existing one, with renameat2's exchange and
with it reported unsupported (the move-aside fallback). Each run either succeeds with exactly the output of
an undisturbed run (a failed cache write is only a warning) or fails with one sentence and exit code 3,
leaving nothing new at --out (under --overwrite: the old output, whole) and no temporary; a rerun without
faults then gives byte-identical output (for sweeps: identical points), so the cache was left consistent.
The counts of failure points are printed (run with -s to see them).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults import PUBLISHING_KINDS, Faults, differences, injected, leftovers, tree_bytes

from repair.cli import main

MODES = {"new": (False, True), "overwrite": (True, True), "overwrite-no-exchange": (True, False)}


def outcome(res, out: Path, expected: dict[str, bytes], before: dict[str, bytes] | None, faults: Faults) -> str:
    """'ok' (output as undisturbed) or 'refused' (one sentence, exit 3, --out as it was); else an assertion."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (faults.failed, res.exception)
    assert leftovers(out.parent) == [], faults.failed
    if res.exit_code == 0:
        assert tree_bytes(out) == expected, faults.failed
        return "ok"
    lines = [line for line in res.output.strip().splitlines() if line.startswith("Error:")]
    assert res.exit_code == 3 and len(lines) == 1 and "Traceback" not in res.output, (faults.failed, res.output)
    assert "injected" in lines[0] or "No space" in lines[0] or "Input/output" in lines[0], (faults.failed, lines)
    assert (tree_bytes(out) == before) if before is not None else not out.exists(), faults.failed
    return "refused"


def count(outcomes: dict[str, int], kind: str) -> None:
    outcomes[kind] = outcomes.get(kind, 0) + 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mutation_of_a_patch_can_fail(mode, llama_base, llama_adapter, tmp_path, monkeypatch, capsys):
    overwrite, exchange = MODES[mode]
    cache = tmp_path / "cache"
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(cache))
    args = ["patch", str(llama_base), str(llama_adapter), "--scale", "0.5", "--threads", "1",
            *(["--overwrite"] if overwrite else []), "--out"]
    old = tmp_path / "old"  # under --overwrite, what is at --out before each run: the patch at another λ
    assert CliRunner().invoke(main, ["patch", str(llama_base), str(llama_adapter), "--scale", "0.25",
                                     "--out", str(old)]).exit_code == 0
    before = tree_bytes(old) if overwrite else None

    def place(out: Path) -> None:
        if overwrite:
            shutil.copytree(old, out)

    place(baseline := tmp_path / "baseline")
    with injected(Faults(exchange=exchange)) as counter:
        res = CliRunner().invoke(main, [*args, str(baseline)])
    assert res.exit_code == 0, res.output
    expected, total = tree_bytes(baseline), counter.count
    published_by = {"exchange"} if exchange and overwrite else {"replace"} if overwrite else {"rename"}
    assert set(counter.kinds) >= (PUBLISHING_KINDS - {"rename"}) | published_by | {"save_file", "copyfile"}
    assert ("exchange" in counter.kinds) == overwrite
    outcomes: dict[str, int] = {}
    for n in range(1, total + 1):
        shutil.rmtree(cache, ignore_errors=True) if n % 3 == 0 else None  # cold and warm caches alike
        place(out := tmp_path / f"out-{n}")
        faults = Faults(n, errno.ENOSPC if n % 2 else errno.EIO, exchange=exchange)
        with injected(faults):
            res = CliRunner().invoke(main, [*args, str(out)])
        count(outcomes, outcome(res, out, expected, before, faults))
        res = CliRunner().invoke(main, [*args, str(out)] if overwrite else [*args, str(rerun := tmp_path / "rerun")])
        assert res.exit_code == 0, (faults.failed, res.output)
        assert tree_bytes(out if overwrite else rerun) == expected, faults.failed
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp_path / "rerun", ignore_errors=True)
    with capsys.disabled():
        print(f"\nrepair patch ({mode}): {total} injected failure points, all held ({outcomes}; {dict(counter.kinds)})")
    assert outcomes.get("refused", 0) > 0


def _points(report: dict) -> list[tuple]:
    return [(p["label"], p["scale"], p["accuracy"], p["forgetting_nll"], p["intruders"])
            for p in [report["base"], report["tuned"], *report["points"]]]


@pytest.mark.parametrize("mode", ["new", "overwrite"])
def test_every_mutation_of_a_sweep_can_fail_and_a_resumed_run_gives_the_same_points(
        mode, llama_base, llama_adapter, mc_task, corpus_file, tmp_path, monkeypatch, capsys):
    """Under ``overwrite`` the sweep writes the picked adapter with --write-picked --overwrite onto an earlier
    one: a failed run leaves that one whole (or, once the new one is in place, the new one)."""
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    overwrite = mode == "overwrite"
    args = ["sweep", str(llama_base), str(llama_adapter), "--scales", "0", "--task", str(mc_task), "--limit", "4",
            "--forgetting", str(corpus_file), "--control", "none", "--threads", "1",  # controls: test_controls
            *(["--write-picked", "--format", "adapter", "--pick", "max-acc-drop=1", "--overwrite"] if overwrite
              else []), "--out"]
    res = CliRunner().invoke(main, [*args, str(tmp_path / "warm")])  # lm-eval's and datasets' caches filled first,
    assert res.exit_code == 0, res.output  # so the count does not depend on what ran before in this session
    with injected(Faults()) as counter:
        res = CliRunner().invoke(main, [*args, str(tmp_path / "baseline")])
    assert res.exit_code == 0, res.output
    expected, total = _points(json.loads((tmp_path / "baseline" / "sweep.json").read_text())), counter.count
    picked = tree_bytes(tmp_path / "baseline" / "picked") if overwrite else None
    assert {"open", "fdopen", "write", "mkstemp", "mkdir", "chmod", "fsync", "replace"} <= set(counter.kinds)
    outcomes: dict[str, int] = {}
    for n in range(1, total + 1):
        out = tmp_path / f"out-{n}"
        if overwrite:  # the sweep's own points already there; an older pick at DIR/picked
            shutil.copytree(tmp_path / "baseline", out)
            (out / "picked" / "stale.txt").write_text("an earlier pick")
        faults = Faults(n, errno.ENOSPC if n % 2 else errno.EIO)
        with injected(faults):
            res = CliRunner().invoke(main, [*args, str(out)])
        assert res.exception is None or isinstance(res.exception, SystemExit), (faults.failed, res.exception)
        assert not leftovers(out, deep=True) and not leftovers(out.parent), faults.failed
        if res.exit_code == 0:
            count(outcomes, "ok")
        else:
            lines = [line for line in res.output.strip().splitlines() if line.startswith("Error:")]
            assert res.exit_code == 3 and len(lines) == 1, (faults.failed, res.output)
            count(outcomes, "refused")
            if overwrite:  # the earlier pick whole, or the new one: never a mixture
                now = tree_bytes(out / "picked")
                assert now == picked or now == {**picked, "stale.txt": b"an earlier pick"}, faults.failed
            res = CliRunner().invoke(main, [*args, str(out)])  # resumes from the points that were written
            assert res.exit_code == 0, (faults.failed, res.output)
        assert _points(json.loads((out / "sweep.json").read_text())) == expected, faults.failed
        if overwrite:
            assert tree_bytes(out / "picked") == picked, faults.failed
        shutil.rmtree(out)
    with capsys.disabled():
        print(f"\nrepair sweep ({mode}): {total} injected failure points, all held ({outcomes}; {dict(counter.kinds)})")
    assert outcomes.get("refused", 0) > 0


def _release_tree(out: Path) -> dict[str, bytes]:
    """The release's files; its creation time (in release.json and on the page) is dropped, and so is the run's
    log (a resumed run's log tells of the run that failed, by design)."""
    tree = tree_bytes(out)
    assert tree.pop("logs/run.log", None) is not None
    created = json.loads((out / "release.json").read_text())["created"].encode()
    tree["report.html"] = tree["report.html"].replace(created, b"")
    where = str(out.parent).encode()  # each run has a folder of its own, all named alike inside
    return {k: v.replace(where, b"<run>") for k, v in tree.items()}


@pytest.mark.parametrize("mode", ["new", "overwrite"])
def test_every_mutation_of_a_release_can_fail(mode, llama_base, llama_adapter, mc_task, corpus_file, tmp_path,
                                              monkeypatch, capsys):
    """Every mutation from the measured points on: the detection, the figures, the adapter at the picked λ,
    the card, the page, release.json and the folder's publication (the sweep's own are the matrix above).
    A refused run keeps its points and leaves --out as it was; the same command then finishes it."""
    import evals.release.runner
    from evals.release.runner import work_dir
    from repair.errors import RunFailed

    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    overwrite = mode == "overwrite"

    def args(out: Path) -> list[str]:
        return ["release", str(llama_base), str(llama_adapter), "--task", str(mc_task), "--limit", "4",
                "--forgetting", str(corpus_file), "--max-acc-drop", "1", "--scales", "0", "--control", "none",
                "--threads", "1", *(["--overwrite"] if overwrite else []), "--out", str(out)]

    def stop(*a, **k):
        raise RunFailed("stopped after the sweep")

    with monkeypatch.context() as m:  # the measured points, kept as a failed run keeps them
        m.setattr(evals.release.runner, "_publish", stop)
        assert CliRunner().invoke(main, args(tmp_path / "points")).exit_code == 1
    kept = work_dir(tmp_path / "points")
    old = tmp_path / "old"  # under --overwrite: an earlier release at --out
    (old.mkdir(), (old / "release.json").write_text("{}\n")) if overwrite else None
    before = tree_bytes(old) if overwrite else None

    def place(out: Path) -> None:
        shutil.copytree(kept, work_dir(out))
        shutil.copytree(old, out) if overwrite else None

    place(baseline := tmp_path / "baseline" / "release")
    with injected(Faults()) as counter:
        res = CliRunner().invoke(main, args(baseline))
    assert res.exit_code == 0, res.output
    expected, total = _release_tree(baseline), counter.count
    assert set(counter.kinds) >= PUBLISHING_KINDS - {"rename"} | {"exchange" if overwrite else "rename"}
    outcomes: dict[str, int] = {}
    for n in range(1, total + 1):
        place(out := tmp_path / f"run-{n}" / "release")
        faults = Faults(n, errno.ENOSPC if n % 2 else errno.EIO)
        with injected(faults):
            res = CliRunner().invoke(main, args(out))
        assert res.exception is None or isinstance(res.exception, SystemExit), (faults.failed, res.exception)
        assert leftovers(out.parent) == [] and leftovers(work_dir(out), deep=True) == [], faults.failed
        if res.exit_code == 0:
            assert _release_tree(out) == expected, (faults.failed, differences(_release_tree(out), expected))
            count(outcomes, "ok")
        else:
            lines = [line for line in res.output.strip().splitlines() if line.startswith("Error:")]
            assert res.exit_code == 3 and len(lines) == 1 and "Traceback" not in res.output, (faults.failed,
                                                                                              res.output)
            assert (tree_bytes(out) == before) if overwrite else not out.exists(), faults.failed
            assert work_dir(out).is_dir(), faults.failed  # the points are kept for the rerun
            count(outcomes, "refused")
            res = CliRunner().invoke(main, args(out))
            assert res.exit_code == 0, (faults.failed, res.output)
            assert _release_tree(out) == expected, (faults.failed, differences(_release_tree(out), expected))
        assert not work_dir(out).exists(), faults.failed
        shutil.rmtree(out)
    with capsys.disabled():
        print(f"\nrepair release ({mode}): {total} injected failure points, all held ({outcomes}; "
              f"{dict(counter.kinds)})")
    assert outcomes.get("refused", 0) > 0
