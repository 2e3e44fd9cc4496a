"""Stage 5: training with hard-negative mining and cache refreshes, checkpoints, resume.

Read top to bottom like the notebook `05_training.ipynb`:
what a run costs -> the optimizer -> one epoch (refresh the descriptor cache, mine, train) ->
the run folder -> the whole run, in named steps. How the model runs (precision, images or
cached local features) is decided once, by the run's `run_model.RunModel`.
"""

import csv
import dataclasses
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__, distributed
from .backbone import get_backbone
from .checkpoints import check_model_config, checkpoint_config, load_checkpoint, load_weights
from .config import ArgumentError, TrainConfig
from .data import NegativeSampler, data_fingerprint, load_split, train_positives
from .dbstruct import DataLayoutError
from .evaluate import evaluate_split
from .files import (
    atomic_json,
    atomic_save,
    atomic_write,
    fault_point,
    folder_lock,
    remove_temporary_files,
)
from .images import input_transform
from .mining import (
    POOL_GROUP,
    MiningState,
    NegativeCache,
    TripletDataset,
    collate_fn,
    mine_triplets,
)
from .model import make_model, model_config
from .precision import check_device, resolve_device
from .run_model import RunModel
from .utils import display_path, progress_bar, progress_hidden, set_seed, transient_progress

# ---------------------------------------------------------------------------------------------
# What a run costs, and its optimizer
# ---------------------------------------------------------------------------------------------


REAL_SCALE_IMAGES = 5000  # `train` prints `estimate_run` for training splits at least this big


