"""Stage 5: training with hard-negative mining and cache refreshes, checkpoints, evaluation.

Read top to bottom like the notebook `05_training.ipynb`:
presets -> building the pieces -> one epoch -> the whole run -> evaluating a checkpoint.
"""

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__, distributed
from .data import (
    DataLayoutError,
    NegativeSampler,
    WholeDataset,
    eval_positives,
    input_transform,
    load_split,
    train_positives,
)
from .evaluate import RECALL_VALUES, recall_at_n
from .features import (
    IN_MEMORY_LIMIT_MB,
    FeatureDataset,
    cache_memory_mb,
    compute_descriptors,
    compute_local_features,
)
from .mining import NegativeCache, TripletDataset, collate_fn, mine_triplets, triplet_loss
from .model import (
    PCAWhitening,
    build_model,
    detect_model_format,
    fit_pca_whitening,
    init_netvlad,
    load_model,
    model_config,
    random_netvlad,
)
from .utils import (
    atomic_json,
    atomic_save,
    atomic_write,
    cache_dir,
    display_path,
    fault_point,
    get_device,
    load_torch_file,
    remove_temporary_files,
    resolve_precision,
    set_seed,
)

# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the reference (Nanne) settings."""

    data_root: str = ""
    dataset: str | None = None  # `.mat` prefix, e.g. "pitts30k"; None: the only one there
    image_size: tuple | None = None  # (H, W) to resize to; None keeps the files' size
    num_clusters: int = 64
    weights: str | None = "imagenet"  # "imagenet", a local file, or None (random)
    train_all: bool | None = None  # None: conv5 only with ImageNet weights, all if random
    freeze_encoder: bool = False  # train only the NetVLAD layer (the tiny preset, see there)
    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_step: int = 5
    lr_gamma: float = 0.5
    epochs: int = 30
    patience: int = 10  # early stop after this many epochs without a better R@5
    batch_size: int = 4  # tuples per step
    n_neg: int = 10
    n_neg_sample: int = 1000
    n_neg_dist: int = 100
    margin: float = 0.1  # the loss uses sqrt(margin) on plain distances, as the reference
    cache_refresh: int = 1000  # queries between two cache refreshes
    max_queries: int | None = None  # training queries per epoch (None: all)
    cache_batch_size: int = 24
    num_workers: int = 8
    seed: int = 123
    precision: str = "auto"  # "fp32", "bf16", or "auto": bf16 where native (resolve_precision)
    cache_storage: str = "auto"  # descriptor/feature caches: "memory", "disk" or "auto" (by size)
    feature_cache: bool = True  # a frozen encoder runs once per image (see FeatureCache)
    device: str | None = None
    kmeans_images: int = 500
    kmeans_per_image: int = 100
    kmeans_iters: int = 100
    pca_dim: int = 4096

    def replace(self, **changes):
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d, source="the configuration", strict=True, version=None):
        """A `TrainConfig` from a dict read from a file (`config.json`, a checkpoint).

        Older files are mapped: `amp: true/false` becomes `precision: "auto"/"fp32"`;
        `image_size` lists become tuples.

        Args:
            source: the file, for the error message.
            strict: refuse settings this version does not know; else drop them (with a note).
            version: the package version that wrote the file, for the error message.
        """
        d, names = dict(d), {f.name for f in dataclasses.fields(cls)}
        if "amp" in d and "amp" not in names:
            d["precision"] = "auto" if d.pop("amp") else "fp32"
        unknown = sorted(set(d) - names)
        if unknown:
            by = f"netvlad_tutorial {version}" if version else "another version"
            message = (f"{source} has settings unknown to netvlad_tutorial {__version__}: "
                       f"{', '.join(unknown)} (written by {by})")
            if strict:
                raise ValueError(f"{message}; continue it with that version, or start a new "
                                 "run (a new --out)")
            print(f"{message}; ignored")
            for key in unknown:
                d.pop(key)
        if d.get("image_size") is not None:
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)


PRESETS = {
    # The synthetic city on 2 CPU cores: about two minutes. Random initialization (no ImageNet
    # weights offline), so only the NetVLAD layer trains, on top of fixed random VGG16 features.
    # Training the whole random encoder on 96 queries did not generalize in our runs: the test
    # recall jumped around the untrained one, and Adam or a larger SGD step collapsed the
    # descriptors (see notebook 05 and the README).
    "tiny": TrainConfig(
        dataset="synthetic", image_size=(96, 128), num_clusters=16, weights=None,
        freeze_encoder=True, lr=1e-2, lr_step=100, epochs=10, patience=10, batch_size=4,
        n_neg=4, n_neg_sample=200, n_neg_dist=50, cache_batch_size=32, num_workers=0,
        kmeans_images=100, kmeans_per_image=20, kmeans_iters=50, pca_dim=64,
    ),
    # A larger synthetic city (`make-synthetic --preset small`), still on a CPU.
    "small": TrainConfig(
        dataset="synthetic", image_size=(120, 160), num_clusters=32, weights=None,
        freeze_encoder=True, lr=1e-2, lr_step=100, epochs=6, patience=6, batch_size=4, n_neg=6,
        n_neg_sample=500, n_neg_dist=100, cache_batch_size=32, num_workers=2,
        kmeans_images=200, kmeans_per_image=50, pca_dim=128,
    ),
    # The reference settings, for one GPU.
    "pitts30k": TrainConfig(dataset="pitts30k"),
    "pitts250k": TrainConfig(dataset="pitts250k"),
    # The tiny city from ImageNet VGG16 weights (`weights download imagenet` first; offline the
    # encoder stays random, with a warning): conv5 + NetVLAD train, as the reference. lr 1e-3 is
    # the paper's SGD rate: pretrained conv5 weights would be wrecked by the tiny preset's 1e-2
    # (meant for a freshly initialized NetVLAD layer alone), and Nanne's 1e-4 barely moves them
    # in ten epochs of 144 queries (Pitts30k gives 30 epochs of 7,416 queries).
    "tiny-imagenet": TrainConfig(
        dataset="synthetic", image_size=(96, 128), num_clusters=16, weights="imagenet",
        train_all=False, freeze_encoder=False, lr=1e-3, lr_step=100, epochs=10, patience=10,
        batch_size=4, n_neg=4, n_neg_sample=200, n_neg_dist=50, cache_batch_size=32,
        num_workers=0, kmeans_images=100, kmeans_per_image=20, kmeans_iters=50, pca_dim=64,
    ),
}


