"""Tests of `netvlad_tutorial.model`, each against an independent computation."""

import math
import urllib.request
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from netvlad_tutorial import centroids as centroids_module
from netvlad_tutorial.backbone import IMAGENET_URL, build_encoder, vgg16_features
from netvlad_tutorial.centroids import init_netvlad, kmeans_centroids, sample_local_descriptors
from netvlad_tutorial.model import EmbedNet, build_model, model_config, prepare_for_device
from netvlad_tutorial.netvlad import NetVLAD, assignment_alpha, netvlad_loop
from netvlad_tutorial.pca import fit_pca_whitening
from netvlad_tutorial.utils import display_path

CONV5_LAYERS = (24, 26, 28)  # conv5_1, conv5_2, conv5_3 in `vgg16().features`


def _random_pool(K=8, D=16, bias=False, normalize_input=True, seed=0):
    """A NetVLAD layer with random (not k-means) conv weights and centroids."""
    torch.manual_seed(seed)
    pool = NetVLAD(K, D, normalize_input=normalize_input, bias=bias)
    with torch.no_grad():
        pool.conv.weight.normal_(0, 1)
        pool.centroids.normal_(0, 0.3)
        if bias:
            pool.conv.bias.normal_(0, 1)
    return pool


def _local_descriptors(feats):
    """L2-normalized local descriptors (B*H*W, D) of feature maps (B, D, H, W)."""
    return F.normalize(feats, dim=1).flatten(2).transpose(1, 2).reshape(-1, feats.shape[1])


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def test_encoder_is_torchvision_vgg16_cut_at_conv5_3():
    torch.manual_seed(0)
    encoder = build_encoder()
    reference = torchvision.models.vgg16(weights=None).features[:-2]
    assert repr(encoder) == repr(reference)
    assert encoder.state_dict().keys() == reference.state_dict().keys()
    assert isinstance(encoder[-1], nn.Conv2d) and encoder[-1].out_channels == 512
    for layer in encoder:  # torchvision's init: kaiming normal (fan_out, ReLU), zero bias
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.out_channels * 9
            assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
            assert torch.all(layer.bias == 0)


def test_encoder_weights_equal_torchvisions_bit_for_bit_for_a_seed():
    """The hand-built VGG16 features: torchvision's layers, init and random draws, in order.

    (`vgg16()` itself draws its classifier's weights between the layers and their kaiming
    init, so its features differ for a seed; the reference is its `make_layers` + init.)
    """
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(3)
    ours = vgg16_features().state_dict()
    after_ours = torch.randn(4)
    torch.manual_seed(3)
    reference = make_layers(cfgs["D"])
    for m in reference.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(after_ours, torch.randn(4))  # the same number of draws


def test_imagenet_url_is_torchvisions():
    assert IMAGENET_URL == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url