def estimate_run(config, num_db, num_q, verbose=True):
    """What a training run costs before it starts: images to encode, cache size, disk.

    Each epoch mines `min(num_q, max_queries)` queries; before every `cache_refresh` of them the
    whole training split (database + queries) is encoded again, then every mined tuple encodes
    its query, its positive and at most `n_neg` negatives (an upper bound: skipped queries and
    fewer violating negatives encode less). The cache holds one K*D-D vector per image (D:
    the backbone's channels, 512 for VGG16).

    Args:
        config: a `TrainConfig`.
        num_db, num_q: database images and queries of the training split.
        verbose: print the estimate.

    Returns:
        dict with `queries_per_epoch`, `refreshes_per_epoch`, `cache_images_per_epoch`,
        `train_images_per_epoch`, `images_per_epoch`, `images_total` (all epochs),
        `descriptor_dim`, `cache_bytes_float16`, `cache_bytes_float32`, `disk_bytes` (a
        disk-backed float16 cache: one .npy file of the cache's size) and
        `mining_bytes_per_epoch` (cache rows mining reads, positives left out: a lower bound).
    """
    queries = min(num_q, config.max_queries) if config.max_queries else num_q
    refreshes = math.ceil(queries / config.cache_refresh)
    cache_images = refreshes * (num_db + num_q)
    train_images = queries * (2 + config.n_neg)
    dim = config.num_clusters * get_backbone(config.backbone).channels  # K * D
    est = {"queries_per_epoch": queries, "refreshes_per_epoch": refreshes,
           "cache_images_per_epoch": cache_images, "train_images_per_epoch": train_images,
           "images_per_epoch": cache_images + train_images,
           "images_total": (cache_images + train_images) * config.epochs,
           "descriptor_dim": dim, "cache_bytes_float16": (num_db + num_q) * dim * 2,
           "cache_bytes_float32": (num_db + num_q) * dim * 4}
    est["disk_bytes"] = est["cache_bytes_float16"]
    pool_rows = config.n_neg_sample + max(8, config.n_neg_sample // 20)  # `draw_shared`'s pool
    rows_per_query = (config.n_neg_sample if config.negative_pool == "query" else
                      pool_rows / POOL_GROUP) + config.n_neg  # sampled + cached negatives
    est["mining_bytes_per_epoch"] = round(queries * rows_per_query * dim * 2)
    if verbose:
        gib = 2 ** 30
        print(f"Estimate: {queries:,} queries per epoch, {refreshes} cache refreshes of "
              f"{num_db + num_q:,} images = {cache_images:,} images to cache + at most "
              f"{train_images:,} to train on, per epoch; {est['images_total']:,} over "
              f"{config.epochs} epochs. Cache {dim:,}-D: "
              f"{est['cache_bytes_float16'] / gib:.1f} GiB in float16 "
              f"({est['cache_bytes_float32'] / gib:.1f} GiB in float32); a disk-backed cache "
              f"needs {est['disk_bytes'] / gib:.1f} GiB of disk. Mining reads at least "
              f"{est['mining_bytes_per_epoch'] / gib:,.0f} GiB of it per epoch "
              f"(negative_pool={config.negative_pool!r}).")
    return est


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
# One epoch: refresh the cache, mine tuples, train on them, repeat
# ---------------------------------------------------------------------------------------------


def train_epoch(run, optimizer, state, config):
    """One pass over the training queries, refreshing the cache every `cache_refresh` queries.

    Args:
        run: the run's `RunModel`: it gives the descriptors and takes the training steps.
        state: the `mining.MiningState` shared across epochs (the negative cache and the RNG
            carry over), with the `work_dir` of disk-backed caches.

    Returns:
        dict with the mean loss, the number of tuples trained on and of skipped queries.
    """
    queries, num_db = epoch_queries(state, config), state.split.db.numDb
    total_loss, num_tuples, num_skipped = 0.0, 0, 0
    for start in range(0, len(queries), config.cache_refresh):
        # 1. Refresh the cache: descriptors of the whole training split with the current model.
        cache = run.encode_split(state.split, "train", label="Refreshing cache",
                                work_dir=state.work_dir)  # (numDb + numQ, out_dim) float16
        db_desc, q_desc = cache[:num_db], cache[num_db:]
        # 2. Mine: best positive and hard negatives for each query of this subset.
        subset = queries[start:start + config.cache_refresh]
        tuples, skipped = mine_shared(subset, q_desc, db_desc, state, config)
        num_skipped += skipped
        # 3. Train on the mined tuples, one batch at a time.
        run.model.train()
        for batch, share in tuple_batches(tuples, run, state, config):
            loss, num = run.train_step(batch, optimizer, config.margin, share)
            total_loss += loss * num
            num_tuples += num
    return {"loss": total_loss / max(num_tuples, 1), "tuples": num_tuples,
            "skipped": num_skipped}


def epoch_queries(state, config):
    """This epoch's training queries (those with a training positive), shuffled, at most
    `config.max_queries` of them."""
    queries = np.array([q for q, pos in enumerate(state.positives) if len(pos) > 0])
    return queries[state.rng.permutation(len(queries))][:config.max_queries]


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
    rng, neg_cache = state.rng, state.neg_cache
    mined = None
    if distributed.is_main():
        mined = mine_triplets(subset, q_desc, db_desc, state.positives, state.sampler,
                              rng, neg_cache, n_neg_sample=config.n_neg_sample,
                              n_neg_dist=config.n_neg_dist, n_neg=config.n_neg,
                              margin=config.margin, negative_pool=config.negative_pool,
                              workspace=state.workspace)
    if not distributed.is_initialized():
        return mined
    shared = distributed.broadcast_object(
        (*mined, neg_cache.state_dict(), rng.bit_generator.state) if mined else None)
    tuples, skipped, cache_state, rng.bit_generator.state = shared
    neg_cache.load_state_dict(cache_state)
    return tuples, skipped


def tuple_batches(tuples, run, state, config):
    """(batch, share) over the mined tuples: `collate_fn` batches of their images, or of their
    cached local features (the run's source decides); `share` is this rank's
    `distributed.Share` of the global batch under torchrun, else None."""
    if not tuples:
        return
    plan = (distributed.batch_plan([len(t.negatives) for t in tuples], config.batch_size)
            if distributed.is_initialized() else None)
    split = state.split
    dataset = TripletDataset(split.root, split.db, tuples,
                             transform=input_transform(config.image_size),
                             queries_dir=split.queries_dir,
                             features=run.source.tuple_features("train"))
    batching = ({"batch_size": config.batch_size, "shuffle": False} if plan is None
                else {"batch_sampler": [share.local for share in plan]})
    loader = DataLoader(dataset, **batching, num_workers=run.source.num_workers,
                        collate_fn=collate_fn, pin_memory=run.device.type == "cuda")
    bar = progress_bar(loader, desc="Training", leave=False, disable=progress_hidden())
    for i, batch in enumerate(bar):
        yield batch, None if plan is None else plan[i]


# ---------------------------------------------------------------------------------------------
# The run folder: checkpoints, logs, resume and repair
# ---------------------------------------------------------------------------------------------


def _rng_states(rng):
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "python": random.getstate()}


def _set_rng_states(rng, states):
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])


