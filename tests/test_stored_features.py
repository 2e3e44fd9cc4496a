"""Local features kept between runs: the same array as computing them, read back, keyed."""

import os

import numpy as np
import pytest
import torch

from netvlad_tutorial import data, evaluate, model, run_model
from netvlad_tutorial import features as ft
from netvlad_tutorial.config import PRESETS
from netvlad_tutorial.model import build_model
from netvlad_tutorial.precision import resolve_precision


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
    config = PRESETS["tiny-random"].replace(data_root=str(micro_city), image_size=(32, 48))
    return encoder, data.whole_dataset(split, config)


def test_stored_equals_computed_and_is_read_back(store, encoder_and_dataset, monkeypatch, capsys):
    encoder, dataset = encoder_and_dataset
    plain = ft.encode_local_features(encoder, dataset, batch_size=16, precision="fp32")
    first = ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32")
    assert np.array_equal(first, plain)
    assert len(list(store.glob("*.npy"))) == 1
    monkeypatch.setattr(ft, "encode", lambda *a, **k: pytest.fail("encoded again"))
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
    monkeypatch.setattr(ft, "STORED_LIMIT_MIB", 0.01)
    assert ft.stored_local_features(encoder, dataset, batch_size=16, precision="fp32") is None
    assert not store.exists() or not list(store.glob("*.npy"))


def test_split_descriptors_of_a_frozen_model_read_the_stored_features(store, micro_city,
                                                                      monkeypatch):
    config = PRESETS["tiny-random"].replace(
        data_root=str(micro_city), image_size=(32, 48), num_clusters=4, kmeans_images=20,
        kmeans_per_image=4, kmeans_iters=10, precision="fp32", device="cpu")
    split = data.load_split(micro_city, "val")
    net = model.make_model(config, data.load_split(micro_city, "train"), torch.device("cpu"))
    assert net.encoder_frozen
    first = evaluate.encode_split(net, split, config, torch.device("cpu"))
    encode = ft.encode
    monkeypatch.setattr(ft, "encode", _only_the_head(encode))
    again = evaluate.encode_split(net, split, config, torch.device("cpu"))
    monkeypatch.setattr(ft, "encode", encode)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # The images' path, for comparison: float16 features round what NetVLAD sees, no more.
    monkeypatch.setattr(run_model, "stored_local_features", lambda *a, **k: None)
    plain = evaluate.encode_split(net, split, config, torch.device("cpu"))
    for a, b in zip(first, plain):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def _only_the_head(encode):
    """`encode` that fails when given the encoder (images), not the NetVLAD head."""
    def run(net, dataset, *args, **kwargs):
        assert isinstance(dataset, ft.FeatureDataset), "the encoder ran again"
        return encode(net, dataset, *args, **kwargs)
    return run


def test_a_training_encoder_is_stored_through_its_frozen_copy(store, encoder_and_dataset):
    frozen, dataset = encoder_and_dataset
    training = ft.frozen_copy(frozen).requires_grad_(True)  # stands for `tiny`'s conv5 training
    with pytest.raises(ValueError, match="frozen encoder only"):
        ft.stored_local_features(training, dataset, batch_size=16, precision="fp32")
    copy = ft.frozen_copy(training)
    assert not any(p.requires_grad for p in copy.parameters())
    assert all(p.requires_grad for p in training.parameters())  # the original still trains
    with torch.no_grad():
        next(training.parameters()).add_(1.0)  # a step of the original: the copy keeps its weights
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), frozen.parameters()))
    stored = ft.stored_local_features(copy, dataset, batch_size=16, precision="fp32")
    assert np.array_equal(stored, ft.encode_local_features(frozen, dataset, batch_size=16,
                                                           precision="fp32"))