@pytest.mark.parametrize("size", [(64, 80), (96, 128), (120, 160)])
def test_shapes_at_several_resolutions(size):
    H, W = size
    torch.manual_seed(0)
    model = build_model(num_clusters=8).eval()
    images = torch.randn(1, 3, H, W)
    with torch.no_grad():
        feats = model.encoder(images)
        assert feats.shape == (1, 512, H // 16, W // 16)
        assert model.pool.soft_assign(feats).shape == (1, 8, H // 16, W // 16)
        assert model(images).shape == (1, 8 * 512) and model.out_dim == 8 * 512


def _block_hub(monkeypatch, hub_dir):
    """Point torch hub at `hub_dir` and make every download path raise."""
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def test_imagenet_weights_missing_warns_and_stays_offline(monkeypatch, tmp_path):
    _block_hub(monkeypatch, tmp_path)
    expected = tmp_path / "checkpoints" / "vgg16-397923af.pth"
    with pytest.warns(UserWarning) as record:
        encoder = build_encoder(weights="imagenet")
    assert len(record) == 1
    assert str(record[0].message) == (
        f"ImageNet weights for VGG16 not found at {display_path(expected)} (`python -m "
        "netvlad_tutorial weights download imagenet` puts them there); continuing with random "
        "initialization")
    assert encoder.weights_source == "random"
    assert all(p.requires_grad for p in encoder.parameters())  # random: train everything


def test_imagenet_weights_from_hub_cache_freeze_before_conv5(monkeypatch, tmp_path):
    _block_hub(monkeypatch, tmp_path)
    torch.manual_seed(1)
    source = build_encoder()
    state = {f"features.{k}": v for k, v in source.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a whole-model file also has these
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "vgg16-397923af.pth")

    encoder = build_encoder(weights="imagenet")
    assert encoder.weights_source == "imagenet"
    for k, v in source.state_dict().items():
        assert torch.equal(encoder.state_dict()[k], v)
    trainable = {int(n.split(".")[0]) for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == set(CONV5_LAYERS)
    num_trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert num_trainable == 3 * (512 * 512 * 9 + 512)
    assert all(p.requires_grad for p in build_encoder("imagenet", trainable="all").parameters())


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(2)
    source = build_encoder()
    path = tmp_path / "encoder.pth"
    torch.save(source.state_dict(), path)  # features-only keys: '0.weight' ...
    encoder = build_encoder(weights=path)
    assert encoder.weights_source == str(path)
    for k, v in source.state_dict().items():
        assert torch.equal(encoder.state_dict()[k], v)
    assert not encoder[0].weight.requires_grad and encoder[28].weight.requires_grad


def test_bad_weights_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_encoder(weights=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth.*features\.0\.weight"):
        build_encoder(weights=wrong)


# ---------------------------------------------------------------------------------------------
# NetVLAD layer
# ---------------------------------------------------------------------------------------------


def test_netvlad_matches_brute_force_on_a_tiny_case():
    pool = _random_pool(K=2, D=3)
    x = torch.randn(1, 3, 2, 2)
    w = pool.conv.weight.detach().numpy()[:, :, 0, 0]  # (K, D)
    c = pool.centroids.detach().numpy()  # (K, D)
    vlad = np.zeros((2, 3))
    for i in range(2):
        for j in range(2):
            xn = x[0, :, i, j].numpy() / np.linalg.norm(x[0, :, i, j].numpy())
            a = np.exp(w @ xn) / np.exp(w @ xn).sum()
            for k in range(2):
                vlad[k] += a[k] * (xn - c[k])
    vlad /= np.linalg.norm(vlad, axis=1, keepdims=True)
    expected = vlad.ravel() / np.linalg.norm(vlad)
    np.testing.assert_allclose(pool(x)[0].detach().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("bias, normalize_input", [(False, True), (True, True), (False, False)])
def test_vectorized_equals_loop_forward_and_gradients(bias, normalize_input):
    pool = _random_pool(K=8, D=16, bias=bias, normalize_input=normalize_input)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    weights = torch.randn(2, 8 * 16)  # a random linear loss

    grads = []
    for fn in (pool, lambda x: netvlad_loop(x, pool.conv, pool.centroids, normalize_input)):
        pool.zero_grad()
        x.grad = None
        out = fn(x)  # `out`: (2, K*D)
        (out * weights).sum().backward()
        grads.append([out.detach(), x.grad.clone(), pool.conv.weight.grad.clone(),
                      pool.centroids.grad.clone()])
        if bias:
            grads[-1].append(pool.conv.bias.grad.clone())
    for vectorized, loop in zip(*grads):
        torch.testing.assert_close(vectorized, loop, atol=1e-5, rtol=1e-4)


def test_output_unit_norm_and_intra_normalized():
    K, D = 8, 16
    pool = _random_pool(K, D)
    out = pool(torch.randn(3, D, 4, 6))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # Every cluster gets some weight (softmax > 0), so each block has norm 1/sqrt(K).
    torch.testing.assert_close(out.view(3, K, D).norm(dim=2), torch.full((3, K), K**-0.5))


def test_soft_assign_is_softmax_of_alpha_cosines():
    pool = NetVLAD(num_clusters=4, dim=6)
    centroids = torch.randn(4, 6)
    pool.set_centroids(centroids, alpha=7.0)
    x = torch.randn(2, 6, 3, 5)
    a = pool.soft_assign(x)  # (B, K, H, W)
    cos = np.einsum("bdhw,kd->bkhw", F.normalize(x, dim=1).numpy(),
                    F.normalize(centroids, dim=1).numpy())
    expected = np.exp(7.0 * cos) / np.exp(7.0 * cos).sum(1, keepdims=True)
    np.testing.assert_allclose(a.detach().numpy(), expected, atol=1e-6)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 3, 5))


def test_init_params_hand_built_alpha_and_weights():
    centroids = np.array([[2.0, 0.0], [0.0, 3.0]])  # normalized: e1, e2
    # Dot products (1, 0) and (0.6, 0.8): top1 - top2 = 1 and 0.2, mean 0.6.
    descriptors = np.array([[1.0, 0.0], [0.6, 0.8]])
    alpha = math.log(100) / 0.6
    assert assignment_alpha(centroids, descriptors) == pytest.approx(alpha)

    pool = NetVLAD(num_clusters=2, dim=2, bias=True)
    pool.init_params(centroids, descriptors)
    assert pool.alpha == pytest.approx(alpha)
    expected = torch.tensor([[alpha, 0.0], [0.0, alpha]])
    torch.testing.assert_close(pool.conv.weight[:, :, 0, 0].detach(), expected)
    torch.testing.assert_close(pool.conv.bias.detach(), torch.zeros(2))
    torch.testing.assert_close(pool.centroids.detach(), torch.tensor(centroids).float())
    with pytest.raises(ValueError, match=r"\(K, D\) = \(2, 2\)"):
        pool.set_centroids(np.zeros((3, 2)), 1.0)


# ---------------------------------------------------------------------------------------------
# k-means initialization
# ---------------------------------------------------------------------------------------------


def test_kmeans_centroids_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    means = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    descs = (means[rng.integers(0, 3, 600)] + 0.1 * rng.standard_normal((600, 4)))
    centroids = kmeans_centroids(descs, k=3, iters=20, seed=0)
    assert centroids.dtype == np.float32 and centroids.shape == (3, 4)
    order = np.argsort(centroids.argmax(1))  # sort the clusters by their largest axis
    np.testing.assert_allclose(centroids[order], means, atol=0.05)
    np.testing.assert_array_equal(kmeans_centroids(descs, k=3, iters=20, seed=0), centroids)


Db = namedtuple("Db", "numDb dataset whichSet")


class ColorDataset(torch.utils.data.Dataset):
    """Database images with positive colors, then query images with negative ones."""

    def __init__(self, num_db=6, num_q=4, size=(8, 8), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(num_db + num_q, 3, *size, generator=g) + 0.1
        self.images[num_db:] *= -1
        self.db = Db(num_db, "colors", "train")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


def _identity_encoder():
    """A 1x1 convolution that returns its input: local descriptors = pixel colors."""
    encoder = nn.Conv2d(3, 3, kernel_size=1, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(3)[:, :, None, None])
    return encoder


def test_sample_local_descriptors_from_database_pixels():
    dataset = ColorDataset()
    descs = sample_local_descriptors(_identity_encoder(), dataset, num_images=4, per_image=10,
                                     batch_size=3, precision="fp32", seed=0)
    assert descs.dtype == np.float32 and descs.shape == (4 * 10, 3)
    np.testing.assert_allclose(np.linalg.norm(descs, axis=1), 1, atol=1e-6)
    db_pixels = dataset.images[:6].permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    db_pixels /= np.linalg.norm(db_pixels, axis=1, keepdims=True)
    # Every descriptor is a (normalized) database pixel, never a query one, never twice.
    dist = np.linalg.norm(descs[:, None] - db_pixels[None], axis=2)  # (40, 6*64)
    assert dist.min(1).max() < 1e-6
    assert len(np.unique(dist.argmin(1))) == 40
    again = sample_local_descriptors(_identity_encoder(), dataset, num_images=4, per_image=10,
                                     batch_size=2, precision="fp32", seed=0)
    np.testing.assert_array_equal(again, descs)


def _tiny_model(K=2, seed=0):
    """An `EmbedNet` with a 4-channel stride-4 encoder (fast stand-in for VGG16)."""
    torch.manual_seed(seed)
    return EmbedNet(nn.Conv2d(3, 4, kernel_size=4, stride=4), NetVLAD(K, 4))


def test_init_netvlad_computes_then_loads_cache(tmp_path, monkeypatch):
    dataset = ColorDataset(size=(16, 16))
    path = tmp_path / "centroids.pt"
    model = _tiny_model()
    kwargs = dict(num_images=5, per_image=8, iters=10, seed=3, precision="fp32")
    init = init_netvlad(model, dataset, cache_path=path, **kwargs)
    assert path.exists() and init["path"] == path

    descs = sample_local_descriptors(model.encoder, dataset, 5, 8, precision="fp32", seed=3)
    centroids = kmeans_centroids(descs, k=2, iters=10, seed=3)
    np.testing.assert_allclose(model.pool.centroids.detach().numpy(), centroids)
    assert model.pool.alpha == pytest.approx(assignment_alpha(centroids, descs))
    assert init["num_descriptors"] == 40

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(centroids_module, "sample_local_descriptors", no_sampling)
    fresh = _tiny_model()
    init_netvlad(fresh, dataset, cache_path=path, **kwargs)
    for name, value in model.pool.state_dict().items():
        torch.testing.assert_close(fresh.pool.state_dict()[name], value)


def test_init_netvlad_without_a_cache_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path / "cache"))
    kwargs = dict(num_images=5, per_image=8, iters=10, seed=3, precision="fp32")
    init = init_netvlad(_tiny_model(), ColorDataset(size=(16, 16)), **kwargs)
    assert init["path"] is None and not (tmp_path / "cache").exists()
    cached = _tiny_model()
    init_netvlad(cached, ColorDataset(size=(16, 16)), cache_path=tmp_path / "c.pt", **kwargs)
    np.testing.assert_array_equal(init["centroids"], cached.pool.centroids.detach().numpy())


# ---------------------------------------------------------------------------------------------
# Mixed precision, whole model
# ---------------------------------------------------------------------------------------------


def test_netvlad_aggregates_in_float32_under_autocast():
    pool = _random_pool(K=8, D=16)
    x = torch.randn(2, 16, 4, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pool(x.float()), atol=1e-6, rtol=0)


def test_bf16_channels_last_matches_fp32():
    torch.manual_seed(0)

    def smooth_images(n):  # random but image-like: low-frequency color blobs
        return F.interpolate(torch.randn(n, 3, 8, 10), size=(64, 80), mode="bilinear")

    model = build_model(num_clusters=8).eval()
    with torch.no_grad():
        descs = _local_descriptors(model.encoder(smooth_images(8))).numpy()
        model.pool.init_params(kmeans_centroids(descs, k=8, iters=20), descs)
        images = smooth_images(2)
        reference = model(images)  # fp32
        prepare_for_device(model, "cpu", fast=True)
        assert model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(images.contiguous(memory_format=torch.channels_last))
    assert fast.dtype == torch.float32
    assert F.cosine_similarity(fast, reference).min() >= 0.999


def test_build_model_with_pca_and_config():
    torch.manual_seed(0)
    model = build_model(num_clusters=4, pca_dim=16)
    assert model.out_dim == 16
    assert not any(p.requires_grad for p in model.pca.parameters())
    out = model(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert model_config(model) == {"encoder": "vgg16_conv5", "dim": 512, "num_clusters": 4,
                                   "normalize_input": True, "bias": False, "pca_dim": 16}
    model.pca = None
    assert model.out_dim == 4 * 512 and model_config(model)["pca_dim"] is None


# ---------------------------------------------------------------------------------------------
# PCA whitening
# ---------------------------------------------------------------------------------------------


def _check_whitening(X, out_dim):
    """Fit on `X` (N, D); compare with NumPy's eigendecomposition of the sample covariance."""
    pca = fit_pca_whitening(X, out_dim)
    Y = pca.linear(torch.as_tensor(X, dtype=torch.float32)).double().numpy()  # (N, out_dim)
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(out_dim), atol=1e-3)
    lam, U = np.linalg.eigh(np.cov(X, rowvar=False))  # ascending
    top = U[:, ::-1][:, :out_dim]  # (D, out_dim)
    W = pca.linear.weight.double().numpy()  # (out_dim, D)
    cos = np.abs(np.sum(W / np.linalg.norm(W, axis=1, keepdims=True) * top.T, axis=1))
    np.testing.assert_allclose(cos, 1, atol=1e-4)  # same directions (up to sign)
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), lam[::-1][:out_dim] ** -0.5,
                               rtol=1e-4)
    out = pca(torch.as_tensor(X, dtype=torch.float32))
    torch.testing.assert_close(out, F.normalize(torch.as_tensor(Y, dtype=torch.float32), dim=1),
                               atol=1e-5, rtol=1e-4)


def test_pca_whitening_decorrelates_correlated_gaussian():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4000, 6)) @ rng.standard_normal((6, 6)) + rng.standard_normal(6)
    _check_whitening(X, out_dim=4)


def test_pca_whitening_with_fewer_descriptors_than_dimensions():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, 50)) * np.linspace(3, 0.5, 50) + 1.0  # N < D
    _check_whitening(X, out_dim=10)
    _check_whitening(X, out_dim=19)
    with pytest.raises(ValueError, match="min\\(N - 1, D\\) = 19"):
        fit_pca_whitening(X, 20)
