"""Stage 2: the network. VGG16-conv5 encoder, NetVLAD pooling, k-means init, PCA whitening.

Reads top to bottom like the course: encoder -> NetVLAD layer (a per-cluster loop, then the same
thing as one matrix product) -> k-means initialization -> PCA whitening and the whole model ->
the model of a run (`make_model`, its centroid cache) -> loading released weights and this
project's checkpoints.
"""

import contextlib
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from . import __version__, distributed
from .config import MAX_CLUSTERS, TRAINABLE, ArgumentError, TrainConfig
from .data import data_fingerprint, whole_dataset
from .features import as_precision, run_inference
from .utils import (
    atomic_save,
    cache_dir,
    display_path,
    load_torch_file,
    progress_hidden,
    resolve_precision,
)

# torchvision's `VGG16_Weights.IMAGENET1K_V1.url` (a test checks it), named here so that the
# package never imports torchvision: its import alone costs seconds in every process.
IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# VGG16 ("configuration D" of Simonyan & Zisserman, 2015): conv widths, "M" a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M")


def _autocast_off(x):
    """A context with autocast off on `x`'s device: the code inside runs in float32.

    On the "meta" device (shapes only, no autocast there) it does nothing.
    """
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Encoder: VGG16 up to conv5_3
# ---------------------------------------------------------------------------------------------


