"""Hub ids: revision and token reach huggingface_hub, and pickle files are fetched only with --allow-pickle.

huggingface_hub's ``snapshot_download`` is replaced by a recorder that returns a local checkpoint, so
the test runs offline and sees exactly what would have been asked of the hub.
"""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from repair.cli import main
from repair.errors import SourceError
from repair.io.sources import HUB_PATTERNS, PICKLE_PATTERNS, HubOptions, resolve


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub: every download records its arguments and returns a tiny full checkpoint."""
    calls: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    folders = {}
    for name, shift in (("base", 0.0), ("tuned", 1.0)):
        folder = tmp_path / name
        folder.mkdir()
        W = torch.randn(32, 48, generator=gen)
        save_file({"model.layers.0.mlp.down_proj.weight": W + shift * torch.outer(torch.ones(32), torch.ones(48))},
                  folder / "model.safetensors")
        (folder / "config.json").write_text("{}")
        folders[name] = folder

    def snapshot_download(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        return str(folders["tuned" if "tuned" in repo_id else "base"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_revision_and_pickle_patterns_reach_the_hub(hub):
    resolve("org/base")
    resolve("org/base@v1.2", HubOptions(revision="main", token="hf_x", allow_pickle=True))
    plain, pinned = hub
    assert plain["repo_id"] == "org/base" and plain["revision"] is None and plain["token"] is None
    assert plain["allow_patterns"] == HUB_PATTERNS and not set(PICKLE_PATTERNS) & set(plain["allow_patterns"])
    assert pinned["repo_id"] == "org/base" and pinned["revision"] == "v1.2" and pinned["token"] == "hf_x"
    assert set(PICKLE_PATTERNS) <= set(pinned["allow_patterns"])
    assert "hf_x" not in repr(HubOptions(token="hf_x"))


def test_cli_passes_revision_and_token_and_never_records_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report.json"
    main(["detect", "org/base", "org/tuned@abc123", "--revision", "v2", "--token", "hf_secret", "--json", str(out)],
         standalone_mode=False)
    base, tuned = hub
    assert (base["revision"], tuned["revision"]) == ("v2", "abc123")  # ID@REV overrides --revision
    assert base["token"] == tuned["token"] == "hf_secret"
    text = out.read_text()
    assert "hf_secret" not in text
    assert json.loads(text)["tuned"] == "org/tuned@abc123"


def test_unfetchable_hub_id_names_the_revision(monkeypatch):
    def fail(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(SourceError, match=r"org/model@v9: not a local folder, and it could not be fetched"):
        resolve("org/model@v9")


def test_sweep_fetches_every_model_at_the_same_revision(llama_base, llama_adapter, mc_task, corpus_file, tmp_path,
                                                        monkeypatch):
    """The detector and the evaluation both load the hub id at --revision: the sweep measures what it analysed."""
    from click.testing import CliRunner

    calls: list[dict] = []

    def snapshot_download(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        return str(llama_base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("INTRUDER_REPAIR_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["sweep", "org/base", str(llama_adapter), "--scales", "0,1", "--task",
                                    str(mc_task), "--forgetting", str(corpus_file), "--control", "none",
                                    "--revision", "v3", "--out", str(tmp_path / "sweep")])
    assert res.exit_code == 0, res.output
    assert len(calls) >= 2 and {c["revision"] for c in calls} == {"v3"}, calls  # detection and evaluation
