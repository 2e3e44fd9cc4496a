"""Stage 5: training with hard-negative mining and cache refreshes, checkpoints, evaluation.

Read top to bottom like the notebook `05_training.ipynb`:
presets -> building the pieces -> one epoch -> the whole run -> evaluating a checkpoint.
"""

import csv
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .data import (
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
from .model import PCAWhitening, build_model, fit_pca_whitening, init_netvlad, model_config
from .utils import REPO_ROOT, atomic_save, get_device, resolve_precision, set_seed

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
}


def get_preset(name):
    """The preset `name`, with a clear error for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------


def resolve_device(config):
    """The device of a run: the configured one, else CUDA if available, else CPU."""
    return torch.device(config.device) if config.device else get_device()


def cache_dir():
    """Where centroids and other derived files are kept (git-ignored)."""
    return REPO_ROOT / "data" / "cache"


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
    """Database then query images of `split`, resized as configured."""
    return WholeDataset(split.root, split.db, transform=input_transform(config.image_size),
                        queries_dir=split.queries_dir)


def make_model(config, train_split, device):
    """VGG16-conv5 + NetVLAD, seeded, with k-means centroids (computed once, then cached)."""
    set_seed(config.seed)
    model = build_model(num_clusters=config.num_clusters, weights=config.weights,
                        train_all=config.train_all)
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    model.to(device)
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


def load_checkpoint(path, expected_config=None):
    """Load a checkpoint, with clear errors for a missing file or another model configuration."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (expected RUN_DIR/best.pth or "
                                "RUN_DIR/latest.pth, written by `netvlad_tutorial train`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this package (no model/model_config)")
    if expected_config is not None and ckpt["model_config"] != expected_config:
        raise ValueError(f"checkpoint {path} was saved for model {ckpt['model_config']}, "
                         f"but this run builds {expected_config}; use the matching --preset")
    return ckpt