# How the library names `train`'s arguments in its errors (`config.ArgumentError`).
RUN_ARGUMENTS = {"resume": "`resume=True`", "overwrite": "`overwrite=True`", "out": "`run_dir`"}
RUN_FILES = ("latest.pth", "best.pth", "log.json", "log.csv", "finished", "config.json",
             "data.json")
# Settings that may change between the runs of one folder (`--resume`): not part of its identity.
RESUMABLE_CHANGES = ("epochs", "precision", "device", "num_workers", "cache_storage",
                     "feature_cache")


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
        raise ArgumentError(f"{path} is not readable JSON ({err}); the run folder is damaged: "
                            "use a new `run_dir`, or `overwrite=True` to start this one again",
                            **RUN_ARGUMENTS) from err


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
        raise ArgumentError(f"{run_dir} holds a run with another configuration (changed: "
                            f"{', '.join(changed)}); resume it with its own settings, give a "
                            "new `run_dir`, or `overwrite=True` to replace it", **RUN_ARGUMENTS)
    data_file = run_dir / "data.json"
    if train_split is not None and data_file.exists():
        saved = _read_json(data_file)
        saved = saved.get("train_fingerprint") if isinstance(saved, dict) else None
        if saved != data_fingerprint(train_split):
            raise ArgumentError(f"{run_dir} holds a run trained on other data than "
                                f"{train_split.root}: images were added, removed or changed (by "
                                "size or modification time), or the run is from an older "
                                "version; give its data, a new `run_dir`, or `overwrite=True` to "
                                "replace it", **RUN_ARGUMENTS)


RESUME_KEYS = {"optimizer": dict, "scheduler": dict, "epoch": int, "neg_cache": dict,
               "rng": dict, "history": list, "best_score": (int, float), "best_epoch": int}


def _check_resumable(latest, path):
    """Raise unless checkpoint `latest` holds everything `resume_from` reads, of its type."""
    for key, kind in RESUME_KEYS.items():
        if not isinstance(latest.get(key), kind):
            found = "nothing" if key not in latest else type(latest[key]).__name__
            raise ArgumentError(f"{path} cannot be resumed: its {key!r} is {found}, not "
                                f"{getattr(kind, '__name__', 'a number')} (damaged, or not "
                                "written by `train`); give a new `run_dir`, or "
                                "`overwrite=True` to start again", **RUN_ARGUMENTS)
    missing = {"numpy", "torch", "python"} - latest["rng"].keys()
    if missing:
        raise ArgumentError(f"{path} cannot be resumed: its random number state lacks "
                            f"{', '.join(sorted(missing))}; give a new `run_dir`, or "
                            "`overwrite=True`", **RUN_ARGUMENTS)


def _check_run_dir(run_dir, resume, overwrite):
    """Refuse to reuse `run_dir` silently; returns the run files it holds.

    Without `resume` a folder holding a run is refused unless `overwrite`; `resume` needs its
    `latest.pth` when anything else of a run (best.pth, a log, `finished`) is there.
    """
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not resume and not overwrite:
        raise ArgumentError(f"{run_dir} already holds a run ({', '.join(found)}); give "
                            "`resume=True` to continue it, a new `run_dir`, or `overwrite=True` "
                            "to replace it", **RUN_ARGUMENTS)
    if resume and not (run_dir / "latest.pth").exists() and set(found) - {"config.json",
                                                                           "data.json"}:
        raise ArgumentError(f"{run_dir} has {', '.join(found)} but no latest.pth, so it cannot "
                            "be resumed; give a new `run_dir`, or `overwrite=True` to replace it",
                            **RUN_ARGUMENTS)
    return found


def _clean_run_dir(run_dir, found, overwrite):
    """Delete the old run's files (with `overwrite`) and the temporary files of killed writes."""
    if overwrite:
        for name in found:
            (run_dir / name).unlink()
        for path in [*run_dir.glob("best.pca*.pth"), *run_dir.glob("latest.pca*.pth")]:
            # the PCA files of the replaced checkpoints (`evaluate --save-pca`), none other
            path.unlink()
    for path in remove_temporary_files(run_dir, RUN_FILES):
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
            raise ArgumentError(f"{best_path} should hold epoch {best_epoch} (the best by "
                                f"{run_dir / 'latest.pth'}), but holds "
                                f"{'nothing readable' if best is None else best.get('epoch')}; "
                                "it cannot be rebuilt: give a new `run_dir`, or "
                                "`overwrite=True`", **RUN_ARGUMENTS)
        print(f"Repairing {display_path(best_path)}: epoch {best_epoch}, from latest.pth")
        atomic_save(latest, best_path)
    _write_log(run_dir, latest["history"])