def get_preset(name):
    """The preset `name`, with a clear error for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


REAL_SCALE_IMAGES = 5000  # `train` prints `estimate_run` for training splits at least this big


def estimate_run(config, num_db, num_q, verbose=True):
    """What a training run costs before it starts: images to encode, cache size, disk.

    Each epoch mines `min(num_q, max_queries)` queries; before every `cache_refresh` of them the
    whole training split (database + queries) is encoded again, then every mined tuple encodes
    its query, its positive and at most `n_neg` negatives (an upper bound: skipped queries and
    fewer violating negatives encode less). The cache holds one K*512-D vector per image.

    Args:
        config: a `TrainConfig`.
        num_db, num_q: database images and queries of the training split.
        verbose: print the estimate.

    Returns:
        dict with `queries_per_epoch`, `refreshes_per_epoch`, `cache_images_per_epoch`,
        `train_images_per_epoch`, `images_per_epoch`, `images_total` (all epochs),
        `descriptor_dim`, `cache_bytes_float16`, `cache_bytes_float32` and `disk_bytes` (a
        disk-backed float16 cache: one .npy file of the cache's size).
    """
    queries = min(num_q, config.max_queries) if config.max_queries else num_q
    refreshes = math.ceil(queries / config.cache_refresh)
    cache_images = refreshes * (num_db + num_q)
    train_images = queries * (2 + config.n_neg)
    dim = config.num_clusters * 512  # VGG16 conv5: 512 channels
    est = {"queries_per_epoch": queries, "refreshes_per_epoch": refreshes,
           "cache_images_per_epoch": cache_images, "train_images_per_epoch": train_images,
           "images_per_epoch": cache_images + train_images,
           "images_total": (cache_images + train_images) * config.epochs,
           "descriptor_dim": dim, "cache_bytes_float16": (num_db + num_q) * dim * 2,
           "cache_bytes_float32": (num_db + num_q) * dim * 4}
    est["disk_bytes"] = est["cache_bytes_float16"]
    if verbose:
        gib = 2 ** 30
        print(f"Estimate: {queries:,} queries per epoch, {refreshes} cache refreshes of "
              f"{num_db + num_q:,} images = {cache_images:,} images to cache + at most "
              f"{train_images:,} to train on, per epoch; {est['images_total']:,} over "
              f"{config.epochs} epochs. Cache {dim:,}-D: "
              f"{est['cache_bytes_float16'] / gib:.1f} GiB in float16 "
              f"({est['cache_bytes_float32'] / gib:.1f} GiB in float32); a disk-backed cache "
              f"needs {est['disk_bytes'] / gib:.1f} GiB of disk.")
    return est


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------


def resolve_device(config):
    """The device of a run: the configured one, else CUDA if available, else CPU.

    Raises:
        ValueError: an unknown device name, or one that is not available here.
    """
    return check_device(config.device) if config.device else get_device()


def check_device(name):
    """`torch.device(name)` if this machine has it; a clear ValueError otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA GPU is available here; use --device "
                             "cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported (use cpu, cuda, cuda:N or mps)")
    return device


