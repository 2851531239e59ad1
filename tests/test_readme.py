"""The README's commands stay true: CI runs exactly its test command, and its Python examples run."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_cmd = ci[-1]
    assert "pytest" in test_cmd and test_cmd in readme
    assert "pip install torch==2.13.0" in readme.split("pytest")[0]  # pinned CPU torch comes first


def python_api_blocks() -> list[str]:
    page = (ROOT / "docs" / "python-api.md").read_text()
    return re.findall(r"```python\n(.*?)```", page, flags=re.S)


def test_the_python_api_page_has_the_three_examples():
    blocks = python_api_blocks()
    assert len(blocks) == 3
    assert "repair.detect(" in blocks[0] and "repair.detect_model(" in blocks[1] and "IntruderMonitor" in blocks[2]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2], ids=["files", "live-model", "trainer-monitor"])
def test_python_api_examples_run(index, tmp_path):
    """Each example as a user would paste it: a fresh interpreter in an empty folder, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", python_api_blocks()[index]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    if index == 0:
        total, gate = map(int, lines[-1].split())
        assert total > 0 and 0 < gate <= total
        assert (tmp_path / "patched-adapter" / "adapter_model.safetensors").is_file()
    elif index == 1:
        assert lines[-1].startswith("default_repaired ") and lines[-1].endswith("['default_repaired']")
        assert (tmp_path / "repaired" / "default_repaired" / "adapter_model.safetensors").is_file()
    else:
        steps = ast.literal_eval(lines[-1])  # [(step, total), ...]
        assert [s for s, _ in steps] == [0, 2, 4] and steps[0][1] == 0