# ---------------------------------------------------------------------------------------------
# The whole run, in named steps
# ---------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """Where a run stands: the epoch log, the best val R@5 and its epoch, the next epoch."""

    history: list = field(default_factory=list)
    best_score: float = -1.0
    best_epoch: int = -1
    start_epoch: int = 0


def prepare_run(config, run_dir, resume, overwrite):
    """Check the settings, the data and the run folder; write `config.json` and `data.json`.

    Returns:
        (device, train_split, val_split, latest): `latest` is the checkpoint to resume from,
        or None to start from scratch.
    """
    if resume and overwrite:
        raise ArgumentError("give either `resume=True` or `overwrite=True`, not both",
                            **RUN_ARGUMENTS)
    found = _check_run_dir(run_dir, resume, overwrite)
    device = resolve_device(config)
    train_split = load_split(config.data_root, "train", name=config.dataset, allow_flat=False)
    val_split = load_split(config.data_root, "val", name=config.dataset, allow_flat=False)
    if train_split.db.numDb + train_split.db.numQ >= REAL_SCALE_IMAGES:
        estimate_run(config, train_split.db.numDb, train_split.db.numQ)
    if not any(len(p) for p in train_positives(train_split.db)):
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
        _check_resumable(latest, run_dir / "latest.pth")
    distributed.barrier()  # torchrun: every rank has checked the folder before rank 0 writes
    if distributed.is_main():
        _clean_run_dir(run_dir, found, overwrite)
    if resume and latest is None:
        print(f"No {display_path(run_dir / 'latest.pth')} yet: starting from scratch")
    # Written before k-means: a read-only or full --out is found at once.
    atomic_json(_config_json(config), run_dir / "config.json")
    atomic_json({"data_root": str(config.data_root),
                 "train_fingerprint": data_fingerprint(train_split)}, run_dir / "data.json")
    return device, train_split, val_split, latest


def mining_state(config, split, run_dir):
    """The `MiningState` of a new run on `split`: no cached negatives yet, the run's seed."""
    return MiningState(split, train_positives(split.db), NegativeSampler(split.db),
                       np.random.default_rng(config.seed),
                       NegativeCache(split.db.numQ, config.n_neg), work_dir=run_dir)


def resume_from(latest, run_dir, model, optimizer, scheduler, state, config):
    """Restore the weights, optimizer, schedule, negative cache and RNGs of `latest`; repair
    what a kill left behind. Returns the `RunRecord` to continue."""
    path = run_dir / "latest.pth"
    check_model_config(latest, path, model_config(model))
    load_weights(model, latest, path)
    optimizer.load_state_dict(latest["optimizer"])
    scheduler.load_state_dict(latest["scheduler"])
    state.neg_cache.load_state_dict(latest["neg_cache"])
    _set_rng_states(state.rng, latest["rng"])
    record = RunRecord(latest["history"], latest["best_score"], latest["best_epoch"],
                       latest["epoch"] + 1)
    _repair_run(run_dir, latest)
    if record.start_epoch < config.epochs and distributed.is_main():
        (run_dir / "finished").unlink(missing_ok=True)  # more epochs to go
    print(f"Resuming {display_path(run_dir)} after epoch {latest['epoch']}")
    return record


def validate(run, val_split, config):
    """Recall@N on the validation split, from the run's source (the val split's local
    features, or its images); under torchrun the same on every rank."""
    recalls = evaluate_split(run, val_split, config, run.device, key="val")
    return distributed.broadcast_object(recalls)  # one early-stop decision for all


def record_epoch(record, epoch, stats, recalls, optimizer, seconds):
    """Append the epoch's row to `record.history`; True if its val R@5 is the best so far."""
    record.history.append({"epoch": epoch, **stats, "lr": optimizer.param_groups[0]["lr"],
                           **{f"recall@{n}": float(r) for n, r in recalls.items()},
                           "seconds": round(seconds, 2)})
    if recalls[5] <= record.best_score:
        return False
    record.best_score, record.best_epoch = float(recalls[5]), epoch
    return True