def data_fingerprint(split):
    """A short digest of a split's data: its image lists, positions and first images' bytes.

    Changes when a synthetic city is regenerated with other settings, or a data root points at
    other data; cheap (two small files are read).
    """
    db, root = split.db, Path(split.root)
    h = hashlib.sha1("\n".join([db.dataset, *db.dbImage, *db.qImage]).encode())
    h.update(np.ascontiguousarray(db.utmDb, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(db.utmQ, dtype=np.float64).tobytes())
    for path in (root / db.dbImage[0], root / split.queries_dir / db.qImage[0]):
        h.update(path.read_bytes() if path.is_file() else b"missing")
    return h.hexdigest()[:16]


def centroids_path(config, split):
    """A cache file name for the k-means initialization, keyed by everything it depends on,
    the data included (`data_fingerprint`): a regenerated city gets new centroids."""
    key = json.dumps([str(Path(split.root).resolve()), split.db.dataset, config.image_size,
                      config.weights, config.num_clusters, config.kmeans_images,
                      config.kmeans_per_image, config.kmeans_iters, config.seed,
                      data_fingerprint(split)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    name = f"centroids_vgg16_{config.weights or 'random'}_{split.db.dataset}"
    return cache_dir() / f"{name}_K{config.num_clusters}_{digest}.pt"


def whole_dataset(split, config):
    """Database then query images of `split`, resized as configured (with no `image_size`,
    an image of another size than the first is a clear error, not a failed batch)."""
    return WholeDataset(split.root, split.db, transform=input_transform(config.image_size),
                        queries_dir=split.queries_dir, same_size=config.image_size is None)


def make_model(config, train_split, device, init="kmeans"):
    """VGG16-conv5 + NetVLAD, seeded, with k-means centroids (computed once, then cached).

    Args:
        train_split: the split to draw k-means descriptors from; None when the weights come
            from a checkpoint (no k-means, no centroid cache, no training data, and no
            pretrained encoder file needed).
        init: "kmeans", or "random" for the same model with random centroids
            (`model.random_netvlad`, seeded by `config.seed`): no k-means runs.
    """
    if init not in ("kmeans", "random"):
        raise ValueError(f"init must be 'kmeans' or 'random', got {init!r}")
    set_seed(config.seed)
    if train_split is None:  # no pretrained file is read: the checkpoint holds every weight
        train_all = config.train_all if config.train_all is not None else config.weights is None
        model = build_model(num_clusters=config.num_clusters, weights=None, train_all=train_all)
    else:
        model = build_model(num_clusters=config.num_clusters, weights=config.weights,
                            train_all=config.train_all)
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    model.to(device)
    if train_split is None:
        return model
    if init == "random":
        random_netvlad(model.pool, config.seed)
    else:
        init_netvlad(model, whole_dataset(train_split, config),
                     cache_path=centroids_path(config, train_split),
                     num_images=config.kmeans_images, per_image=config.kmeans_per_image,
                     iters=config.kmeans_iters, seed=config.seed, device=device,
                     precision=resolve_precision(config.precision, device))
    distributed.sync_module(model)  # torchrun: every rank starts from rank 0's weights
    return model


def make_optimizer(config, model):
    """SGD (reference) or Adam over the trainable parameters, with a StepLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'sgd' or 'adam'")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.lr_step, gamma=config.lr_gamma)
    return opt, sched


# ---------------------------------------------------------------------------------------------
# Evaluation on a split
# ---------------------------------------------------------------------------------------------


def split_descriptors(model, split, config, device, features=None,
                      label="Caching descriptors"):
    """(db_desc, q_desc) of a split: one cache pass over database then queries.

    With `features`, the split's cached local features (`FeatureCache`), only the NetVLAD layer
    (and PCA) runs: the same descriptors as from the images, without the encoder.
    """
    precision = resolve_precision(config.precision, device)
    if features is not None:
        net, dataset = model.head, FeatureDataset(features)
    else:
        net, dataset = model, whole_dataset(split, config)
    desc_all = compute_descriptors(net, dataset, batch_size=config.cache_batch_size,
                                   num_workers=0 if features is not None else config.num_workers,
                                   device=device, precision=precision, label=label)
    return desc_all[: split.db.numDb], desc_all[split.db.numDb:]


def evaluate_split(model, split, config, device, n_values=RECALL_VALUES, features=None):
    """Recall@N on a split (evaluation positives: within posDistThr, 25 m)."""
    db_desc, q_desc = split_descriptors(model, split, config, device, features,
                                        label=f"Evaluating ({split.db.whichSet})")
    return recall_at_n(q_desc, db_desc, eval_positives(split.db), n_values=n_values)


# ---------------------------------------------------------------------------------------------
# A frozen encoder runs once: the local-feature cache
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """The encoder's output (N, D, h, w) float16 for every image of the train and val splits.

    Used when no encoder weight trains (`EmbedNet.encoder_frozen`, e.g. the `tiny` preset):
    the encoder then maps each image to the same features in every epoch, so it runs once per
    image and every cache refresh, training step and validation runs only NetVLAD. With
    conv5 trainable (the ImageNet setting) the features change at every step and this does not
    apply.
    """

    train: np.ndarray
    val: np.ndarray


def make_feature_cache(model, train_split, val_split, config, device, work_dir=None):
    """A `FeatureCache` of both splits if `model`'s encoder is frozen, else None.

    `config.feature_cache=False` turns it off (the plain path, images every time).

    Args:
        work_dir: folder of the disk-backed arrays when `config.cache_storage` asks for disk
            (or "auto" and the features are large).
    """
    if not (config.feature_cache and model.encoder_frozen):
        return None
    precision = resolve_precision(config.precision, device)
    arrays = {}
    for name, split in (("train", train_split), ("val", val_split)):
        path = Path(work_dir) / f"features_{name}.npy" if work_dir is not None else None
        storage = config.cache_storage
        if storage != "memory" and path is None:
            storage = "memory"
        arrays[name] = compute_local_features(
            model.encoder, whole_dataset(split, config), batch_size=config.cache_batch_size,
            num_workers=config.num_workers, device=device, precision=precision,
            storage=storage, out_path=path, label=f"Encoding {name} images once (frozen encoder)")
    return FeatureCache(**arrays)


# ---------------------------------------------------------------------------------------------
# One epoch: refresh the cache, mine tuples, train on them, repeat
# ---------------------------------------------------------------------------------------------


def refresh_cache(model, state, config, device):
    """float16 descriptors (numDb + numQ, out_dim) of the whole training split, current model.

    Stored in RAM, or in a disk-backed array (`state["work_dir"]`) when `config.cache_storage`
    is "disk", or "auto" and the cache is larger than `features.IN_MEMORY_LIMIT_MB`.
    """
    split, features = state["split"], state.get("features")
    num_images = split.db.numDb + split.db.numQ
    storage = config.cache_storage
    if storage == "auto":
        mib = cache_memory_mb(num_images, model.out_dim, np.float16)
        storage = "memory" if mib <= IN_MEMORY_LIMIT_MB else "disk"
    out_path = None
    if storage == "disk" and state.get("work_dir") is not None:
        out_path = Path(state["work_dir"]) / "descriptor_cache.npy"
    if features is not None:
        net, dataset = model.head, FeatureDataset(features.train)
    else:
        net, dataset = model, whole_dataset(split, config)
    return compute_descriptors(net, dataset, batch_size=config.cache_batch_size,
                               num_workers=0 if features is not None else config.num_workers,
                               device=device, precision=resolve_precision(config.precision,
                                                                          device),
                               dtype=np.float16, out_path=out_path, label="Refreshing cache")


def tuple_loader(tuples, state, config, device, plan=None):
    """Batches of `collate_fn` over the mined tuples: images, or their cached local features.

    Args:
        plan: under torchrun, this rank's `distributed.Share`s: one batch per global batch.
    """
    split, features = state["split"], state.get("features")
    dataset = TripletDataset(split.root, split.db, tuples,
                             transform=input_transform(config.image_size),
                             queries_dir=split.queries_dir,
                             features=None if features is None else features.train)
    batching = ({"batch_size": config.batch_size, "shuffle": False} if plan is None
                else {"batch_sampler": [share.local for share in plan]})
    return DataLoader(dataset, **batching,
                      num_workers=0 if features is not None else config.num_workers,
                      collate_fn=collate_fn, pin_memory=device.type == "cuda")


def train_step(net, batch, optimizer, config, device, images=True, share=None):
    """One SGD step on a batch of tuples; returns (loss, number of tuples).

    Args:
        net: the model on images, or `model.head` on cached local features (`images=False`);
            under torchrun its `distributed.ddp` wrapper.
        batch: `(query, positive, negatives, neg_counts, indices)` from `collate_fn`.
        share: under torchrun, this rank's `distributed.Share` of the global batch: the step
            is then that of the global batch, whose loss and size are returned.
    """
    query, positive, negatives, neg_counts, _ = batch
    precision = resolve_precision(config.precision, device)
    inputs = torch.cat([query, positive, negatives]).to(device)  # (2B + sum(neg_counts), ...)
    if images:
        inputs = precision.images(inputs)
    with precision.autocast(device):
        desc = net(inputs)
    desc = desc.float()
    B = query.shape[0]
    q, p, n = desc[:B], desc[B:2 * B], desc[2 * B:]  # `q`, `p`: (B, dim); `n`: (N, dim)
    loss = triplet_loss(q, p, n, neg_counts.to(device), margin=math.sqrt(config.margin))
    value = None
    if share is not None:  # the all-reduced gradient is that of the global batch's loss
        loss, value = distributed.share_loss(loss, len(n), share)
        B = len(share.global_)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return (loss.item() if value is None else value), B


def mine_shared(subset, q_desc, db_desc, state, config):
    """`mine_triplets` for `subset`; under torchrun on rank 0 only, then broadcast.

    Every rank could mine identically (the cache is gathered bit for bit to every rank and the
    RNG states are equal), but mining computes float32 distances and ranks them: on machines
    of different kinds (CPU vector units, GPU models) a last-bit difference could reorder two
    near-equal negatives, and the ranks would then silently train on different tuples. Rank 0
    therefore mines, and broadcasts the tuples together with the state that mining advanced
    (the negative cache and the NumPy RNG), so every rank agrees on the tuples and on all
    later draws by construction. The cost is one small broadcast per cache refresh.

    Returns:
        (tuples, number of skipped queries), the same on every rank.
    """
    rng, neg_cache = state["rng"], state["neg_cache"]
    mined = None
    if distributed.is_main():
        mined = mine_triplets(subset, q_desc, db_desc, state["positives"], state["sampler"],
                              rng, neg_cache, n_neg_sample=config.n_neg_sample,
                              n_neg_dist=config.n_neg_dist, n_neg=config.n_neg,
                              margin=config.margin)
    if not distributed.is_initialized():
        return mined
    shared = distributed.broadcast_object(
        (*mined, neg_cache.state_dict(), rng.bit_generator.state) if mined else None)
    tuples, skipped, cache_state, rng.bit_generator.state = shared
    neg_cache.load_state_dict(cache_state)
    return tuples, skipped


def train_epoch(model, optimizer, state, config, device):
    """One pass over the training queries, refreshing the cache every `cache_refresh` queries.

    Args:
        state: dict with `split`, `positives`, `sampler`, `neg_cache` and `rng`, shared
            across epochs (the negative cache and the RNG carry over), and optionally
            `features` (a `FeatureCache`: a frozen encoder's output, see `make_feature_cache`)
            and `work_dir` (where disk-backed caches go).

    Returns:
        dict with the mean loss, the number of tuples trained on and of skipped queries.
    """
    split, rng = state["split"], state["rng"]
    num_db = split.db.numDb
    queries = np.array([q for q, pos in enumerate(state["positives"]) if len(pos) > 0])
    queries = queries[rng.permutation(len(queries))][:config.max_queries]
    cached = state.get("features") is not None
    if "net" not in state:  # the trainable module; under torchrun its DDP wrapper, built once
        state["net"] = distributed.ddp(model.head if cached else model)
    net = state["net"]
    total_loss, num_tuples, num_skipped = 0.0, 0, 0

    for start in range(0, len(queries), config.cache_refresh):
        subset = queries[start:start + config.cache_refresh]
        # 1. Refresh the cache: descriptors of the whole training split with the current model.
        cache = refresh_cache(model, state, config, device)
        db_desc, q_desc = cache[:num_db], cache[num_db:]
        # 2. Mine: best positive and hard negatives for each query of this subset.
        tuples, skipped = mine_shared(subset, q_desc, db_desc, state, config)
        num_skipped += skipped
        if not tuples:
            continue
        # 3. Train on the mined tuples.
        model.train()
        plan = (distributed.batch_plan([len(t.negatives) for t in tuples], config.batch_size)
                if distributed.is_initialized() else None)
        for i, batch in enumerate(tqdm(tuple_loader(tuples, state, config, device, plan),
                                       desc="Training", leave=False)):
            loss, num = train_step(net, batch, optimizer, config, device, images=not cached,
                                   share=None if plan is None else plan[i])
            total_loss += loss * num
            num_tuples += num
    return {"loss": total_loss / max(num_tuples, 1), "tuples": num_tuples,
            "skipped": num_skipped}


# ---------------------------------------------------------------------------------------------
# The whole run: epochs, validation, checkpoints, resume
# ---------------------------------------------------------------------------------------------


def _rng_states(rng):
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "python": random.getstate()}


def _set_rng_states(rng, states):
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])


RUN_FILES = ("latest.pth", "best.pth", "log.json", "log.csv", "finished", "config.json",
             "data.json")
# Settings that may change between the runs of one folder (`--resume`): not part of its identity.
RESUMABLE_CHANGES = ("epochs", "precision", "device", "num_workers", "cache_storage",
                     "feature_cache")


def load_checkpoint(path, expected_config=None):
    """Load a checkpoint (never running code: `utils.load_torch_file`), with clear errors.

    Args:
        expected_config: the `model_config` the checkpoint must have, if given.

    Raises:
        FileNotFoundError, ValueError: one line naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == "best.pth" and (path.parent / "latest.pth").is_file():
            hint = (f"; {path.parent} holds an interrupted run: `train --resume --out "
                    f"{path.parent}` completes it and writes {path.name}")
        raise FileNotFoundError(f"checkpoint {path} not found (expected RUN_DIR/best.pth or "
                                f"RUN_DIR/latest.pth, written by `netvlad_tutorial train`){hint}")
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this package (no model/model_config)")
    if expected_config is not None:
        check_model_config(ckpt, path, expected_config)
    return ckpt


def check_model_config(ckpt, path, expected_config):
    """Raise unless checkpoint `ckpt` (read from `path`) is of the model `expected_config`."""
    if ckpt["model_config"] != expected_config:
        raise ValueError(f"checkpoint {path} was saved for model {ckpt['model_config']}, "
                         f"but this run builds {expected_config}; use the matching --preset")


def checkpoint_config(ckpt, path, strict=True):
    """The `TrainConfig` stored in checkpoint `ckpt` (read from `path`), see `from_dict`."""
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path} is not a checkpoint of this package (no config)")
    return TrainConfig.from_dict(ckpt["config"], source=str(path), strict=strict,
                                 version=ckpt.get("version"))


def _load_weights(model, ckpt, path):
    """`model.load_state_dict(ckpt["model"])` with a clear error when they do not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        by = ckpt.get("version", "an older or newer version")
        raise ValueError(f"{path}: its weights do not fit the model of netvlad_tutorial "
                         f"{__version__} (written by {by}): {first}") from err


def _check_best_is_current(path, ckpt):
    """Raise if `path` is a run's `best.pth` that is behind its `latest.pth` (a run stopped
    between the two writes of one epoch); `train --resume` repairs it."""
    latest = path.parent / "latest.pth"
    if path.name != "best.pth" or not latest.is_file():
        return
    best_epoch = load_checkpoint(latest).get("best_epoch")
    if best_epoch is not None and ckpt.get("epoch") != best_epoch:
        raise ValueError(f"{path} holds epoch {ckpt.get('epoch')}, but {latest} says the best "
                         f"is epoch {best_epoch}: the run stopped while saving; `train --resume "
                         f"--out {path.parent}` repairs it")


def _write_log(run_dir, history):
    """`log.csv` and `log.json`: one row per epoch, each written atomically."""
    atomic_json(history, run_dir / "log.json")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history[0]) if history else ["epoch"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(run_dir / "log.csv", text.getvalue())


def _config_json(config):
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples become lists


def _same_path(a, b):
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _read_json(path):
    """A JSON file of a run folder, with a clear error when it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); the run folder is damaged: use "
                         "a new --out, or --overwrite to start this one again") from err


