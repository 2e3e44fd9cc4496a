"""A frozen encoder runs once: cached local features give what the images give."""

import numpy as np
import pytest
import torch

from netvlad_tutorial import train as tr
from netvlad_tutorial.config import PRESETS
from netvlad_tutorial.data import load_split, whole_dataset
from netvlad_tutorial.features import (
    FeatureDataset,
    encode_descriptors,
    encode_local_features,
)
from netvlad_tutorial.files import load_torch_file
from netvlad_tutorial.images import input_transform
from netvlad_tutorial.mining import MinedTuple, TripletDataset, collate_fn
from netvlad_tutorial.model import build_model, make_model


def _frozen_config(city, **changes):
    """The micro configuration with the encoder frozen (as the tiny preset), fp32."""
    config = PRESETS["tiny-random"].replace(
        data_root=str(city), image_size=(32, 48), num_clusters=4, epochs=2, n_neg=2,
        n_neg_sample=20, n_neg_dist=10, cache_refresh=8, kmeans_images=20, kmeans_per_image=4,
        kmeans_iters=10, precision="fp32", lr=0.1, device="cpu", trainable="netvlad")
    return config.replace(**changes)


@pytest.fixture(scope="module")
def frozen(micro_city):
    """(config, model with k-means centroids, train split, the split's WholeDataset)."""
    config = _frozen_config(micro_city)
    split = load_split(micro_city, "train")
    model = make_model(config, split, torch.device("cpu"))
    return config, model, split, whole_dataset(split, config)


def test_head_after_the_encoder_is_the_model():
    torch.manual_seed(0)
    model = build_model(num_clusters=4).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model.head(model.encoder(x)), model(x))
    assert {id(p) for p in model.head.parameters()} <= {id(p) for p in model.parameters()}


def test_descriptors_from_cached_features_equal_those_from_images(frozen, capsys):
    _, model, split, dataset = frozen
    feats = encode_local_features(model.encoder, dataset, batch_size=16, precision="fp32")
    n = split.db.numDb + split.db.numQ
    assert feats.dtype == np.float16 and feats.shape == (n, 512, 2, 3)
    assert f"{n:,} images x (512, 2, 3) float16" in capsys.readouterr().out  # size printed
    plain = encode_descriptors(model, dataset, dtype=np.float32, precision="fp32")
    cached = encode_descriptors(model.head, FeatureDataset(feats), dtype=np.float32,
                                 precision="fp32")
    # float16 features (10 bits of mantissa) change unit descriptors by about 1e-3
    np.testing.assert_allclose(cached, plain, atol=3e-3)
    assert np.abs(cached - plain).max() > 0  # the comparison is not of one array with itself


def test_disk_storage_and_refusals(frozen, tmp_path):
    _, model, _, dataset = frozen
    path = tmp_path / "features.npy"
    feats = encode_local_features(model.encoder, torch.utils.data.Subset(dataset, range(5)),
                                   storage="disk", out_path=path, precision="fp32")
    assert isinstance(feats, np.memmap)
    np.testing.assert_array_equal(np.load(path)[:5], np.asarray(feats)[:5])
    with pytest.raises(ValueError, match="out_path"):
        encode_local_features(model.encoder, dataset, storage="disk")
    trainable = build_model(num_clusters=4)  # random weights: every layer trains
    with pytest.raises(ValueError, match="frozen encoder only"):
        encode_local_features(trainable.encoder, dataset)


def test_triplets_of_features_hold_each_image_features(frozen):
    config, model, split, dataset = frozen
    feats = encode_local_features(model.encoder, dataset, precision="fp32")
    t = MinedTuple(query=3, positive=1, negatives=np.array([7, 0]), d_pos=0.0,
                   d_negs=np.zeros(2), sampled=np.array([]))
    args = (split.root, split.db, [t], input_transform(config.image_size), split.queries_dir)
    images = collate_fn([TripletDataset(*args)[0]])
    cached = collate_fn([TripletDataset(*args, features=feats)[0]])
    with torch.no_grad():
        for image, feature in zip(images[:3], cached[:3]):
            torch.testing.assert_close(feature, model.encoder(image), atol=2e-3, rtol=2e-3)
    assert torch.equal(images[3], cached[3])  # neg_counts
    with pytest.raises(ValueError, match="numDb \\+ numQ"):
        TripletDataset(*args, features=feats[:5])


