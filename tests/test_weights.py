"""Opt-in downloads (`netvlad_tutorial.weights`), served from 127.0.0.1 only."""

import hashlib

import pytest
import torch
from oracles import FileServer

from netvlad_tutorial import weights
from netvlad_tutorial.weights import REGISTRY, Weights, download_weights


def _file_bytes(obj, tmp_path, name):
    path = tmp_path / name
    torch.save(obj, path)
    return path.read_bytes()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A server with a small VGG-like state dict (hash known) and a Nanne-format file."""
    src = tmp_path / "src"
    src.mkdir()
    encoder = _file_bytes({"features.0.weight": torch.randn(64, 3, 3, 3),
                           "features.0.bias": torch.zeros(64)}, src, "enc.pth")
    nanne = _file_bytes({"epoch": 1, "state_dict": {
        "encoder.0.weight": torch.randn(64, 3, 3, 3), "pool.centroids": torch.rand(4, 512),
        "pool.conv.weight": torch.randn(4, 512, 1, 1)}}, src, "nanne.pth.tar")
    server = FileServer({"enc.pth": encoder, "nanne.pth.tar": nanne})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, server.url)
    entries = {
        "hashed": Weights("test-enc", "https://example.invalid/enc.pth", "enc.pth",
                          hashlib.sha256(encoder).hexdigest()[:10], "encoder", "test", "test"),
        "unverified": Weights("test-nanne", "https://example.invalid/n", "nanne.pth.tar", None,
                              "model", "test", "test"),
    }
    yield server, entries, encoder
    server.close()


def _cache_files(tmp_path):
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.endswith(".lock")) if folder.exists() else []


def test_registry():
    assert REGISTRY["imagenet"].url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert REGISTRY["imagenet"].sha256 == "397923af"
    for city in ("pittsburgh", "mapillary"):
        for dim in (128, 512, 4096):
            entry = REGISTRY[f"{city}_WPCA{dim}"]
            assert entry.url.startswith("https://cloudstor.aarnet.edu.au/plus/s/")
            assert entry.filename == f"{city}_WPCA{dim}.pth.tar" and entry.pca_dim == dim
            assert entry.sha256 is None and "no checksum is published" in entry.note


def test_good_download_then_rerun_does_not_download(served, tmp_path, capsys):
    server, entries, encoder = served
    path = download_weights(entries["hashed"], progress=False)
    assert path == tmp_path / "torch_home" / "hub" / "checkpoints" / "enc.pth"
    assert path.read_bytes() == encoder
    assert server.requests == ["/enc.pth"]
    assert f"saved to {path}" in capsys.readouterr().out
    assert download_weights(entries["hashed"], progress=False) == path
    assert server.requests == ["/enc.pth"]  # no second request
    assert "already downloaded" in capsys.readouterr().out
    assert _cache_files(tmp_path) == ["enc.pth"]


def test_corrupted_download_is_refused_without_partial_file(served, tmp_path):
    server, entries, _ = served
    server.mode = "corrupt"
    with pytest.raises(ValueError, match="invalid hash value"):
        download_weights(entries["hashed"], progress=False)
    assert len(server.requests) == 1
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize("which", ["hashed", "unverified"])
def test_interrupted_download_fails_without_partial_file(served, tmp_path, which):
    server, entries, _ = served
    server.mode = "truncate"
    with pytest.raises(ValueError, match="download from|truncated|invalid hash"):
        download_weights(entries[which], progress=False, allow_unverified=True)
    assert len(server.requests) == 1
    assert _cache_files(tmp_path) == []


def test_unverified_needs_consent_and_records_its_hash(served, tmp_path, capsys):
    server, entries, _ = served
    with pytest.raises(ValueError, match="allow_unverified=True"):
        download_weights(entries["unverified"], progress=False)
    assert server.requests == []
    path = download_weights(entries["unverified"], progress=False, allow_unverified=True)
    digest = hashlib.sha256(server.files["nanne.pth.tar"]).hexdigest()
    assert (path.parent / "nanne.pth.tar.sha256").read_text().split()[0] == digest
    assert digest in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # changed after the download
    with pytest.raises(ValueError, match="does not start with"):
        download_weights(entries["unverified"], progress=False)
    assert len(server.requests) == 1


def test_cli_weights_download_and_list(served, tmp_path, capsys, monkeypatch):
    from netvlad_tutorial import cli

    server, entries, encoder = served
    monkeypatch.setitem(REGISTRY, "imagenet", entries["hashed"])
    cli.main(["weights", "download", "imagenet", "--base-url", server.url])
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "enc.pth").read_bytes() == encoder
    cli.main(["weights", "list"])
    out = capsys.readouterr().out
    assert "pittsburgh_WPCA4096" in out and "no published hash" in out