def _check_run_config(run_dir, config, train_split=None):
    """Refuse to mix runs: `run_dir` must hold no run, or one with this same configuration
    (and, given `train_split`, trained on the same data: see `data_fingerprint`).

    Data roots are compared as resolved paths; `RESUMABLE_CHANGES` (epochs, precision,
    device, workers) may differ, so a finished run can be extended with more epochs.
    """
    config_file = run_dir / "config.json"
    if not config_file.exists():
        return
    saved = _config_json(TrainConfig.from_dict(_read_json(config_file), source=str(config_file)))
    wanted = _config_json(config)
    changed = sorted(k for k in wanted if k not in RESUMABLE_CHANGES and saved.get(k) != wanted[k]
                     and not (k == "data_root" and _same_path(saved[k], wanted[k])))
    if changed:
        raise ValueError(f"{run_dir} holds a run with another configuration (changed: "
                         f"{', '.join(changed)}); resume it with its own settings, give a new "
                         "--out, or --overwrite to replace it")
    data_file = run_dir / "data.json"
    if train_split is not None and data_file.exists():
        saved = _read_json(data_file).get("train_fingerprint")
        if saved != data_fingerprint(train_split):
            raise ValueError(f"{run_dir} holds a run trained on other data than "
                             f"{train_split.root} (was the city regenerated?); give its data, "
                             "a new --out, or --overwrite to replace it")