def _train_plain_and_cached(config, tmp_path):
    """Train `config` with and without its descriptor source's cache; check that both mined
    the same tuples, lost the same (within 1e-3) and validated alike; return both final state
    dicts."""
    plain = tr.train(config.replace(feature_cache=False), tmp_path / "plain")
    cached = tr.train(config, tmp_path / "cached")
    assert [r["tuples"] for r in plain] == [r["tuples"] for r in cached]
    np.testing.assert_allclose([r["loss"] for r in cached], [r["loss"] for r in plain],
                               rtol=1e-3)
    assert [r["recall@5"] for r in plain] == pytest.approx([r["recall@5"] for r in cached],
                                                            abs=0.1)
    return tuple(load_torch_file(tmp_path / name / "latest.pth")["model"]
                 for name in ("plain", "cached"))


def test_cached_training_equals_the_plain_path(micro_city, tmp_path):
    """Losses and final NetVLAD weights of two epochs, encoder on every image vs once."""
    config = _frozen_config(micro_city)
    a, b = _train_plain_and_cached(config, tmp_path)
    # float16 features: same mined tuples, losses within 1e-3 relative, weights within 1e-3
    for key in ("pool.centroids", "pool.conv.weight"):
        torch.testing.assert_close(b[key], a[key], atol=1e-3, rtol=1e-3, msg=key)
    init = make_model(config, load_split(micro_city, "train"), torch.device("cpu"))
    moved = (a["pool.centroids"] - init.state_dict()["pool.centroids"]).abs().max()
    assert moved > 1e-2  # training moved the weights much more than the tolerance
    for key in a:
        if key.startswith("encoder."):
            assert torch.equal(a[key], b[key]), key  # the encoder never trains


def test_prefix_map_training_equals_the_plain_path(micro_city, tmp_path):
    """conv5 and NetVLAD train (the paper's setting): the frozen prefix (conv1_1 ... pool4)
    runs once per image, and two epochs give the losses and weights of the image path."""
    from netvlad_tutorial.run_model import PrefixMapSource, RunModel

    config = _frozen_config(micro_city, trainable="conv5", lr=0.05, epochs=1)
    split = load_split(micro_city, "train")
    run = RunModel.build(config, split, torch.device("cpu"))
    assert isinstance(run.source, PrefixMapSource)
    # The prefix maps through the tail and the head are the model's descriptors.
    dataset = whole_dataset(split, config)
    maps = encode_local_features(run.source.frozen, dataset, precision="fp32")
    assert maps.shape == (len(dataset), 512, 2, 3)  # pool4 of 32 x 48: stride 16
    plain = encode_descriptors(run.model, dataset, dtype=np.float32, precision="fp32")
    cached = encode_descriptors(run.source.rest, FeatureDataset(maps), dtype=np.float32,
                                 precision="fp32")
    np.testing.assert_allclose(cached, plain, atol=3e-3)
    # Training: the same tuples and losses; the updates agree up to the float16 maps. Rounding
    # the maps changes one step's conv5_1 gradient by ~4 % (NetVLAD's sharp soft-assignment,
    # alpha = 100, amplifies it on the way back), conv5_3's and NetVLAD's far less.
    a, b = _train_plain_and_cached(config, tmp_path)
    init = make_model(config, split, torch.device("cpu")).state_dict()
    for key, tolerance in (("encoder.24.weight", 0.1), ("encoder.26.weight", 0.1),
                           ("encoder.28.weight", 0.02), ("pool.centroids", 0.02),
                           ("pool.conv.weight", 0.02)):
        update, other = a[key] - init[key], b[key] - init[key]
        assert update.norm() > 0 and (other - update).norm() < tolerance * update.norm(), key
    for key in ("encoder.0.weight", "encoder.21.weight"):  # conv1_1, conv4_3: frozen
        assert torch.equal(a[key], init[key]) and torch.equal(b[key], init[key]), key
