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

from .data import (
    NegativeSampler,
    WholeDataset,
    eval_positives,
    input_transform,
    load_split,
    train_positives,
)
from .evaluate import RECALL_VALUES, recall_at_n
from .features import compute_descriptors
from .mining import NegativeCache, TripletDataset, collate_fn, mine_triplets, triplet_loss
from .model import PCAWhitening, build_model, fit_pca_whitening, init_netvlad, model_config
from .utils import REPO_ROOT, amp_supported, atomic_save, autocast, get_device, set_seed

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
    amp: bool = True  # bf16 autocast + channels_last where the device supports it
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
                 amp=config.amp and amp_supported(device))
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


def split_descriptors(model, split, config, device, desc="Caching descriptors"):
    """(db_desc, q_desc) of a split: one cache pass over database then queries."""
    amp = config.amp and amp_supported(device)
    desc_all = compute_descriptors(model, whole_dataset(split, config),
                                   batch_size=config.cache_batch_size,
                                   num_workers=config.num_workers, device=device, amp=amp,
                                   desc=desc)
    return desc_all[: split.db.numDb], desc_all[split.db.numDb:]


def evaluate_split(model, split, config, device, n_values=RECALL_VALUES):
    """Recall@N on a split (evaluation positives: within posDistThr, 25 m)."""
    db_desc, q_desc = split_descriptors(model, split, config, device,
                                        desc=f"Evaluating ({split.db.whichSet})")
    return recall_at_n(q_desc, db_desc, eval_positives(split.db), n_values=n_values)


# ---------------------------------------------------------------------------------------------
# One epoch: refresh the cache, mine tuples, train on them, repeat
# ---------------------------------------------------------------------------------------------


def train_epoch(model, optimizer, state, config, device):
    """One pass over the training queries, refreshing the cache every `cache_refresh` queries.

    Args:
        state: dict with `split`, `positives`, `sampler`, `neg_cache` and `rng`, shared
            across epochs (the negative cache and the RNG carry over).

    Returns:
        dict with the mean loss, the number of tuples trained on and of skipped queries.
    """
    split, rng = state["split"], state["rng"]
    numDb = split.db.numDb
    queries = np.array([q for q, pos in enumerate(state["positives"]) if len(pos) > 0])
    queries = queries[rng.permutation(len(queries))][:config.max_queries]
    amp = config.amp and amp_supported(device)
    margin = math.sqrt(config.margin)
    total_loss, num_tuples, num_skipped = 0.0, 0, 0

    for start in range(0, len(queries), config.cache_refresh):
        subset = queries[start:start + config.cache_refresh]
        # 1. Refresh the cache: descriptors of the whole training split with the current model.
        cache = compute_descriptors(model, whole_dataset(split, config),
                                    batch_size=config.cache_batch_size,
                                    num_workers=config.num_workers, device=device, amp=amp,
                                    dtype=np.float32, desc="Refreshing cache")
        db_desc, q_desc = cache[:numDb], cache[numDb:]
        # 2. Mine: best positive and hard negatives for each query of this subset.
        tuples, skipped = mine_triplets(subset, q_desc, db_desc, state["positives"],
                                        state["sampler"], rng, state["neg_cache"],
                                        n_neg_sample=config.n_neg_sample,
                                        n_neg_dist=config.n_neg_dist, n_neg=config.n_neg,
                                        margin=config.margin)
        num_skipped += skipped
        if not tuples:
            continue
        # 3. Train on the mined tuples.
        dataset = TripletDataset(split.root, split.db, tuples,
                                 transform=input_transform(config.image_size),
                                 queries_dir=split.queries_dir)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                            num_workers=config.num_workers, collate_fn=collate_fn,
                            pin_memory=device.type == "cuda")
        model.train()
        for query, positive, negatives, neg_counts, _ in tqdm(loader, desc="Training",
                                                              leave=False):
            images = torch.cat([query, positive, negatives]).to(device)
            # `images`: (2B + sum(neg_counts), 3, H, W)
            if amp:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                desc = model(images)
            desc = desc.float()
            B = query.shape[0]
            # `q`, `p`: (B, dim); `n`: (sum(neg_counts), dim)
            q, p, n = desc[:B], desc[B:2 * B], desc[2 * B:]
            loss = triplet_loss(q, p, n, neg_counts.to(device), margin=margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * B
            num_tuples += B
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
    """`log.csv` and `log.json`: one row per epoch."""
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
    rng = np.random.default_rng(config.seed)
    positives = train_positives(train_split.db)
    state = {"split": train_split, "positives": positives,
             "sampler": NegativeSampler(train_split.db), "rng": rng,
             "neg_cache": NegativeCache(train_split.db.numQ, config.n_neg)}
    history, best_score, best_epoch, start_epoch = [], -1.0, -1, 0

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

    (run_dir / "config.json").write_text(json.dumps(_config_json(config), indent=1))
    (run_dir / "data.json").write_text(json.dumps(
        {"data_root": str(config.data_root), "train_fingerprint": data_fingerprint(train_split)}))
    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        if epoch - best_epoch > config.patience and best_epoch >= 0:
            print(f"Early stop: no better val R@5 for {config.patience} epochs")
            break
        t0 = time.perf_counter()
        stats = train_epoch(model, optimizer, state, config, device)
        scheduler.step()
        recalls = evaluate_split(model, val_split, config, device)
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
                        amp=True):
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
    config = config.replace(data_root=str(data_root), amp=amp,
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
    db_desc, _ = split_descriptors(model, train_split, config, device, desc="Descriptors for PCA")
    db_desc = db_desc[np.random.default_rng(config.seed).permutation(len(db_desc))[:10000]]
    layer = fit_pca_whitening(db_desc, min(pca_dim or config.pca_dim, len(db_desc) - 1))
    if checkpoint:
        ckpt["pca"] = {"in_dim": layer.in_dim, "out_dim": layer.out_dim,
                       "state_dict": layer.state_dict()}
        atomic_save(ckpt, checkpoint)
    return layer.to(device)


def _tuple(cfg):
    return tuple(cfg["image_size"]) if cfg.get("image_size") else None
