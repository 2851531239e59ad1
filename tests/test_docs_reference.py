"""The reference pages stay true: docs/cli.md equals the commands' --help, docs/outputs.md the report models,
and every relative link in the docs points at a file (and heading) that exists."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md",
         ROOT / "bench" / "README.md"]


def test_generated_pages_are_current():
    """In a fresh interpreter, as CI and a user run it: click caches each command's help option the first time a
    context is made for it, so a test that invoked a subcommand on its own would change --help in this one."""
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_page_covers_every_command_and_flag():
    """An independent walk of click's command tree: every command and every long flag appears on the page."""
    import click

    from repair.cli import main

    text = (ROOT / "docs" / "cli.md").read_text()

    def walk(cmd, path):
        assert f"## `{path}`" in text
        for p in cmd.params:
            for opt in p.opts:
                assert not opt.startswith("--") or opt in text, (path, opt)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "repair")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif frag and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)
                if frag not in {anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