def _check_run_dir(run_dir, resume, overwrite):
    """Refuse to reuse `run_dir` silently; returns the run files it holds.

    Without `resume` a folder holding a run is refused unless `overwrite`; `resume` needs its
    `latest.pth` when anything else of a run (best.pth, a log, `finished`) is there.
    """
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not resume and not overwrite:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(found)}); give --resume to "
                         "continue it, a new --out, or --overwrite to replace it")
    if resume and not (run_dir / "latest.pth").exists() and set(found) - {"config.json",
                                                                           "data.json"}:
        raise ValueError(f"{run_dir} has {', '.join(found)} but no latest.pth, so it cannot be "
                         "resumed; give a new --out, or --overwrite to replace it")
    return found


def _clean_run_dir(run_dir, found, overwrite):
    """Delete the old run's files (with `overwrite`) and the temporary files of killed writes."""
    if overwrite:
        for name in found:
            (run_dir / name).unlink()
        for path in run_dir.glob("*.pca*.pth"):  # PCA files of the replaced checkpoints
            path.unlink()
    for path in remove_temporary_files(run_dir):
        print(f"Removed {display_path(path)}, left by an interrupted write")


def _commit_epoch(run_dir, ckpt, is_best):
    """The end of an epoch, in an order that `--resume` can always check and repair:

    1. `latest.pth`: the commit; it holds the history and the best epoch's number;
    2. `best.pth`, if this epoch is the best (a kill before it: `_repair_run` copies latest);
    3. `log.json`, `log.csv` (a kill before them: rewritten from latest's history).
    """
    atomic_save(ckpt, run_dir / "latest.pth")
    if is_best:
        atomic_save(ckpt, run_dir / "best.pth")
    _write_log(run_dir, ckpt["history"])


