"""Stage 2: the whole model, encoder -> NetVLAD -> optional PCA whitening (`EmbedNet`), and the
model of a run (`make_model`: built, its NetVLAD initialized, its centroids cached).
"""


import torch
from torch import nn

from . import distributed
from .backbone import build_encoder, get_backbone
from .centroids import centroids_path, init_netvlad, random_netvlad
from .data import whole_dataset
from .netvlad import NetVLAD
from .pca import PCAWhitening
from .precision import resolve_precision


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
        precision: the run's `precision.Precision` for k-means' encoder pass; None: resolved from
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