def make_checkpoint(config, model, optimizer, scheduler, epoch, state, record):
    """Everything `--resume` needs to continue after `epoch` as if never stopped."""
    return {"config": dataclasses.asdict(config), "model_config": model_config(model),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch,
            "neg_cache": state.neg_cache.state_dict(), "rng": _rng_states(state.rng),
            "history": record.history, "best_score": record.best_score,
            "best_epoch": record.best_epoch, "version": __version__}


def stops_early(record, epoch, config):
    """True when `config.patience` epochs have passed without a better val R@5."""
    if epoch - record.best_epoch > config.patience and record.best_epoch >= 0:
        print(f"Early stop: no better val R@5 for {config.patience} epochs")
        return True
    return False


def run_lock(run_dir):
    """The lock file of a run folder, beside it: `RUNS/.NAME.lock` (`files.folder_lock`)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def train(config, run_dir, resume=False, stop_after=None, overwrite=False):
    """`_train`, holding the run folder's lock (`run_lock`): a second `train` on `run_dir` is
    refused (`files.FolderInUseError`) while this one runs, so no folder mixes two runs."""
    run_dir = Path(run_dir)
    with folder_lock(run_lock(run_dir), run_dir, "train"):
        return _train(config, run_dir, resume, stop_after, overwrite)


def _train(config, run_dir, resume=False, stop_after=None, overwrite=False):
    """Train NetVLAD; checkpoints `latest.pth` and `best.pth` (by val R@5) in `run_dir`.

    Args:
        config: a `TrainConfig` (see `PRESETS`).
        run_dir: the run folder; `resume` continues from its `latest.pth`.
        resume: continue an interrupted run with the same final weights as an uninterrupted one
            (or extend a finished one to more `epochs`); a folder with no run starts fresh.
        stop_after: stop after this many epochs in this call (simulates an interruption).
        overwrite: replace the run that `run_dir` holds (else it is refused without `resume`).

    Returns:
        the per-epoch history (list of dicts), also in `run_dir/log.json` and `log.csv`.

    Raises:
        config.ArgumentError (a ValueError) for a run folder that these arguments cannot use;
        ValueError, FileNotFoundError, OSError: with one line naming the file and the choices.
    """
    run_dir = Path(run_dir)
    device, train_split, val_split, latest = prepare_run(config, run_dir, resume, overwrite)
    set_seed(config.seed)  # the run's global random state (checkpoints save it for resume)
    run = RunModel.build(config, train_split, device)  # decides precision and source, once
    model = run.model
    optimizer, scheduler = make_optimizer(config, model)
    distributed.announce(config.batch_size, config.lr)
    state, record = mining_state(config, train_split, run_dir), RunRecord()
    if latest is not None:
        record = resume_from(latest, run_dir, model, optimizer, scheduler, state, config)
        del latest
    # A frozen encoder (`tiny-random`) or prefix (`tiny`) runs once per image here.
    run.source.prepare({"train": train_split, "val": val_split}, run_dir)
    for epochs_run, epoch in enumerate(range(record.start_epoch, config.epochs), start=1):
        if stops_early(record, epoch, config):
            break
        t0 = time.perf_counter()
        with transient_progress():  # the epoch's bars are erased; its summary line stays
            stats = train_epoch(run, optimizer, state, config)
        fault_point("epoch-trained")
        if stats["tuples"] == 0:
            print(f"epoch {epoch}: no tuple to train on ({stats['skipped']} queries skipped: "
                  "no negative violates the margin)")
        scheduler.step()
        with transient_progress():
            recalls = validate(run, val_split, config)
        is_best = record_epoch(record, epoch, stats, recalls, optimizer, time.perf_counter() - t0)
        ckpt = make_checkpoint(config, model, optimizer, scheduler, epoch, state, record)
        _commit_epoch(run_dir, ckpt, is_best)
        print(f"epoch {epoch}: loss {stats['loss']:.4f}, val R@1 {recalls[1]:.3f} "
              f"R@5 {recalls[5]:.3f} ({record.history[-1]['seconds']:.0f} s)"
              f"{' *best*' if is_best else ''}")
        if stop_after is not None and epochs_run >= stop_after:
            return record.history
    atomic_json({"best_epoch": record.best_epoch, "best_recall@5": record.best_score,
                 "epochs": len(record.history)}, run_dir / "finished")
    return record.history


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
    load_weights(model, ckpt, run_dir / "best.pth")
    return model, _read_json(run_dir / "log.json")
