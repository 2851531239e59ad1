"""Drawing a figure to a PNG: written atomically, and not drawn again from the same data.

Each PNG carries, in a text chunk, a digest of the data it was drawn from (and of the tool's version). A run that
resumes (a sweep or a release after a failure) finds its figures whole and drawn from the same points, and keeps
them instead of spending matplotlib's second or so on each again.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

from repair import __version__
from repair.runtime.durable import TMP_MARKER

DATA_KEY = "intruder-repair-data"  # the PNG text chunk that holds the digest


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def data_digest(*parts: object) -> str:
    """A digest of what a figure shows (bytes as they are, anything else by its ``str``), and of the version."""
    h = hashlib.sha256(__version__.encode())
    for part in parts:
        h.update(b"\0" + (part if isinstance(part, bytes) else str(part).encode()))
    return h.hexdigest()


def drawn_from(path: Path) -> str | None:
    """The digest stored in the PNG at ``path``; None when there is none, or the file is not a whole PNG."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            key = im.info.get(DATA_KEY)
            im.verify()  # every chunk's CRC, to the end: a torn file is drawn again
    except (OSError, SyntaxError, ValueError):  # PIL's errors for a missing, foreign or broken file
        return None
    return key if isinstance(key, str) else None


def save_figure(fig, path: Path, digest: str | None = None) -> Path:
    """Lay ``fig`` out, write it to a temporary sibling renamed to ``path``, and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}.png")
    try:
        fig.tight_layout()
        png = io.BytesIO()  # drawn in memory and written in one call, not as PIL's chunk-by-chunk writes
        fig.savefig(png, format="png", metadata={DATA_KEY: digest} if digest else None)
        with open(tmp, "wb") as f:
            f.write(png.getbuffer())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
    return path


def draw_once(path: Path, digest: str, draw: Callable[[], object]) -> Path:
    """``save_figure(draw(), path)``, unless the PNG at ``path`` is whole and was drawn from the same data."""
    if drawn_from(path) == digest:
        return Path(path)
    return save_figure(draw(), path, digest)
