"""Independent readings of a release folder for the tests: the model card through huggingface_hub, its evidence
table parsed from the markdown, the page rendered by headless Chromium with its network log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-domain-reliability"]


def card_table(text: str) -> dict[str, list[str]]:
    """The evidence table of a card: row label -> its cells."""
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def number(cell: str) -> tuple[float | None, float | None]:
    """``0.9800 ± 0.0200`` -> (0.98, 0.02); percentages as fractions; ``–`` -> (None, None)."""
    if cell == "–":
        return None, None
    pct = cell.endswith("%")
    parts = [float(p.strip().rstrip("%")) / (100 if pct else 1) for p in cell.split("±")]
    return parts[0], parts[1] if len(parts) > 1 else None


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it from Debian's packages")
        pytest.skip("no chromium here (CI installs it)")
    return found


def render_page(page: Path, out: Path) -> tuple[Path, list[str]]:
    """A screenshot of ``page`` and every URL the page itself asked for (Chromium's own background requests,
    which have no page as their initiator, left out)."""
    shot, netlog = out / f"{page.stem}.png", out / f"{page.stem}-net.json"
    subprocess.run([browser(), *BROWSER_FLAGS, "--window-size=1100,2400", f"--screenshot={shot}",
                    f"--log-net-log={netlog}", page.resolve().as_uri()], check=True, timeout=120,
                   capture_output=True, cwd=out)
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    asked = [e["params"]["url"] for e in log["events"] if e.get("type") == start
             and str(e["params"].get("network_isolation_key", "")).startswith("file://")]
    return shot, asked


def external(urls: list[str]) -> list[str]:
    return [u for u in urls if not re.match(r"^(file|data):", u)]
