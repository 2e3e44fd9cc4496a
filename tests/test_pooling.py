"""The poolings of the "why NetVLAD" ablation, each against a plain loop or a hand-built case."""

import math

import numpy as np
import pytest
import torch

from netvlad_tutorial.netvlad import NetVLAD, netvlad_loop
from netvlad_tutorial.pooling import (
    average_pool,
    gem_pool,
    max_pool,
    pool,
    pool_features,
    vlad_pool,
)


def features(n=3, d=4, h=2, w=3, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    if positive:  # in [0.1, 1]: x^p neither overflows nor vanishes in float64 up to p = 128
        return 0.1 + 0.9 * torch.rand(n, d, h, w, generator=g, dtype=torch.float64)
    return torch.randn(n, d, h, w, generator=g, dtype=torch.float64)


def unit(v):
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def loop_pool(x, reduce):
    """Per image and channel, `reduce` of the h*w responses, then L2-normalized."""
    out = []
    for img in x.tolist():
        out.append(unit([reduce([r for row in channel for r in row]) for channel in img]))
    return torch.tensor(out, dtype=torch.float64)


def test_average_and_max_against_loops():
    x = features()
    torch.testing.assert_close(average_pool(x), loop_pool(x, lambda r: sum(r) / len(r)))
    torch.testing.assert_close(max_pool(x), loop_pool(x, max))


def test_gem_against_loop_and_its_limits():
    x = features(positive=True)
    gem3 = loop_pool(x, lambda r: (sum(v ** 3 for v in r) / len(r)) ** (1 / 3))
    torch.testing.assert_close(gem_pool(x, p=3), gem3)
    torch.testing.assert_close(gem_pool(x, p=1), average_pool(x))
    errors = [(gem_pool(x, p=p) - max_pool(x)).abs().max().item() for p in (2, 16, 128)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3
    # negatives are clamped: GeM of a map with negatives equals GeM of its ReLU
    y = features(seed=1)
    torch.testing.assert_close(gem_pool(y), gem_pool(y.clamp_min(0)))


def layer_2d(num_clusters=2):
    """A NetVLAD layer in 2-D with centroids (1, 0), (0, 1) (and (0, -1))."""
    layer = NetVLAD(num_clusters=num_clusters, dim=2, alpha=10.0)
    layer.set_centroids(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]][:num_clusters]), 10.0)
    return layer


def test_hard_vlad_by_hand():
    # three unit descriptors: (0.6, 0.8) -> cluster 1; (0.8, 0.6) and (1, 0) -> cluster 0
    x = torch.tensor([[[[0.6, 0.8, 1.0]], [[0.8, 0.6, 0.0]]]])  # (1, D=2, h=1, w=3)
    # residuals: cluster 0: (0.8 - 1, 0.6) + (0, 0) = (-0.2, 0.6); cluster 1: (0.6, 0.8 - 1)
    with torch.no_grad():
        raw = vlad_pool(x, layer_2d(), hard=True, intra_norm=False)
        intra = vlad_pool(x, layer_2d(), hard=True)
        empty = vlad_pool(x, layer_2d(3), hard=True)
    torch.testing.assert_close(raw[0], torch.tensor(unit([-0.2, 0.6, 0.6, -0.2])))
    expected = [v / math.sqrt(2) for v in unit([-0.2, 0.6]) + unit([0.6, -0.2])]
    torch.testing.assert_close(intra[0], torch.tensor(expected))
    # a cluster nobody is assigned to stays zero
    torch.testing.assert_close(empty[0], torch.tensor(expected + [0.0, 0.0]))


def vlad_loop(x, layer, hard, intra_norm):
    """VLAD with explicit loops over images, positions and clusters."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    centroids, weight = layer.centroids.detach(), layer.conv.weight.detach()[:, :, 0, 0]
    out = []
    for img in x:
        n, d, k = img.shape[1] * img.shape[2], img.shape[0], layer.num_clusters
        descs = img.reshape(d, n).T
        vlad = torch.zeros(k, d)
        for desc in descs:
            scores = weight @ desc
            a = torch.zeros(k)
            if hard:
                a[int(scores.argmax())] = 1
            else:
                a = torch.softmax(scores, 0)
            for c in range(k):
                vlad[c] += a[c] * (desc - centroids[c])
        if intra_norm:
            vlad = torch.stack([v / v.norm() if v.norm() > 0 else v for v in vlad])
        out.append(vlad.flatten() / vlad.norm())
    return torch.stack(out)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("intra_norm", [False, True])
def test_vlad_against_loop(hard, intra_norm):
    torch.manual_seed(0)
    layer = NetVLAD(num_clusters=5, dim=4, alpha=3.0)
    x = features(n=2, d=4, h=3, w=3).float()
    with torch.no_grad():
        got = vlad_pool(x, layer, hard=hard, intra_norm=intra_norm)
    torch.testing.assert_close(got, vlad_loop(x, layer, hard, intra_norm))


def test_netvlad_is_the_layer_and_hard_vlad_its_sharp_limit():
    torch.manual_seed(0)
    layer = NetVLAD(num_clusters=5, dim=4, alpha=3.0)
    x = features(n=2, d=4, h=3, w=3).float()
    with torch.no_grad():
        torch.testing.assert_close(vlad_pool(x, layer), layer(x))
        torch.testing.assert_close(vlad_pool(x, layer), netvlad_loop(x, layer.conv,
                                                                     layer.centroids))
        hard = vlad_pool(x, layer, hard=True)
        layer.conv.weight.mul_(1e4)  # α -> inf: the softmax becomes the argmax
        torch.testing.assert_close(vlad_pool(x, layer), hard)


def test_pool_features_batches_cached_float16_features():
    torch.manual_seed(0)
    layer = NetVLAD(num_clusters=3, dim=4, alpha=3.0)
    cached = features(n=5, d=4).numpy().astype(np.float16)
    x = torch.from_numpy(cached.astype(np.float32))
    for method in ("average", "max", "gem", "hard-vlad", "netvlad"):
        out = pool_features(cached, method, layer, batch_size=2)
        with torch.no_grad():
            np.testing.assert_allclose(out, pool(x, method, layer).numpy(), atol=1e-6)
        assert out.dtype == np.float32 and len(out) == 5
    assert pool_features(cached, "netvlad", layer, intra_norm=False).shape == (5, 12)
    with pytest.raises(ValueError, match="layer"):
        pool(x, "netvlad")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(x, "sum")
