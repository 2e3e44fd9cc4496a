"""Encoder weights shipped in the package (`weights="world"`): checked by sha256, listed with
their provenance, keyed by content in the centroid cache; absent, a clear message."""

import hashlib
import json

import pytest
import torch

from netvlad_tutorial import backbone, weights
from netvlad_tutorial.backbone import build_encoder, vgg16_features
from netvlad_tutorial.centroids import centroids_path
from netvlad_tutorial.config import PRESETS


def _ship(folder, seed=0):
    """A VGG16 state dict in fp16 and its provenance record, as `pretrain` exports them."""
    torch.manual_seed(seed)
    state = {k: v.half() for k, v in vgg16_features()[:-2].state_dict().items()}
    path = folder / "vgg16_world.pth"
    torch.save(state, path)
    record = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "seconds": 5400,
              "command": "python -m netvlad_tutorial pretrain", "commit": "abc123",
              "hardware": "a test CPU", "device": "cpu"}
    (folder / "vgg16_world.json").write_text(json.dumps(record))
    return state


def test_world_weights_load_and_are_listed_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "SHIPPED_DIR", tmp_path)
    state = _ship(tmp_path)
    encoder = build_encoder("world")
    assert encoder.weights_source == "world"
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key].float()), key
    # pretrained weights: conv5 trains, the prefix does not (the paper's setting)
    assert not encoder[0].weight.requires_grad and encoder[-1].weight.requires_grad
    listing = weights.list_weights()
    assert "shipped" in listing and "a test CPU" in listing and "1.5 h" in listing


def test_damaged_or_absent_world_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "SHIPPED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrain"):
        build_encoder("world")
    assert "not shipped" in weights.list_weights()
    _ship(tmp_path)
    with open(tmp_path / "vgg16_world.pth", "r+b") as f:  # one byte changed
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="damaged"):
        build_encoder("world")


def test_centroid_cache_names_stay_in_the_cache_folder_and_follow_the_weights(
        tiny_city, tmp_path, monkeypatch):
    from netvlad_tutorial.data import load_split
    from netvlad_tutorial.utils import cache_dir

    split = load_split(tiny_city, "train")
    config = PRESETS["tiny-imagenet"]
    outside = tmp_path / "a" / "b" / "enc.pth"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"x" * 10)
    path = centroids_path(config.replace(weights=str(outside)), split)
    assert path.parent == cache_dir() and "enc" in path.name  # no folders from the weights path
    relative = centroids_path(config.replace(weights="../../enc.pth"), split)
    assert relative.parent == cache_dir()
    outside.write_bytes(b"y" * 11)  # the file changed: another key
    assert centroids_path(config.replace(weights=str(outside)), split) != path
    monkeypatch.setattr(backbone, "SHIPPED_DIR", tmp_path)
    _ship(tmp_path, seed=0)
    first = centroids_path(config.replace(weights="world"), split)
    _ship(tmp_path, seed=1)
    assert centroids_path(config.replace(weights="world"), split) != first
