"""The untrained model without k-means: random centroids, seeded, and no k-means run."""

import pytest
import torch

from netvlad_tutorial import centroids, data, model, netvlad
from netvlad_tutorial import config as cf


def _micro_config(city):
    return cf.PRESETS["tiny-random"].replace(
        data_root=str(city), image_size=(32, 48), num_clusters=4, kmeans_images=20,
        kmeans_per_image=4, kmeans_iters=10, precision="fp32", device="cpu")


def test_random_netvlad_is_seeded_uniform():
    pool = netvlad.NetVLAD(num_clusters=3, dim=5)
    centroids.random_netvlad(pool, seed=7)
    expected = torch.rand(3, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(pool.centroids.detach(), expected, rtol=0, atol=0)
    unit = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(pool.conv.weight.detach()[:, :, 0, 0], 100 * unit)
    other = centroids.random_netvlad(netvlad.NetVLAD(num_clusters=3, dim=5), seed=8)
    assert not torch.equal(other.centroids, pool.centroids)


def test_make_model_random_init_runs_no_kmeans(micro_city, monkeypatch):
    config = _micro_config(micro_city)
    split = data.load_split(micro_city, "train")
    kmeans = model.make_model(config, split, torch.device("cpu"))

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran")

    monkeypatch.setattr(model, "init_netvlad", no_kmeans)
    monkeypatch.setattr(centroids, "kmeans_centroids", no_kmeans)
    first, second = (model.make_model(config, split, torch.device("cpu"), init="random")
                     for _ in range(2))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    expected = torch.rand(4, 512, generator=torch.Generator().manual_seed(config.seed))
    torch.testing.assert_close(first.pool.centroids.detach(), expected, rtol=0, atol=0)
    # The same encoder as the k-means model; only the centroids differ.
    for (name, a), b in zip(first.encoder.state_dict().items(),
                            kmeans.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(first.pool.centroids, kmeans.pool.centroids)
    with pytest.raises(ValueError, match="init"):
        model.make_model(config, split, torch.device("cpu"), init="none")