def _write_log(run_dir, history):
    """`log.csv` and `log.json`: one row per epoch (rank 0 alone writes under torchrun)."""
    if not distributed.is_main():
        return
    atomic_json = run_dir / "log.json.tmp"
    atomic_json.write_text(json.dumps(history, indent=1))
    atomic_json.replace(run_dir / "log.json")
    with open(run_dir / "log.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    (run_dir / "log.csv.tmp").replace(run_dir / "log.csv")


def _config_json(config):
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples become lists


def _check_run_config(run_dir, config, train_split=None):
    """Refuse to mix runs: `run_dir` must hold no run, or one with this same configuration
    (and, given `train_split`, trained on the same data: see `data_fingerprint`)."""
    config_file = run_dir / "config.json"
    if not config_file.exists() or not (run_dir / "latest.pth").exists():
        return
    saved, wanted = json.loads(config_file.read_text()), _config_json(config)
    if saved != wanted:
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ValueError(f"{run_dir} holds a run with another configuration (changed: "
                         f"{', '.join(changed)}); use a new --out folder or delete {run_dir}")
    data_file = run_dir / "data.json"
    if train_split is not None and data_file.exists():
        saved = json.loads(data_file.read_text()).get("train_fingerprint")
        if saved != data_fingerprint(train_split):
            raise ValueError(f"{run_dir} holds a run trained on other data than "
                             f"{train_split.root} (was the city regenerated?); use a new --out "
                             f"folder or delete {run_dir}")


def train(config, run_dir, resume=False, stop_after=None):
    """Train NetVLAD; checkpoints `latest.pth` and `best.pth` (by val R@5) in `run_dir`.

    Args:
        config: a `TrainConfig` (see `PRESETS`).
        run_dir: the run folder; `--resume` continues from its `latest.pth`.
        resume: continue an interrupted run with the same final weights as an uninterrupted one.
        stop_after: stop after this many epochs in this call (simulates an interruption).

    Returns:
        the per-epoch history (list of dicts), also in `run_dir/log.json` and `log.csv`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config)
    train_split = load_split(config.data_root, "train", name=config.dataset)
    val_split = load_split(config.data_root, "val", name=config.dataset)
    _check_run_config(run_dir, config, train_split)

    model = make_model(config, train_split, device)
    optimizer, scheduler = make_optimizer(config, model)
    distributed.announce(config.batch_size, config.lr)
    rng = np.random.default_rng(config.seed)
    positives = train_positives(train_split.db)
    state = {"split": train_split, "positives": positives,
             "sampler": NegativeSampler(train_split.db), "rng": rng,
             "neg_cache": NegativeCache(train_split.db.numQ, config.n_neg),
             "work_dir": run_dir,
             "features": make_feature_cache(model, train_split, val_split, config, device,
                                            run_dir)}
    history, best_score, best_epoch, start_epoch = [], -1.0, -1, 0

    distributed.barrier()  # torchrun: every rank reads what rank 0 has finished writing
    if resume and (run_dir / "latest.pth").exists():
        ckpt = load_checkpoint(run_dir / "latest.pth", model_config(model))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state["neg_cache"].load_state_dict(ckpt["neg_cache"])
        _set_rng_states(rng, ckpt["rng"])
        history, best_score, best_epoch = ckpt["history"], ckpt["best_score"], ckpt["best_epoch"]
        start_epoch = ckpt["epoch"] + 1
        print(f"Resuming {run_dir} after epoch {ckpt['epoch']}")
    elif resume:
        print(f"No {run_dir / 'latest.pth'} yet: starting from scratch")

    if distributed.is_main():  # torchrun: rank 0 alone writes files
        (run_dir / "config.json").write_text(json.dumps(_config_json(config), indent=1))
        (run_dir / "data.json").write_text(json.dumps({"data_root": str(config.data_root),
                                                       "train_fingerprint":
                                                       data_fingerprint(train_split)}))
    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        if epoch - best_epoch > config.patience and best_epoch >= 0:
            print(f"Early stop: no better val R@5 for {config.patience} epochs")
            break
        t0 = time.perf_counter()
        stats = train_epoch(model, optimizer, state, config, device)
        scheduler.step()
        recalls = evaluate_split(model, val_split, config, device,
                                 features=getattr(state["features"], "val", None))
        recalls = distributed.broadcast_object(recalls)  # one early-stop decision for all
        row = {"epoch": epoch, **stats, "lr": optimizer.param_groups[0]["lr"],
               **{f"recall@{n}": r for n, r in recalls.items()},
               "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        is_best = recalls[5] > best_score
        if is_best:
            best_score, best_epoch = recalls[5], epoch
        ckpt = {"config": dataclasses.asdict(config), "model_config": model_config(model),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "neg_cache": state["neg_cache"].state_dict(), "rng": _rng_states(rng),
                "history": history, "best_score": best_score, "best_epoch": best_epoch}
        atomic_save(ckpt, run_dir / "latest.pth")
        if is_best:
            atomic_save(ckpt, run_dir / "best.pth")
        _write_log(run_dir, history)
        print(f"epoch {epoch}: loss {stats['loss']:.4f}, val R@1 {recalls[1]:.3f} "
              f"R@5 {recalls[5]:.3f} ({row['seconds']:.0f} s){' *best*' if is_best else ''}")
        epochs_run += 1
        if stop_after is not None and epochs_run >= stop_after:
            return history
    if distributed.is_main():
        (run_dir / "finished").write_text(json.dumps({"best_epoch": best_epoch,
                                                      "best_recall@5": best_score}))
    return history


def load_trained(config, run_dir, device=None):
    """The best model of a finished run in `run_dir`, training (or resuming) it first if needed.

    Lets a notebook run in a fresh kernel: the first call trains, later calls only load.

    Returns:
        (model, history): the model with the best checkpoint's weights, and the epoch log.
    """
    run_dir = Path(run_dir)
    train_split = load_split(config.data_root, "train", name=config.dataset)
    _check_run_config(run_dir, config, train_split)
    if not (run_dir / "finished").exists():
        train(config, run_dir, resume=True)
    device = torch.device(device) if device else resolve_device(config)
    model = make_model(config, train_split, device)
    ckpt = load_checkpoint(run_dir / "best.pth", model_config(model))
    model.load_state_dict(ckpt["model"])
    return model, json.loads((run_dir / "log.json").read_text())


# ---------------------------------------------------------------------------------------------
# Evaluating a checkpoint (the `evaluate` command)
# ---------------------------------------------------------------------------------------------


def evaluate_checkpoint(data_root, split="test", checkpoint=None, untrained=False,
                        preset="tiny", pca=False, pca_dim=None, name=None, device=None,
                        precision=None):
    """Recall@N of a trained checkpoint, or of the untrained model (`untrained=True`).

    The untrained model is built exactly as training starts: the same seed and k-means centroids.
    With `pca`, whitening is fitted on up to 10,000 training-database descriptors (or taken from
    the checkpoint when it has one).

    Returns:
        dict with `recall@N` for N in `RECALL_VALUES`, plus `split`, `dim` and `num_queries`.
    """
    if checkpoint is None and not untrained:
        raise ValueError("give --checkpoint RUN_DIR/best.pth, or --untrained")
    config = get_preset(preset)
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        config = TrainConfig(**{**ckpt["config"], "image_size": _tuple(ckpt["config"])})
    config = config.replace(data_root=str(data_root),
                            **({"precision": precision} if precision else {}),
                            **({"dataset": name} if name else {}),
                            **({"device": device} if device else {}))
    device = resolve_device(config)
    train_split = load_split(config.data_root, "train", name=config.dataset)
    eval_split = load_split(config.data_root, split, name=config.dataset)
    model = make_model(config, train_split, device)
    if checkpoint is not None:
        load_checkpoint(checkpoint, model_config(model))
        model.load_state_dict(ckpt["model"])
    if pca:
        model.pca = load_or_fit_pca(model, config, train_split, device, pca_dim,
                                    checkpoint if checkpoint is not None and not untrained
                                    else None)
    recalls = evaluate_split(model, eval_split, config, device)
    result = {f"recall@{n}": float(r) for n, r in recalls.items()}
    result.update(split=split, dim=int(model.out_dim), num_queries=int(eval_split.db.numQ),
                  model="untrained" if untrained and checkpoint is None else str(checkpoint))
    return result


def load_or_fit_pca(model, config, train_split, device, pca_dim=None, checkpoint=None):
    """PCA whitening of `model`: from `checkpoint` if it holds one of that size, else fitted.

    Fitting uses up to 10,000 training-database descriptors (the reference); the fitted layer is
    then stored in the checkpoint (`ckpt["pca"]`, written atomically) for the next evaluation.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint else {}
    stored = ckpt.get("pca")
    if stored is not None and (pca_dim is None or stored["out_dim"] == pca_dim):
        layer = PCAWhitening(stored["in_dim"], stored["out_dim"])
        layer.load_state_dict(stored["state_dict"])
        return layer.to(device)
    db_desc, _ = split_descriptors(model, train_split, config, device,
                                   label="Descriptors for PCA")
    db_desc = db_desc[np.random.default_rng(config.seed).permutation(len(db_desc))[:10000]]
    layer = fit_pca_whitening(db_desc, min(pca_dim or config.pca_dim, len(db_desc) - 1))
    if checkpoint:
        ckpt["pca"] = {"in_dim": layer.in_dim, "out_dim": layer.out_dim,
                       "state_dict": layer.state_dict()}
        atomic_save(ckpt, checkpoint)
    return layer.to(device)


def _tuple(cfg):
    return tuple(cfg["image_size"]) if cfg.get("image_size") else None
