"""Stage 2c: initializing NetVLAD by k-means on conv5 local descriptors sampled from the training
database, and the centroid cache that keeps them between runs.
"""

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .backbone import SHIPPED, VGG16, shipped_weights
from .data import data_fingerprint
from .features import as_precision, encode
from .files import atomic_save, load_torch_file
from .netvlad import assignment_alpha
from .precision import autocast_off
from .utils import cache_dir, progress_bar, progress_hidden


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
        with autocast_off(x):
            return F.normalize(x.float(), dim=1).flatten(2).transpose(1, 2)  # (B, h*w, D)


def sample_local_descriptors(encoder, dataset, num_images=500, per_image=100, batch_size=16,
                             num_workers=0, device=None, precision=None, seed=0):
    """Random L2-normalized local descriptors from database images, for k-means.

    Reference: 100 random positions from each of 500 random database images. The images are
    encoded by `features.encode`, one batch at a time, so that only a batch of whole
    feature maps is held at once.

    Args:
        encoder: images (B, 3, H, W) -> local descriptors (B, D, h, w).
        dataset: items `(image, index)`; images `< dataset.db.numDb` are the database.
        precision: "auto", "fp32", "bf16" or a `precision.Precision` (see `resolve_precision`).

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
    for start in progress_bar(range(0, len(images), batch_size),
                              desc="Local descriptors for k-means", unit="batch",
                              disable=progress_hidden()):
        batch = _Renumbered(dataset, images[start:start + batch_size])
        # Not sharded under torchrun: a rank that finds the centroid cache skips this pass.
        x = encode(net, batch, batch_size, num_workers, device, precision,
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
