"""A figure is drawn once per data: a resumed run keeps the PNG it drew (whole, and drawn from the same data),
and draws again when the data differ or the file is torn. PIL reads the PNGs back (an independent reader)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from repair.figures.curves import MatrixStats, plot_similarity
from repair.figures.render import DATA_KEY


def stats(seed: int) -> MatrixStats:
    gen = torch.Generator().manual_seed(seed)
    sim = torch.rand(6, 6, generator=gen)
    return MatrixStats("model.layers.0.self_attn.q_proj", sim.amax(0), torch.linspace(3, 1, 6), sim, 2.0)


@pytest.fixture
def draws(monkeypatch) -> list[object]:
    """Where matplotlib drew each PNG (a file, or a buffer written afterwards)."""
    from matplotlib.figure import Figure

    seen, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kw: (seen.append(fname),
                                                                      real(self, fname, **kw))[1])
    return seen


def test_the_same_data_is_not_drawn_again(tmp_path, draws):
    path = tmp_path / "similarity.png"
    plot_similarity(stats(0), 0.5, path)
    first = path.read_bytes()
    with Image.open(path) as im:
        assert im.size[0] > 100 and len(im.info[DATA_KEY]) == 64  # a real image, with the data's digest
    plot_similarity(stats(0), 0.5, path)
    assert len(draws) == 1 and path.read_bytes() == first
    plot_similarity(stats(0), 0.3, path)  # another ε marks other intruders: drawn again
    plot_similarity(stats(1), 0.3, path)  # other data
    assert len(draws) == 3 and path.read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["similarity.png"]  # no temporary left


@pytest.mark.parametrize("damage", ["torn", "foreign", "flipped"])
def test_a_damaged_or_foreign_png_is_drawn_again(tmp_path, draws, damage):
    path = tmp_path / "similarity.png"
    plot_similarity(stats(0), 0.5, path)
    whole = path.read_bytes()
    if damage == "torn":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "foreign":
        Image.new("RGB", (8, 8)).save(path)
    else:  # one byte inside the image data: its chunk's CRC no longer matches
        path.write_bytes(whole[:-40] + bytes([whole[-40] ^ 0xFF]) + whole[-39:])
    plot_similarity(stats(0), 0.5, path)
    assert len(draws) == 2 and path.read_bytes() == whole
