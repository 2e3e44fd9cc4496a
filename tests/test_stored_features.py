"""Local features kept between runs: the same array as computing them, read back, keyed."""

import os

import numpy as np
import pytest
import torch

from netvlad_tutorial import data
from netvlad_tutorial import features as ft
from netvlad_tutorial.config import PRESETS
from netvlad_tutorial.model import build_model
from netvlad_tutorial.utils import resolve_precision


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """An empty cache folder for this test."""
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


@pytest.fixture(scope="module")
def encoder_and_dataset(micro_city):
    torch.manual_seed(0)
    encoder = build_model(num_clusters=4).encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    split = data.load_split(micro_city, "train")
    config = PRESETS["tiny"].replace(data_root=str(micro_city), image_size=(32, 48))
    return encoder, data.whole_dataset(split, config)


def test_stored_equals_computed_and_is_read_back(store, encoder_and_dataset, monkeypatch, capsys):
    encoder, dataset = encoder_and_dataset
    plain = ft.compute_local_features(encoder, dataset, batch_size=16, precision="fp32")
    first = ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    assert np.array_equal(first, plain)
    assert len(list(store.glob("*.npy"))) == 1
    monkeypatch.setattr(ft, "run_inference", lambda *a, **k: pytest.fail("encoded again"))
    capsys.readouterr()
    again = ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    assert np.array_equal(again, plain) and "read from" in capsys.readouterr().out


def test_key_changes_with_weights_images_and_precision(encoder_and_dataset):
    encoder, dataset = encoder_and_dataset
    cpu = torch.device("cpu")
    fp32 = resolve_precision("fp32", cpu)
    key = ft.features_key(encoder, dataset, fp32)
    assert ft.features_key(encoder, dataset, fp32) == key  # deterministic
    assert ft.features_key(encoder, dataset, resolve_precision("bf16", cpu)) != key
    changed = build_model(num_clusters=4).encoder
    assert ft.features_key(changed, dataset, fp32) != key
    path = dataset.paths[3]
    stat = path.stat()
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was rewritten
        assert ft.features_key(encoder, dataset, fp32) != key
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_unreadable_or_wrong_file_is_encoded_again(store, encoder_and_dataset, capsys):
    encoder, dataset = encoder_and_dataset
    good = ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    (path,) = store.glob("*.npy")
    path.write_bytes(b"not a numpy file")  # e.g. a disk that filled up outside the package
    again = ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    assert np.array_equal(again, good) and "unreadable" in capsys.readouterr().out
    np.save(path, good[:5])
    again = ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    assert np.array_equal(again, good) and "encoding again" in capsys.readouterr().out


def test_large_arrays_are_not_kept(store, encoder_and_dataset, monkeypatch):
    encoder, dataset = encoder_and_dataset
    monkeypatch.setattr(ft, "STORED_LIMIT_MB", 0.01)
    ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    assert not store.exists() or not list(store.glob("*.npy"))
