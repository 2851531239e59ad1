"""The README's commands stay true: CI runs exactly its test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_cmd = ci[-1]
    assert "pytest" in test_cmd and test_cmd in readme
    assert "pip install torch==2.13.0" in readme.split("pytest")[0]  # pinned CPU torch comes first