def _repair_run(run_dir, latest):
    """After a kill: bring `best.pth` and the logs up to the committed `latest.pth`."""
    best_path = run_dir / "best.pth"
    best_epoch = latest["best_epoch"]
    try:
        best = load_checkpoint(best_path) if best_path.exists() else None
    except ValueError:
        best = None
    if best is None or best.get("epoch") != best_epoch:
        if best_epoch != latest["epoch"]:
            raise ValueError(f"{best_path} should hold epoch {best_epoch} (the best by "
                             f"{run_dir / 'latest.pth'}), but holds "
                             f"{'nothing readable' if best is None else best.get('epoch')}; "
                             "it cannot be rebuilt: give a new --out, or --overwrite")
        print(f"Repairing {display_path(best_path)}: epoch {best_epoch}, from latest.pth")
        atomic_save(latest, best_path)
    _write_log(run_dir, latest["history"])


def train(config, run_dir, resume=False, stop_after=None, overwrite=False):
    """Train NetVLAD; checkpoints `latest.pth` and `best.pth` (by val R@5) in `run_dir`.

    Args:
        config: a `TrainConfig` (see `PRESETS`).
        run_dir: the run folder; `--resume` continues from its `latest.pth`.
        resume: continue an interrupted run with the same final weights as an uninterrupted one
            (or extend a finished one to more `epochs`); a folder with no run starts fresh.
        stop_after: stop after this many epochs in this call (simulates an interruption).
        overwrite: replace the run that `run_dir` holds (else it is refused without `resume`).

    Returns:
        the per-epoch history (list of dicts), also in `run_dir/log.json` and `log.csv`.

    Raises:
        ValueError, FileNotFoundError, OSError: with one line naming the file and the choices.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("give either resume or overwrite, not both")
    if config.epochs < 1:
        raise ValueError(f"epochs is {config.epochs}: a run needs at least 1 epoch")
    found = _check_run_dir(run_dir, resume, overwrite)
    device = resolve_device(config)
    train_split = load_split(config.data_root, "train", name=config.dataset, allow_flat=False)
    val_split = load_split(config.data_root, "val", name=config.dataset, allow_flat=False)
    if train_split.db.numDb + train_split.db.numQ >= REAL_SCALE_IMAGES:
        estimate_run(config, train_split.db.numDb, train_split.db.numQ)
    positives = train_positives(train_split.db)
    if not any(len(p) for p in positives):
        raise DataLayoutError(
            f"the train split of {train_split.root} ({train_split.db.dataset}) has no query "
            f"with a training positive (a database image within "
            f"sqrt(nonTrivPosDistSqThr) = {train_split.db.nonTrivPosDistSqThr ** 0.5:g} m): "
            "there is nothing to train on")
    latest = None
    if resume and (run_dir / "latest.pth").exists():
        _check_run_config(run_dir, config, train_split)
        latest = load_checkpoint(run_dir / "latest.pth")
        checkpoint_config(latest, run_dir / "latest.pth", strict=True)
    distributed.barrier()  # torchrun: every rank has checked the folder before rank 0 writes
    if distributed.is_main():
        _clean_run_dir(run_dir, found, overwrite)
    if resume and latest is None:
        print(f"No {display_path(run_dir / 'latest.pth')} yet: starting from scratch")
    # Written before k-means: a read-only or full --out is found at once.
    atomic_json(_config_json(config), run_dir / "config.json")
    atomic_json({"data_root": str(config.data_root),
                 "train_fingerprint": data_fingerprint(train_split)}, run_dir / "data.json")

    model = make_model(config, train_split, device)
    optimizer, scheduler = make_optimizer(config, model)
    distributed.announce(config.batch_size, config.lr)
    rng = np.random.default_rng(config.seed)
    state = {"split": train_split, "positives": positives,
             "sampler": NegativeSampler(train_split.db), "rng": rng,
             "neg_cache": NegativeCache(train_split.db.numQ, config.n_neg),
             "work_dir": run_dir}
    history, best_score, best_epoch, start_epoch = [], -1.0, -1, 0

    if latest is not None:
        check_model_config(latest, run_dir / "latest.pth", model_config(model))
        _load_weights(model, latest, run_dir / "latest.pth")
        optimizer.load_state_dict(latest["optimizer"])
        scheduler.load_state_dict(latest["scheduler"])
        state["neg_cache"].load_state_dict(latest["neg_cache"])
        _set_rng_states(rng, latest["rng"])
        history, best_score, best_epoch = (latest["history"], latest["best_score"],
                                           latest["best_epoch"])
        start_epoch = latest["epoch"] + 1
        _repair_run(run_dir, latest)
        if start_epoch < config.epochs and distributed.is_main():
            (run_dir / "finished").unlink(missing_ok=True)  # more epochs to go
        print(f"Resuming {display_path(run_dir)} after epoch {latest['epoch']}")
        del latest
    # A frozen encoder (the tiny preset) is run once per image here, not in every epoch.
    state["features"] = make_feature_cache(model, train_split, val_split, config, device, run_dir)

    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        if epoch - best_epoch > config.patience and best_epoch >= 0:
            print(f"Early stop: no better val R@5 for {config.patience} epochs")
            break
        t0 = time.perf_counter()
        stats = train_epoch(model, optimizer, state, config, device)
        fault_point("epoch-trained")
        if stats["tuples"] == 0:
            print(f"epoch {epoch}: no tuple to train on ({stats['skipped']} queries skipped: "
                  "no negative violates the margin)")
        scheduler.step()
        recalls = evaluate_split(model, val_split, config, device,
                                 features=getattr(state["features"], "val", None))
        recalls = distributed.broadcast_object(recalls)  # one early-stop decision for all
        row = {"epoch": epoch, **stats, "lr": optimizer.param_groups[0]["lr"],
               **{f"recall@{n}": float(r) for n, r in recalls.items()},
               "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        is_best = recalls[5] > best_score
        if is_best:
            best_score, best_epoch = float(recalls[5]), epoch
        ckpt = {"config": dataclasses.asdict(config), "model_config": model_config(model),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "neg_cache": state["neg_cache"].state_dict(), "rng": _rng_states(rng),
                "history": history, "best_score": best_score, "best_epoch": best_epoch,
                "version": __version__}
        _commit_epoch(run_dir, ckpt, is_best)
        print(f"epoch {epoch}: loss {stats['loss']:.4f}, val R@1 {recalls[1]:.3f} "
              f"R@5 {recalls[5]:.3f} ({row['seconds']:.0f} s){' *best*' if is_best else ''}")
        epochs_run += 1
        if stop_after is not None and epochs_run >= stop_after:
            return history
    atomic_json({"best_epoch": best_epoch, "best_recall@5": best_score,
                 "epochs": len(history)}, run_dir / "finished")
    return history


def load_trained(config, run_dir, device=None):
    """The best model of a finished run in `run_dir`, training (or resuming) it first if needed.

    Lets a notebook run in a fresh kernel: the first call trains, later calls only load.

    Returns:
        (model, history): the model with the best checkpoint's weights, and the epoch log.
    """
    run_dir = Path(run_dir)
    train_split = load_split(config.data_root, "train", name=config.dataset, allow_flat=False)
    _check_run_config(run_dir, config, train_split)
    if not (run_dir / "finished").exists():
        train(config, run_dir, resume=True)
    device = check_device(device) if device else resolve_device(config)
    model = make_model(config, None, device)  # the weights come from best.pth
    ckpt = load_checkpoint(run_dir / "best.pth", model_config(model))
    _load_weights(model, ckpt, run_dir / "best.pth")
    return model, _read_json(run_dir / "log.json")


# ---------------------------------------------------------------------------------------------
# Evaluating a checkpoint (the `evaluate` command)
# ---------------------------------------------------------------------------------------------


def evaluate_checkpoint(data_root, split="test", checkpoint=None, untrained=False,
                        preset=None, pca=False, pca_dim=None, name=None, device=None,
                        precision=None, save_pca=False):
    """Recall@N of a trained checkpoint, or of the untrained model (`untrained=True`).

    The untrained model is built exactly as training starts (`preset`, default "tiny"): the same
    seed and k-means centroids.
    A checkpoint needs only the split evaluated: no train split, no centroid cache. With `pca`,
    whitening is taken from the checkpoint or the file beside it (`pca_path`) when it has one of
    that size, else fitted on up to 10,000 training-database descriptors. The checkpoint is
    never written; `save_pca` stores a fitted layer in `pca_path(checkpoint, dim)`.

    Returns:
        dict with `recall@N` for N in `RECALL_VALUES`, plus `split`, `dim` and `num_queries`.
    """
    if checkpoint is not None and untrained:
        raise ValueError("give either --checkpoint or --untrained, not both")
    if checkpoint is None and not untrained:
        raise ValueError("give --checkpoint RUN_DIR/best.pth, or --untrained")
    if checkpoint is not None and preset is not None:
        raise ValueError("--preset is only used with --untrained: a checkpoint brings its own "
                         "settings")
    if pca_dim is not None and not pca:
        raise ValueError("--pca-dim is only used with --pca")
    if pca_dim is not None and pca_dim < 1:
        raise ValueError(f"--pca-dim must be at least 1, not {pca_dim}")
    if save_pca and (not pca or checkpoint is None):
        raise ValueError("--save-pca needs --pca and --checkpoint (it stores the fitted PCA "
                         "beside the checkpoint)")
    config = get_preset(preset or "tiny")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.is_file() and released_format(checkpoint):
            return _evaluate_released(checkpoint, data_root, split, name, device, precision,
                                      pca, pca_dim)
        ckpt = load_checkpoint(checkpoint)
        _check_best_is_current(checkpoint, ckpt)
        config = checkpoint_config(ckpt, checkpoint, strict=False)
    config = config.replace(data_root=str(data_root),
                            **({"precision": precision} if precision else {}),
                            **({"dataset": name} if name else {}),
                            **({"device": device} if device else {}))
    device = resolve_device(config)
    eval_split = load_split(config.data_root, split, name=config.dataset)
    train_split = None
    if untrained:
        train_split = load_split(config.data_root, "train", name=config.dataset,
                                 allow_flat=False)
    model = make_model(config, train_split, device)
    if checkpoint is not None:
        check_model_config(ckpt, checkpoint, model_config(model))
        _load_weights(model, ckpt, checkpoint)
    if pca:
        model.pca = load_or_fit_pca(model, config, train_split, device, pca_dim, checkpoint,
                                    save=save_pca)
    recalls = evaluate_split(model, eval_split, config, device)
    result = {f"recall@{n}": float(r) for n, r in recalls.items()}
    result.update(split=split, dim=int(model.out_dim), num_queries=int(eval_split.db.numQ),
                  model="untrained" if untrained and checkpoint is None else str(checkpoint))
    return result


def released_format(path):
    """"patchnetvlad" or "nanne" for a released model file (`model.detect_model_format`),
    None for this project's checkpoints and for files of no known format."""
    try:
        fmt = detect_model_format(load_torch_file(path, "checkpoint"))
    except ValueError:
        return None
    return None if fmt == "netvlad_tutorial" else fmt