def imagenet_weights_path():
    """Where torchvision keeps its VGG16 ImageNet file: `<torch hub dir>/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_URL).path).name


def vgg16_features():
    """torchvision's `vgg16().features`, built without its 123M-parameter classifier.

    The same modules in the same order (so the same indices `features.0` ... `features.30` and
    the same random draws for a seed) and the same initialization; a test compares them.
    """
    layers, channels = [], 3
    for width in VGG16_LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # torchvision's VGG initialization
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def _load_vgg_state(encoder, path):
    """Copy the conv weights of a VGG16 state dict file (model or features) into `encoder`."""
    layout = ("a VGG16 state dict with keys 'features.0.weight' ... (torchvision vgg16) "
              "or '0.weight' ... '28.bias' (its features only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: expected {layout} ({e})") from e
    expected = encoder.state_dict().keys()
    if isinstance(state, dict):
        for prefix in ("features.", "encoder.", ""):
            sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if expected <= sub.keys():
                try:
                    encoder.load_state_dict({k: sub[k] for k in expected})
                except RuntimeError as e:
                    raise ValueError(f"{path} does not fit VGG16: expected {layout} ({e})") from e
                return
    found = sorted(state)[:3] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path} is not {layout}; found {found}")


@dataclass(frozen=True)
class Backbone:
    """An encoder the model can be built on: one entry of `BACKBONES`.

    Attributes:
        name: its key in `BACKBONES`, `TrainConfig.backbone` and checkpoints' `model_config`.
        build: () -> `nn.Sequential`, images (B, 3, H, W) -> local features (B, D, h, w),
            randomly initialized (under the caller's torch seed).
        channels: D, the channels of its local features.
        tail: its last `tail` modules are the block that `trainable="conv5"` trains (VGG16:
            conv5_1, ReLU, conv5_2, ReLU, conv5_3); the modules before are its frozen prefix.
        load: (encoder, path) -> None, copies a weights file into a built encoder.
        imagenet_path: () -> the `Path` of its ImageNet weights; None: it has none.
        label: its name in messages (default: `name`).
    """

    name: str
    build: Callable
    channels: int
    tail: int
    load: Callable | None = None
    imagenet_path: Callable | None = None
    label: str = ""

    def split(self, encoder):
        """(prefix, tail) of a built `encoder`: the layers before the last block, and it."""
        return encoder[:-self.tail], encoder[-self.tail:]


BACKBONES = {}


def register_backbone(backbone):
    """Add `backbone` (a `Backbone`) to `BACKBONES`; returns it."""
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name):
    """The registered `Backbone` called `name`, with a clear error for an unknown one."""
    if name not in BACKBONES:
        raise ArgumentError(f"unknown backbone {name!r} (the `backbone` setting); registered: "
                            f"{', '.join(BACKBONES)}", backbone="`backbone`")
    return BACKBONES[name]


# VGG16 up to conv5_3, before its ReLU and pool5: 512 channels at stride 16.
VGG16 = register_backbone(Backbone("vgg16_conv5", lambda: vgg16_features()[:-2], channels=512,
                                   tail=5, load=_load_vgg_state,
                                   imagenet_path=imagenet_weights_path, label="VGG16"))


SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
SHIPPED = {"world": "vgg16_world.pth"}  # encoder weights shipped in the package (`pretrain`)


def shipped_weights(name="world"):
    """(path, provenance) of encoder weights shipped in the package, their sha256 checked.

    The provenance (`<file>.json`, written by `pretrain.export_encoder`) records the command,
    the commit, the hardware and the time that made the file.
    """
    path = SHIPPED_DIR / SHIPPED[name]
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        raise FileNotFoundError(
            f"the pretrained encoder {name!r} is not in this copy of the package (expected "
            f"{display_path(path)} and {record.name}): make one with `python -m "
            "netvlad_tutorial pretrain` and give its vgg16_world.pth as the weights file")
    provenance = json.loads(record.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != provenance.get("sha256"):
        raise ValueError(f"{path}: its sha256 {digest[:12]}... is not the {record.name} record "
                         f"{str(provenance.get('sha256'))[:12]}...: the file is damaged; "
                         "reinstall the package")
    return path, provenance


def build_encoder(weights=None, trainable=None, backbone="vgg16_conv5"):
    """The encoder of `backbone` (default: VGG16 up to conv5_3, 512 channels at stride 16).

    Args:
        weights: None (random), "imagenet" (torchvision's file, used only if it is already on
            this machine: nothing is downloaded), "world" (the encoder pretrained on the
            synthetic world, shipped in the package: `shipped_weights`) or the path of a local
            state dict.
        trainable: "all" (every layer trains), "conv5" (only the backbone's last block,
            conv5_1..conv5_3 for VGG16, as the reference) or "netvlad" (no encoder layer: a
            frozen encoder). None: "conv5" with loaded weights, "all" with random ones.
        backbone: a name in `BACKBONES`.

    Returns:
        `nn.Sequential` with `weights_source` ("random", "imagenet" or the file), `name` and
        `backbone` (its `Backbone`).
    """
    spec = get_backbone(backbone)
    encoder = spec.build()
    source = "random"
    if weights == "imagenet":
        path = spec.imagenet_path() if spec.imagenet_path else None
        if path is not None and path.is_file():
            spec.load(encoder, path)
            source = "imagenet"
        elif path is None:
            warnings.warn(f"{spec.label or spec.name} has no ImageNet weights; continuing with "
                          "random initialization", stacklevel=2)
        else:
            warnings.warn(f"ImageNet weights for {spec.label or spec.name} not found at "
                          f"{display_path(path)} (`python -m netvlad_tutorial weights download "
                          "imagenet` puts them there); continuing with random initialization",
                          stacklevel=2)
    elif weights in SHIPPED:
        path, _ = shipped_weights(weights)
        spec.load(encoder, path)
        source = weights
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights {path} not found (expected a {spec.name} "
                                    "state dict saved with torch.save)")
        spec.load(encoder, path)
        source = str(path)
    if trainable is None:
        trainable = "all" if source == "random" else "conv5"
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}")
    prefix, tail = spec.split(encoder)
    prefix.requires_grad_(trainable == "all")  # everything before the last block
    tail.requires_grad_(trainable != "netvlad")  # the last block (VGG16: conv5_1..conv5_3)
    encoder.weights_source, encoder.name, encoder.backbone = source, spec.name, spec
    return encoder


# ---------------------------------------------------------------------------------------------
# NetVLAD layer
# ---------------------------------------------------------------------------------------------


def netvlad_loop(x, conv, centroids, normalize_input=True):
    """NetVLAD written as a plain loop over clusters (the reference the layer is tested against).

    Args:
        x: local descriptors (B, D, H, W).
        conv: the soft-assignment 1x1 convolution, D -> K channels.
        centroids: (K, D).
    """
    if normalize_input:
        x = F.normalize(x, dim=1)  # `x`: (B, D, H, W), unit length along D
    a = F.softmax(conv(x), dim=1).flatten(2)  # `a`: (B, K, H*W), sums to 1 over K
    x = x.flatten(2)  # `x`: (B, D, H*W)
    vlad = []
    for k in range(centroids.shape[0]):
        residual = x - centroids[k][None, :, None]  # `residual`: (B, D, H*W)
        vlad.append((a[:, k:k + 1] * residual).sum(2))  # (B, D)
    vlad = torch.stack(vlad, dim=1)  # `vlad`: (B, K, D)
    vlad = F.normalize(vlad, dim=2)  # intra-normalization
    return F.normalize(vlad.flatten(1), dim=1)  # (B, K*D)


def assignment_alpha(centroids, descriptors):
    """The reference α = −ln(0.01) / mean(top1 − top2) of descriptor·centroid dot products.

    At the mean gap, the second-nearest centroid gets 1/100 of the nearest one's weight.

    Args:
        centroids: (K, D), normalized here.
        descriptors: (N, D) local descriptors (L2-normalized, as the layer sees them).
    """
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)  # `c`: (K, D)
    dots = np.sort(np.asarray(descriptors, dtype=np.float64) @ c.T, axis=1)  # `dots`: (N, K)
    return float(-np.log(0.01) / np.mean(dots[:, -1] - dots[:, -2]))


class NetVLAD(nn.Module):
    """NetVLAD pooling: soft-assigned residuals to K centroids, intra- then L2-normalized.

    Args:
        num_clusters: K, the number of centroids.
        dim: D, the channels of the local descriptors.
        alpha: sharpness of the soft-assignment to the initial (random) centroids; k-means
            initialization (`init_params`) replaces both.
        normalize_input: L2-normalize each local descriptor first (as the reference).
        bias: give the assignment convolution a bias (the reference, NetVLAD v1, has none).
    """

    def __init__(self, num_clusters=64, dim=512, alpha=100.0, normalize_input=True, bias=False):
        super().__init__()
        self.num_clusters, self.dim, self.normalize_input = num_clusters, dim, normalize_input
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=bias)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))  # `centroids`: (K, D)
        self.set_centroids(self.centroids.detach(), alpha)

    def set_centroids(self, centroids, alpha):
        """Set the centroids and the assignment weights α·(normalized centroid), bias 0."""
        centroids = torch.as_tensor(centroids, dtype=torch.float32)  # `centroids`: (K, D)
        if centroids.shape != self.centroids.shape:
            raise ValueError(f"centroids of shape {tuple(centroids.shape)} given, this layer "
                             f"expects (K, D) = {tuple(self.centroids.shape)}")
        weight = alpha * F.normalize(centroids, dim=1)[:, :, None, None]  # (K, D, 1, 1)
        with torch.no_grad():
            self.centroids.copy_(centroids)
            self.conv.weight.copy_(weight)
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        self.alpha = float(alpha)

    def init_params(self, centroids, descriptors):
        """Initialize from k-means `centroids` (K, D) and the `descriptors` (N, D) they fit."""
        self.set_centroids(centroids, assignment_alpha(centroids, descriptors))

    def _assign(self, x):
        """`x` in float32, L2-normalized if `normalize_input`, and its soft-assignment."""
        x = x.float()
        if self.normalize_input:
            x = F.normalize(x, dim=1)  # `x`: (B, D, H, W), unit length along D
        return x, F.softmax(self.conv(x), dim=1)  # `a`: (B, K, H, W)

    def soft_assign(self, x):
        """Weight of each cluster at each position (B, K, H, W) of local descriptors `x`."""
        with _autocast_off(x):
            return self._assign(x)[1]

    def forward(self, x):
        """VLAD vectors (B, K*D) of local descriptors `x` (B, D, H, W), computed in float32."""
        with _autocast_off(x):
            x, a = self._assign(x)
            x, a = x.flatten(2), a.flatten(2)  # `x`: (B, D, N), `a`: (B, K, N) with N = H*W
            # sum_n a_kn (x_n - c_k) = sum_n a_kn x_n - (sum_n a_kn) c_k, for all k at once
            vlad = a @ x.transpose(1, 2) - a.sum(2, keepdim=True) * self.centroids  # (B, K, D)
            vlad = F.normalize(vlad, dim=2)  # intra-normalization
            return F.normalize(vlad.flatten(1), dim=1)  # (B, K*D)


# ---------------------------------------------------------------------------------------------
# k-means initialization
# ---------------------------------------------------------------------------------------------


def _num_db(dataset):
    """Number of database images: `dataset.db.numDb`, or the whole dataset without `.db`."""
    db = getattr(dataset, "db", None)
    return int(db.numDb) if db is not None else len(dataset)


class _UnitLocalDescriptors(nn.Module):
    """`encoder`'s local descriptors as rows: (B, 3, H, W) -> (B, h*w, D), L2-normalized."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        x = self.encoder(images)  # `x`: (B, D, h, w)
        with _autocast_off(x):
            return F.normalize(x.float(), dim=1).flatten(2).transpose(1, 2)  # (B, h*w, D)


def sample_local_descriptors(encoder, dataset, num_images=500, per_image=100, batch_size=16,
                             num_workers=0, device=None, precision=None, seed=0):
    """Random L2-normalized local descriptors from database images, for k-means.

    Reference: 100 random positions from each of 500 random database images. The images are
    encoded by `features.run_inference`, one batch at a time, so that only a batch of whole
    feature maps is held at once.

    Args:
        encoder: images (B, 3, H, W) -> local descriptors (B, D, h, w).
        dataset: items `(image, index)`; images `< dataset.db.numDb` are the database.
        precision: "auto", "fp32", "bf16" or a `utils.Precision` (see `resolve_precision`).

    Returns:
        float32 array (num_images * per_image, D), fewer if the images are fewer or smaller.
    """
    rng = np.random.default_rng(seed)
    num_db = _num_db(dataset)
    images = np.sort(rng.choice(num_db, min(num_images, num_db), replace=False))
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    net = _UnitLocalDescriptors(encoder).train(encoder.training)  # mode restored after each pass
    precision = as_precision(precision, device)  # chosen (and said) before the progress bar
    descs = []
    for start in tqdm(range(0, len(images), batch_size), desc="Local descriptors for k-means",
                      unit="batch", disable=progress_hidden()):
        batch = _Renumbered(dataset, images[start:start + batch_size])
        # Not sharded under torchrun: a rank that finds the centroid cache skips this pass.
        x = run_inference(net, batch, batch_size, num_workers, device, precision,
                          dtype=np.float32, label=None, shard=False)  # `x`: (B, h*w, D)
        for xi in x:  # `xi`: (h*w, D)
            descs.append(xi[rng.choice(len(xi), min(per_image, len(xi)), replace=False)])
    return np.concatenate(descs).astype(np.float32)  # (N, D)


class _Renumbered(Dataset):
    """The items `indices` of `dataset`, renumbered: item i is `(dataset[indices[i]][0], i)`."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])][0], i


def kmeans_centroids(descs, k=64, iters=100, seed=0):
    """K-means centroids (K, D) float32 of `descs` (N, D): k-means++ then `iters` Lloyd steps."""
    from sklearn.cluster import KMeans  # imported here: scikit-learn takes 1-2 s to import

    km = KMeans(n_clusters=k, n_init=1, max_iter=iters, tol=0.0, random_state=seed)
    return km.fit(np.asarray(descs, dtype=np.float32)).cluster_centers_.astype(np.float32)


def init_netvlad(model, dataset, cache_path=None, num_images=500, per_image=100, iters=100,
                 seed=0, batch_size=16, num_workers=0, device=None, precision=None):
    """Initialize `model.pool` by k-means on conv5 descriptors, cached in `cache_path`.

    Loads the cache file when it exists, else samples descriptors, runs k-means, sets α and
    saves the file. Without this step NetVLAD starts from random centroids: one user of
    Nanne/pytorch-NetVlad (issue #72) trained on Pittsburgh without it and got R@1 0.42, against
    about 0.85 with it; notebook 02 (§2.4) compares the two before training on the tiny city.

    Args:
        model: an `EmbedNet`.
        dataset: items `(image, index)`, database first (e.g. the training `WholeDataset`).
        cache_path: the cache file (`centroids_path`); None: computed, not cached.

    Returns:
        dict with `centroids` (K, D), `alpha`, `num_descriptors` and `path`.
    """
    cache_path = Path(cache_path) if cache_path is not None else None
    init = None
    if cache_path is not None and cache_path.exists():
        try:
            init = check_centroid_cache(load_torch_file(cache_path, "centroid cache"),
                                        cache_path, model.pool)
        except ValueError as err:  # a damaged or stale cache file is computed again
            print(f"{err}; computing the centroids again")
    if init is None:
        descs = sample_local_descriptors(model.encoder, dataset, num_images, per_image,
                                         batch_size, num_workers, device, precision, seed)
        centroids = kmeans_centroids(descs, model.pool.num_clusters, iters, seed)
        init = {"centroids": torch.from_numpy(centroids),
                "alpha": assignment_alpha(centroids, descs), "num_descriptors": len(descs)}
        if cache_path is not None:
            try:
                atomic_save(init, cache_path)
            except OSError as err:  # a full or read-only cache folder: not kept, not fatal
                print(f"{err}; the centroids are not cached")
    model.pool.set_centroids(init["centroids"], init["alpha"])
    return {**init, "path": cache_path}


def check_centroid_cache(init, path, pool):
    """`init` read from the centroid cache `path` if it fits `pool`: a dict with `centroids`
    (K, D) finite float, a finite positive `alpha` and `num_descriptors`; else ValueError."""
    want = (pool.num_clusters, pool.dim)
    if not isinstance(init, dict) or not {"centroids", "alpha", "num_descriptors"} <= init.keys():
        keys = sorted(map(str, init)) if isinstance(init, dict) else type(init).__name__
        raise ValueError(f"centroid cache {path} holds {keys}, not centroids, alpha and "
                         "num_descriptors")
    centroids, alpha = init["centroids"], init["alpha"]
    if not torch.is_tensor(centroids) or not centroids.is_floating_point() \
            or tuple(centroids.shape) != want:
        found = tuple(centroids.shape) if torch.is_tensor(centroids) else type(centroids).__name__
        raise ValueError(f"centroid cache {path} holds centroids {found}, not a {want} float "
                         "tensor")
    if not torch.isfinite(centroids).all():
        raise ValueError(f"centroid cache {path} holds NaN or infinite centroids")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"centroid cache {path} holds alpha {alpha!r}, not a positive number")
    return init


def random_netvlad(pool, seed=0, alpha=100.0):
    """Random centroids instead of k-means: what NetVLAD starts from without `init_netvlad`.

    The centroids are uniform in [0, 1)^D, as the layer is built here and in
    Nanne/pytorch-NetVlad (`torch.rand`), drawn from their own generator seeded by `seed`
    (the global random state is left alone); the assignment weights are α·(normalized
    centroid), with the layer's default α = 100.
    """
    g = torch.Generator().manual_seed(seed)
    pool.set_centroids(torch.rand(pool.num_clusters, pool.dim, generator=g), alpha)
    return pool


# ---------------------------------------------------------------------------------------------
# PCA whitening and the whole model
# ---------------------------------------------------------------------------------------------


class PCAWhitening(nn.Module):
    """PCA projection with whitening as a linear layer `W v + b`, then L2-normalization."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim)
        self.linear.requires_grad_(False)  # fitted by `fit_pca_whitening`, not trained

    def forward(self, v):
        """Whitened unit descriptors (B, out_dim) of `v` (B, in_dim), computed in float32."""
        with _autocast_off(v):
            return F.normalize(self.linear(v.float()), dim=1)  # (B, out_dim)


def fit_pca_whitening(descs, out_dim, eps=1e-9):
    """PCA whitening fitted on descriptors `descs` (N, D), as in Relja's NetVLAD (`addPCA`).

    W = diag(1 / sqrt(λ + eps)) Uᵀ and b = −W·mean, with U the top `out_dim` eigenvectors of
    the covariance and λ their eigenvalues, computed in float64. With N < D the eigenvectors
    come from the N×N Gram matrix instead of the D×D covariance.

    Args:
        descs: (N, D) array or tensor (reference: up to 10,000 database descriptors).
        out_dim: at most min(N − 1, D): centered, N descriptors span N − 1 dimensions.
    """
    X = torch.as_tensor(np.asarray(descs)).to(torch.float64, copy=True)  # `X`: (N, D)
    n, d = X.shape
    if not 1 <= out_dim <= min(n - 1, d):
        raise ValueError(f"out_dim={out_dim} must be between 1 and min(N - 1, D) = "
                         f"{min(n - 1, d)} for {n} descriptors of dimension {d}")
    mean = X.mean(0)  # `mean`: (D,)
    X -= mean
    if n < d:
        lam, V = torch.linalg.eigh(X @ X.T / (n - 1))  # `V`: (N, N), λ ascending
        lam, V = lam.flip(0)[:out_dim], V.flip(1)[:, :out_dim]  # `V`: (N, out_dim)
        U = X.T @ V / torch.sqrt(lam * (n - 1))  # `U`: (D, out_dim), unit columns
    else:
        lam, U = torch.linalg.eigh(X.T @ X / (n - 1))  # `U`: (D, D)
        lam, U = lam.flip(0)[:out_dim], U.flip(1)[:, :out_dim]  # `U`: (D, out_dim)
    W = U.T / torch.sqrt(lam + eps)[:, None]  # `W`: (out_dim, D)
    pca = PCAWhitening(d, out_dim)
    with torch.no_grad():
        pca.linear.weight.copy_(W)
        pca.linear.bias.copy_(-W @ mean)
    return pca


class Head(nn.Module):
    """Local features to global descriptors: NetVLAD, then the optional PCA whitening.

    `EmbedNet.head` shares the model's own layers: training the head trains the model.
    """

    def __init__(self, pool, pca=None):
        super().__init__()
        self.pool, self.pca = pool, pca

    def forward(self, x):
        """Descriptors (B, out_dim) of local features `x` (B, D, h, w)."""
        v = self.pool(x)  # `v`: (B, K*D)
        return v if self.pca is None else self.pca(v)  # (B, out_dim)


class EmbedNet(nn.Module):
    """Images to global descriptors: encoder -> NetVLAD -> optional PCA whitening, unit norm."""

    def __init__(self, encoder, pool, pca=None):
        super().__init__()
        self.encoder, self.pool, self.pca = encoder, pool, pca

    @property
    def out_dim(self):
        """Length of the descriptors: K·D, or the PCA dimension."""
        return self.pool.num_clusters * self.pool.dim if self.pca is None else self.pca.out_dim

    @property
    def head(self):
        """Everything after the encoder as one module (`Head`), sharing this model's layers."""
        return Head(self.pool, self.pca)

    @property
    def encoder_frozen(self):
        """True when no encoder weight trains: its output per image never changes."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    def forward(self, images):
        """Descriptors (B, out_dim) of `images` (B, 3, H, W)."""
        x = self.encoder(images)  # `x`: (B, D, H/16, W/16)
        return self.head(x)  # (B, out_dim)


def build_model(num_clusters=64, weights=None, pca_dim=None, trainable=None, alpha=100.0,
                normalize_input=True, bias=False, backbone="vgg16_conv5"):
    """Encoder (VGG16-conv5 by default) + NetVLAD (+ an unfitted PCA whitening layer if
    `pca_dim`).

    Args are those of `build_encoder`, `NetVLAD` and `PCAWhitening`.
    """
    encoder = build_encoder(weights, trainable, backbone)
    dim = get_backbone(backbone).channels  # VGG16: 512
    pool = NetVLAD(num_clusters, dim, alpha, normalize_input, bias)
    pca = PCAWhitening(num_clusters * dim, pca_dim) if pca_dim else None
    return EmbedNet(encoder, pool, pca)


def model_config(model):
    """The architecture of an `EmbedNet` as a plain dict (stored in checkpoints, compared)."""
    return {"encoder": getattr(model.encoder, "name", type(model.encoder).__name__),
            "dim": model.pool.dim, "num_clusters": model.pool.num_clusters,
            "normalize_input": model.pool.normalize_input,
            "bias": model.pool.conv.bias is not None,
            "pca_dim": None if model.pca is None else model.pca.out_dim}


def prepare_for_device(model, device, fast=True):
    """Move `model` to `device`; with `fast`, its encoder in channels_last (for bf16 autocast)."""
    model.to(device)
    if fast:
        model.encoder.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------------------------
# The model of a run: built from its `TrainConfig`, k-means centroids cached
# ---------------------------------------------------------------------------------------------


def centroids_path(config, split):
    """A cache file name for the k-means initialization, keyed by everything it depends on,
    the data included (`data_fingerprint`): a regenerated city gets new centroids."""
    key = [str(Path(split.root).resolve()), split.db.dataset, config.image_size,
           config.weights, config.num_clusters, config.kmeans_images, config.kmeans_per_image,
           config.kmeans_iters, config.seed, data_fingerprint(split)]
    if config.backbone != VGG16.name:  # VGG16's key is unchanged since before the registry
        key.append(config.backbone)
    label, contents = _weights_label(config.weights)
    if contents is not None:  # a weights file: its contents are part of the key
        key.append(contents)
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]
    backbone = "vgg16" if config.backbone == VGG16.name else config.backbone
    name = f"centroids_{backbone}_{label}_{split.db.dataset}"
    return cache_dir() / f"{name}_K{config.num_clusters}_{digest}.pt"


def _weights_label(weights):
    """(a file-name-safe label of `weights`, a key of its file's contents or None).

    "imagenet" and None (random) keep their names; the shipped encoder is keyed by its sha256;
    a weights file by its stem (never its folders: a name cannot leave the cache folder) and its
    resolved path, size and modification time.
    """
    if weights in (None, "imagenet"):
        return weights or "random", None
    if weights in SHIPPED:
        return weights, shipped_weights(weights)[1]["sha256"]
    path = Path(weights)
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:40] or "weights"
    if not path.is_file():
        return label, [str(path)]
    stat = path.stat()
    return label, [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def make_model(config, train_split, device, init="kmeans", precision=None):
    """`config.backbone` (VGG16-conv5) + NetVLAD, with k-means centroids (computed once, then
    cached).

    The random weights are drawn from torch's generator seeded by `config.seed` inside
    `torch.random.fork_rng`: the same weights for a seed, and the global random state is left
    as it was.

    Args:
        train_split: the split to draw k-means descriptors from; None when the weights come
            from a checkpoint (no k-means, no centroid cache, no training data, and no
            pretrained encoder file needed).
        init: "kmeans", or "random" for the same model with random centroids
            (`random_netvlad`, seeded by `config.seed`): no k-means runs.
        precision: the run's `utils.Precision` for k-means' encoder pass; None: resolved from
            `config.precision`.
    """
    if init not in ("kmeans", "random"):
        raise ValueError(f"init must be 'kmeans' or 'random', got {init!r}")
    # Without a train split no pretrained file is read: the checkpoint holds every weight.
    weights = config.weights if train_split is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(num_clusters=config.num_clusters, weights=weights,
                            trainable=config.trainable, backbone=config.backbone)
    model.to(device)
    if train_split is None:
        return model
    if init == "random":
        random_netvlad(model.pool, config.seed)
        return model
    init_netvlad(model, whole_dataset(train_split, config),
                 cache_path=centroids_path(config, train_split),
                 num_images=config.kmeans_images, per_image=config.kmeans_per_image,
                 iters=config.kmeans_iters, seed=config.seed, device=device,
                 precision=precision or resolve_precision(config.precision, device))
    distributed.sync_module(model)  # torchrun: every rank starts from rank 0's weights
    return model


# ---------------------------------------------------------------------------------------------
# Loading released weights: this project's checkpoints, Patch-NetVLAD's, Nanne's
# ---------------------------------------------------------------------------------------------

MODEL_FORMATS = {
    "netvlad_tutorial": "a dict with 'model' (state dict) and 'model_config', written by "
                        "`python -m netvlad_tutorial train`",
    "patchnetvlad": "a dict with 'state_dict' holding 'encoder.*', 'pool.centroids', "
                    "'pool.conv.weight' and 'WPCA.0.weight'/'WPCA.0.bias' (QVPR/Patch-NetVLAD "
                    "pittsburgh_WPCA*.pth.tar, mapillary_WPCA*.pth.tar)",
    "nanne": "a dict with 'state_dict' holding 'encoder.*', 'pool.centroids' and "
             "'pool.conv.weight' (+ 'pool.conv.bias' for vladv2), no WPCA "
             "(Nanne/pytorch-NetVlad checkpoint.pth.tar, model_best.pth.tar)",
}

# Patch-NetVLAD resizes every image to 480 x 640 (H, W) before ToTensor and the ImageNet
# mean/std; Nanne's code reads the Pittsburgh files as they are (640 x 480, no resize).
PATCHNETVLAD_IMAGE_SIZE = (480, 640)


def _strip_module(name):
    """A parameter name without the `module.` parts that `nn.DataParallel` inserts."""
    return ".".join(part for part in name.split(".") if part != "module")


def detect_model_format(obj):
    """The format of a loaded model file (`MODEL_FORMATS` key), from its contents only.

    Raises:
        ValueError listing the keys found and the formats accepted, for anything else.
    """
    if isinstance(obj, dict):
        if "model" in obj and "model_config" in obj:
            return "netvlad_tutorial"
        state = obj.get("state_dict")
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            names = {_strip_module(k) for k in state}
            if "pool.centroids" in names and "pool.conv.weight" in names \
                    and any(n.startswith("encoder.") for n in names):
                if {"WPCA.0.weight", "WPCA.0.bias"} <= names:
                    return "patchnetvlad"
                if not any(n.startswith("WPCA.") for n in names):
                    return "nanne"
    raise ValueError(_unknown_format_message(obj))


def _unknown_format_message(obj, path=None):
    """The error for a file of no known format: the keys it holds, and what is accepted."""
    if isinstance(obj, dict):
        found = f"top-level keys {sorted(map(str, obj))[:20]}"
        state = obj.get("state_dict")
        if isinstance(state, dict):
            found += f", 'state_dict' keys {sorted(map(str, state))[:20]}"
    else:
        found = f"a {type(obj).__name__}, not a dict"
    accepted = "; ".join(f"{name}: {text}" for name, text in MODEL_FORMATS.items())
    where = f"{path}: " if path is not None else ""
    return f"{where}not a model file of a known format (found {found}). Accepted: {accepted}"


def _load_state(module, state, path, what):
    """`module.load_state_dict(state)` (strict), with a ValueError naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: the {what} does not fit this model: {err}") from err


def _released_model(state, path):
    """An `EmbedNet` from a Patch-NetVLAD or Nanne `state_dict` (names without `module.`)."""
    encoder = build_encoder(None)
    enc_state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.")}
    if enc_state.keys() != encoder.state_dict().keys():
        raise ValueError(f"{path}: the encoder is not VGG16 up to conv5_3 (expected keys "
                         f"{sorted(encoder.state_dict())[:4]}..., found "
                         f"{sorted(enc_state)[:4]}...); only VGG16 NetVLAD models load")
    _load_state(encoder, enc_state, path, "encoder")
    centroids = state["pool.centroids"]  # (K, D)
    num_clusters, dim = centroids.shape
    bias = "pool.conv.bias" in state
    pool = NetVLAD(num_clusters, dim, normalize_input=True, bias=bias)
    _load_state(pool, {k.removeprefix("pool."): v for k, v in state.items()
                       if k.startswith("pool.")}, path, "NetVLAD layer")
    pca = None
    if "WPCA.0.weight" in state:
        weight, b = state["WPCA.0.weight"], state["WPCA.0.bias"]  # (P, K*D, 1, 1), (P,)
        if weight.shape[1:] != (num_clusters * dim, 1, 1):
            raise ValueError(f"{path}: WPCA.0.weight has shape {tuple(weight.shape)}, "
                             f"expected (P, {num_clusters * dim}, 1, 1)")
        # Their WPCA is Conv2d(K*D, P, 1) on the VLAD vector viewed as (N, K*D, 1, 1), then
        # flatten and L2 normalization: the same as a Linear layer with the conv's weight.
        pca = PCAWhitening(num_clusters * dim, b.shape[0])
        _load_state(pca, {"linear.weight": weight.flatten(1), "linear.bias": b}, path, "WPCA")
    if any(not k.startswith(("encoder.", "pool.", "WPCA.")) for k in state):
        extra = sorted(k for k in state if not k.startswith(("encoder.", "pool.", "WPCA.")))
        raise ValueError(f"{path}: unexpected parameters {extra[:5]} in 'state_dict'")
    return EmbedNet(encoder, pool, pca)


def _own_model(ckpt, path):
    """An `EmbedNet` from this project's checkpoint (`model_config` + `model` state)."""
    cfg = ckpt["model_config"]
    if not isinstance(cfg, dict) or cfg.get("encoder") not in BACKBONES:
        found = cfg.get("encoder") if isinstance(cfg, dict) else cfg
        raise ValueError(f"{path}: encoder {found!r} is not one of the registered backbones "
                         f"({', '.join(BACKBONES)})")
    for key, top in (("num_clusters", MAX_CLUSTERS), ("dim", 4096), ("pca_dim", 1 << 20)):
        value = cfg.get(key)
        if not (key == "pca_dim" and not value) and not (
                type(value) is int and 1 <= value <= top):
            raise ValueError(f"{path}: model_config {key} is {value!r}, not a whole number "
                             f"in 1..{top}")
    model = EmbedNet(build_encoder(None, backbone=cfg["encoder"]),
                     NetVLAD(cfg["num_clusters"], cfg["dim"],
                             normalize_input=cfg["normalize_input"], bias=cfg["bias"]),
                     PCAWhitening(cfg["num_clusters"] * cfg["dim"], cfg["pca_dim"])
                     if cfg.get("pca_dim") else None)
    _load_state(model, ckpt["model"], path, "'model' state dict")
    return model


def load_model(path, device=None, contents=None):
    """A NetVLAD model from a file of this project, of Patch-NetVLAD or of Nanne/pytorch-NetVlad.

    The format is detected from the file's contents (`detect_model_format`), never its name,
    and the file is read with `torch.load(weights_only=True)`: loading never runs code from it.
    The model gives the original code's descriptor for the same input: VGG16 conv5_3 (no ReLU),
    NetVLAD (L2-normalized input, soft-assignment, intra- then L2-normalization), then for
    Patch-NetVLAD their WPCA (a linear map of the VLAD vector, then L2 normalization).

    Args:
        path: the file.
        device: where to put the model (default: CPU).
        contents: the file as `utils.load_torch_file` read it, if the caller already has it.

    Returns:
        (model, info): an `EmbedNet` in eval mode with gradients off, and a dict with
        `format`, `num_clusters`, `dim` (local descriptor channels), `pca_dim` (None without
        whitening), `out_dim`, `vladv2` (assignment bias), `image_size` ((H, W) to resize to,
        None: as the files are) and `input_rule` (the input rule in words).
    """
    obj = contents if contents is not None else load_torch_file(path, "model file")
    try:
        fmt = detect_model_format(obj)
    except ValueError:
        raise ValueError(_unknown_format_message(obj, path)) from None
    info = {"format": fmt}
    if fmt == "netvlad_tutorial":
        model = _own_model(obj, path)
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        size = config.get("image_size")
        info["image_size"] = tuple(size) if size else None
        info["input_rule"] = (f"resize to {tuple(size)} (H, W), " if size else
                              "no resize, ") + "ToTensor, ImageNet mean/std (as trained)"
    else:
        state = {_strip_module(k): v for k, v in obj["state_dict"].items()}
        model = _released_model(state, path)
        if fmt == "patchnetvlad":
            info["image_size"] = PATCHNETVLAD_IMAGE_SIZE
            info["input_rule"] = ("resize to (480, 640) (H, W) as Patch-NetVLAD's "
                                  "Resize((480, 640)), ToTensor, ImageNet mean/std")
        else:
            info["image_size"] = None
            info["input_rule"] = ("no resize (Nanne's code reads the Pittsburgh 640x480 files "
                                  "as they are), ToTensor, ImageNet mean/std")
            for key in ("epoch", "best_score"):
                if key in obj:
                    info[key] = np.asarray(obj[key]).item()
    info.update(num_clusters=model.pool.num_clusters, dim=model.pool.dim,
                pca_dim=None if model.pca is None else model.pca.out_dim,
                out_dim=model.out_dim, vladv2=model.pool.conv.bias is not None)
    model.encoder.weights_source = str(path)
    model.requires_grad_(False)
    model.eval()
    return model.to(device or "cpu"), info


# ---------------------------------------------------------------------------------------------
# This project's checkpoints (`train` writes them)
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path, expected_config=None, contents=None):
    """Load a checkpoint (never running code: `utils.load_torch_file`), with clear errors.

    Args:
        expected_config: the `model_config` the checkpoint must have, if given.
        contents: the file as already read (`utils.load_torch_file`): only checked here.

    Raises:
        FileNotFoundError, ValueError: one line naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == "best.pth" and (path.parent / "latest.pth").is_file():
            hint = (f"; {path.parent} holds an interrupted run: resuming it (`resume=True`) "
                    f"completes it and writes {path.name}")
        raise FileNotFoundError(f"checkpoint {path} not found (expected RUN_DIR/best.pth or "
                                f"RUN_DIR/latest.pth, written by `netvlad_tutorial train`){hint}")
    ckpt = contents if contents is not None else load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this package (no model/model_config)")
    if expected_config is not None:
        check_model_config(ckpt, path, expected_config)
    return ckpt


def check_model_config(ckpt, path, expected_config):
    """Raise unless checkpoint `ckpt` (read from `path`) is of the model `expected_config`."""
    if ckpt["model_config"] != expected_config:
        raise ArgumentError(f"checkpoint {path} was saved for model {ckpt['model_config']}, "
                            f"but this run builds {expected_config}; use the matching `preset`",
                            preset="`preset`")


def checkpoint_config(ckpt, path, strict=True):
    """The `TrainConfig` stored in checkpoint `ckpt` (read from `path`), see `from_dict`."""
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path} is not a checkpoint of this package (no config)")
    return TrainConfig.from_dict(ckpt["config"], source=str(path), strict=strict,
                                 version=ckpt.get("version"))


def load_weights(model, ckpt, path):
    """`model.load_state_dict(ckpt["model"])` with a clear error when they do not fit, or
    when a weight is NaN or infinite (a diverged run: its recall would be 0 without a word)."""
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else {}
    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the weights {', '.join(bad[:3])} hold NaN or infinite "
                         "values (the run diverged, or the file is damaged)")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        by = ckpt.get("version", "an older or newer version")
        raise ValueError(f"{path}: its weights do not fit the model of netvlad_tutorial "
                         f"{__version__} (written by {by}): {first}") from err