def _evaluate_released(checkpoint, data_root, split, name, device, precision, pca, pca_dim):
    """`evaluate_checkpoint` for Patch-NetVLAD and Nanne files (`model.load_model`): their
    input rule (Patch-NetVLAD resizes to 480x640), the reference settings otherwise."""
    config = PRESETS["pitts30k"].replace(data_root=str(data_root), weights=None, dataset=name,
                                         **({"precision": precision} if precision else {}),
                                         **({"device": device} if device else {}))
    device = resolve_device(config)
    model, info = load_model(checkpoint, device)
    config = config.replace(image_size=info["image_size"],
                            num_workers=min(config.num_workers, os.cpu_count() or 1))
    print(f"{display_path(checkpoint)}: {info['format']} weights, K = {info['num_clusters']}, "
          f"{info['out_dim']}-D; input: {info['input_rule']}")
    eval_split = load_split(config.data_root, split, name=config.dataset)
    if pca:
        if model.pca is not None:
            raise ValueError(f"{checkpoint} already holds its PCA whitening (WPCA to "
                             f"{info['pca_dim']}-D): evaluate it without --pca")
        model.pca = load_or_fit_pca(model, config, None, device, pca_dim)
    recalls = evaluate_split(model, eval_split, config, device)
    result = {f"recall@{n}": float(r) for n, r in recalls.items()}
    result.update(split=split, dim=int(model.out_dim), num_queries=int(eval_split.db.numQ),
                  model=str(checkpoint), format=info["format"])
    return result


def pca_path(checkpoint, dim):
    """Where `--save-pca` keeps the PCA of `checkpoint`: `RUN/best.pca{dim}.pth` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.pca{dim}.pth")


def _weights_digest(state_dict):
    """A short digest of a state dict's tensors: ties a PCA file to its checkpoint."""
    h = hashlib.sha1()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()[:16]


def load_or_fit_pca(model, config, train_split, device, pca_dim=None, checkpoint=None,
                    save=False):
    """PCA whitening of `model`: from `checkpoint` (or the file beside it) if it holds one of
    that size, else fitted on up to 10,000 training-database descriptors (the reference).

    Args:
        train_split: the split to fit on; None: loaded from `config` only if fitting is needed.
        pca_dim: the output size; None: `config.pca_dim` (reduced, with a note, when the
            data is too small for it). An explicit size larger than possible is an error.
        checkpoint: a checkpoint file; it is read, never written.
        save: store a fitted layer in `pca_path(checkpoint, dim)`.
    """
    ckpt = load_checkpoint(checkpoint) if checkpoint else {}
    dim = pca_dim or config.pca_dim
    stored = ckpt.get("pca")
    if stored is None or stored["out_dim"] != dim:
        stored = None
        side = pca_path(checkpoint, dim) if checkpoint else None
        if side is not None and side.is_file():
            stored = load_torch_file(side, "PCA file")
            if stored.get("weights") != _weights_digest(ckpt["model"]):
                raise ValueError(f"{side} was fitted for other weights than {checkpoint}; "
                                 "remove it or run with --save-pca to fit it again")
    if stored is not None:
        layer = PCAWhitening(stored["in_dim"], stored["out_dim"])
        layer.load_state_dict(stored["state_dict"])
        return layer.to(device)
    if train_split is None:
        train_split = load_split(config.data_root, "train", name=config.dataset,
                                 allow_flat=False)
    limit = min(model.out_dim, min(train_split.db.numDb, 10000) - 1)
    if dim > limit:
        if pca_dim is not None:
            raise ValueError(f"--pca-dim {pca_dim} is larger than possible: at most {limit} "
                             f"(descriptor size {model.out_dim}, {train_split.db.numDb} "
                             "training database images to fit on)")
        print(f"PCA: {limit} dimensions, not the preset's {dim} (too little data)")
        dim = limit
    db_desc, _ = split_descriptors(model, train_split, config, device,
                                   label="Descriptors for PCA")
    db_desc = db_desc[np.random.default_rng(config.seed).permutation(len(db_desc))[:10000]]
    layer = fit_pca_whitening(db_desc, dim)
    if save:
        path = atomic_save({"in_dim": layer.in_dim, "out_dim": layer.out_dim,
                            "state_dict": layer.state_dict(),
                            "weights": _weights_digest(ckpt["model"])},
                           pca_path(checkpoint, dim))
        print(f"PCA whitening saved to {path}")
    return layer.to(device)
