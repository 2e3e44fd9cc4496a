"""Stage 6 (and the recall of stages 3 and 5): exact search, Recall@N, checkpoint evaluation.

Reads top to bottom: exact nearest-neighbour search -> Recall@N -> panoramas (Tokyo 24/7) ->
the descriptors of a split and its recall -> evaluating a checkpoint, with PCA whitening.
"""

import csv
import hashlib
import os
from dataclasses import dataclass
from math import comb
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .checkpoints import (
    check_model_config,
    checkpoint_config,
    detect_model_format,
    load_checkpoint,
    load_model,
    load_weights,
)
from .config import PRESETS, ArgumentError, get_preset
from .data import eval_positives, load_split
from .files import atomic_save, atomic_write, load_torch_file
from .model import model_config
from .pca import PCAWhitening, fit_pca_whitening
from .precision import get_device, resolve_device
from .run_model import ImageSource, RunModel, as_run
from .utils import display_path

RECALL_VALUES = (1, 5, 10, 20)


def _as_tensor(x, device):
    """`x` (numpy array, memmap or tensor) as a float16/float32 tensor on `device`."""
    if not torch.is_tensor(x):
        x = torch.from_numpy(np.require(x, requirements="W"))  # read-only memmaps: a copy
    if x.dtype not in (torch.float16, torch.float32):
        x = x.float()
    return x.to(device)


def topk_search(q, db, k, chunk_size=1024, device=None):
    """Exact L2 `k` nearest database rows of each query: (dist (M, k) float32, idx (M, k) int64).

    Distances are Euclidean (not squared), sorted ascending. The squared distance is expanded as
    ‖q‖² + ‖d‖² − 2 q·d and computed in float32 one (query chunk × database chunk) block at a
    time, so float16 inputs never become a float64 or a full M × N matrix. The database is read
    once, in chunks (it may be a disk-backed memmap); the running top-k of every query is merged
    with each chunk's top-k.

    Args:
        q: (M, D) query descriptors, numpy or torch.
        db: (N, D) database descriptors, numpy (memmap ok) or torch.
        k: neighbours per query (at most N are returned).
        chunk_size: rows per query chunk and per database chunk.
        device: where to compute (default: `q`'s device if a tensor, else
            `precision.get_device()`).
    """
    if device is None:
        device = q.device if torch.is_tensor(q) else get_device()
    num_q, num_db = len(q), len(db)
    k = min(k, num_db)
    q = _as_tensor(q, device)
    q_sq = torch.cat([c.float().square().sum(1) for c in q.split(chunk_size)])  # (M,)
    best_dist = torch.full((num_q, k), float("inf"), device=device)  # (M, k) squared
    best_idx = torch.full((num_q, k), -1, dtype=torch.long, device=device)  # (M, k)
    for start in range(0, num_db, chunk_size):
        d = _as_tensor(db[start:start + chunk_size], device).float()  # `d`: (C, D)
        d_sq = d.square().sum(1)  # (C,)
        d_idx = torch.arange(start, start + len(d), device=device)  # (C,)
        for qs in range(0, num_q, chunk_size):
            qe = min(qs + chunk_size, num_q)
            dist = q_sq[qs:qe, None] + d_sq[None] - 2 * q[qs:qe].float() @ d.T  # (m, C)
            dist = torch.cat([best_dist[qs:qe], dist], dim=1)  # (m, k + C)
            idx = torch.cat([best_idx[qs:qe], d_idx.expand(qe - qs, -1)], dim=1)  # (m, k + C)
            # A stable sort keeps equal distances in index order (`idx` ascends along a row).
            dist, order = dist.sort(dim=1, stable=True)  # (m, k + C)
            best_dist[qs:qe], best_idx[qs:qe] = dist[:, :k], idx.gather(1, order[:, :k])
    # Equal distances come out in database-index order, so rankings do not depend on `k`.
    return best_dist.clamp_min(0).sqrt().cpu().numpy(), best_idx.cpu().numpy()


def first_hit_rank(predictions, positives):
    """Rank (0-based) of the first correct prediction of each query, `inf` when there is none.

    Args:
        predictions: (M, k) database indices, nearest first (-1 = padding, never correct).
        positives: per query, the array of its positive database indices.
    """
    ranks = np.full(len(predictions), np.inf)  # `ranks`: (M,)
    for i, (pred, pos) in enumerate(zip(np.asarray(predictions), positives, strict=True)):
        hits = np.flatnonzero(np.isin(pred, pos))
        if len(hits):
            ranks[i] = hits[0]
    return ranks


def recall_from_predictions(predictions, positives, n_values=RECALL_VALUES):
    """Recall@N for each N in `n_values` from precomputed (M, k) predictions, as fractions.

    As in Nanne/pytorch-NetVlad, the denominator is the number of queries of the split: a query
    without any positive counts as a failure.
    """
    ranks = first_hit_rank(predictions, positives)
    return {n: float(np.mean(ranks < n)) for n in n_values}


def recall_at_n(q_desc, db_desc, positives, n_values=RECALL_VALUES, device=None):
    """Recall@N (fractions in [0, 1]) of exact L2 search of `q_desc` in `db_desc`."""
    _, predictions = topk_search(q_desc, db_desc, max(n_values), device=device)
    return recall_from_predictions(predictions, positives, n_values)


def recall_curve(q_desc, db_desc, positives, max_n=100, device=None):
    """Recall@1 … Recall@`max_n` as a (max_n,) array (entry i is Recall@(i+1))."""
    _, predictions = topk_search(q_desc, db_desc, max_n, device=device)
    ranks = first_hit_rank(predictions, positives)  # (M,)
    return np.array([np.mean(ranks < n) for n in range(1, max_n + 1)])


# ---------------------------------------------------------------------------------------------
# Reading the results: chance, paired before/after, distances, neighbours
# ---------------------------------------------------------------------------------------------


def chance_recall(positives, num_db, n):
    """Recall@n of a random ranking of the database, averaged over the queries.

    A query with P positives among `num_db` images misses them all in n draws without
    replacement with probability C(num_db − P, n) / C(num_db, n) (hypergeometric); a query
    without any positive always misses, as in `recall_from_predictions`.
    """
    n = min(n, num_db)
    return float(np.mean([1 - comb(num_db - len(p), n) / comb(num_db, n) for p in positives]))


def hits_at_n(predictions, positives, n):
    """(M,) booleans: whether each query has a positive among its first `n` predictions."""
    return first_hit_rank(predictions, positives) < n


@dataclass(frozen=True)
class PairedOutcomes:
    """The same queries at Recall@`n` before and after (e.g. untrained and trained model).

    `before`, `after`: (M,) booleans, correct at R@n. `both`, `fixed` (wrong → correct),
    `broken` (correct → wrong) and `neither` are query indices; only `fixed` and `broken` say
    anything about the change, and McNemar's test (`p_value`) asks whether they differ by more
    than chance.
    """

    n: int
    before: np.ndarray
    after: np.ndarray

    @property
    def both(self):
        return np.flatnonzero(self.before & self.after)

    @property
    def fixed(self):
        return np.flatnonzero(~self.before & self.after)

    @property
    def broken(self):
        return np.flatnonzero(self.before & ~self.after)

    @property
    def neither(self):
        return np.flatnonzero(~self.before & ~self.after)

    @property
    def table(self):
        """Counts (2, 2): rows before correct / wrong, columns after correct / wrong."""
        return np.array([[len(self.both), len(self.broken)],
                         [len(self.fixed), len(self.neither)]])

    @property
    def p_value(self):
        """McNemar's exact two-sided p-value of `fixed` against `broken`."""
        return mcnemar_exact(len(self.fixed), len(self.broken))


def paired_outcomes(pred_before, pred_after, positives, n):
    """`PairedOutcomes` at Recall@`n` of two (M, >= n) predictions of the same queries."""
    return PairedOutcomes(n, hits_at_n(pred_before, positives, n),
                          hits_at_n(pred_after, positives, n))


def mcnemar_exact(fixed, broken):
    """McNemar's exact two-sided p-value: the discordant pairs against a fair coin.

    Under "no change", each of the `fixed + broken` queries that changed is fixed or broken
    with probability 1/2: p = P(Binomial(fixed + broken, 1/2) at least as far from the middle
    as observed) = min(1, 2 · P(X <= min(fixed, broken))). 1.0 when nothing changed.
    """
    if fixed + broken == 0:
        return 1.0
    from scipy.stats import binomtest  # imported here: scipy.stats takes about 1 s

    return float(binomtest(fixed, fixed + broken, 0.5).pvalue)


def _distance(q_row, db_rows):
    """Euclidean distances (P,) in float64 from one descriptor (D,) to rows (P, D)."""
    diff = np.asarray(db_rows, dtype=np.float64) - np.asarray(q_row, dtype=np.float64)
    return np.sqrt(np.square(diff).sum(1))


def positive_negative_distances(q_desc, db_desc, positives, device=None):
    """Per query, the distance to its nearest positive and to its nearest non-positive.

    With the evaluation positives (25 m), the nearest non-positive is the nearest negative,
    and a query is correct at R@1 exactly when `d_pos < d_neg`: the two histograms show how
    far the model is from separating them. `inf` where a query has no positive (no
    non-positive). The nearest non-positive is found by `topk_search` among the first P + 1
    neighbours of a query with P positives; both distances are then computed in float64.

    Returns:
        `d_pos` (M,), `d_neg` (M,) float64 arrays.
    """
    k = min(len(db_desc), max(len(p) for p in positives) + 1)
    _, idx = topk_search(q_desc, db_desc, k, device=device)  # `idx`: (M, k)
    d_pos = np.full(len(q_desc), np.inf)  # `d_pos`: (M,)
    d_neg = np.full(len(q_desc), np.inf)  # `d_neg`: (M,)
    for i, pos in enumerate(positives):
        if len(pos):
            d_pos[i] = _distance(q_desc[i], db_desc[np.sort(pos)]).min()
        other = idx[i][~np.isin(idx[i], pos)]
        if len(other):
            d_neg[i] = _distance(q_desc[i], db_desc[other[:1]])[0]
    return d_pos, d_neg


def neighbour_agreement(desc, labels, k=3):
    """Fraction of the k nearest neighbours (in descriptor space) that share an image's label.

    Each image's first neighbour, itself, is left out (with exact duplicate descriptors, the
    one of lowest index is taken for it).
    """
    labels = np.asarray(labels)
    _, nn = topk_search(desc, desc, k=k + 1)  # `nn`: (N, k + 1), column 0 = the image itself
    return float(np.mean(labels[nn[:, 1:]] == labels[:, None]))


def whiten(pca, desc):
    """Cached descriptors (N, D) (float16 numpy ok) through a fitted `pca.PCAWhitening`.

    The same as the model's own `pca` layer on the images: a linear map, then L2-normalization.
    """
    v = torch.as_tensor(np.asarray(desc)).float().to(pca.linear.weight.device)  # `v`: (N, D)
    with torch.no_grad():
        return pca(v).cpu().numpy()  # (N, out_dim)


def panorama_id(image_name):
    """The panorama of a database image: its path without the view suffix after the first `_`.

    An assumption about the naming, to check on your copy: one panorama's views share the name up
    to the first `_`, e.g. `03814/381447_012.jpg` → `03814/381447` (Tokyo 24/7 style), or
    Pittsburgh's `000/000123_pitch1_yaw3.jpg` → `000/000123` (the 24 views of one place).
    """
    path = PurePosixPath(image_name)
    return str(path.parent / path.stem.split("_")[0])


def dedup_panorama(pred_idx, db_image_names):
    """Keep only the first (nearest) prediction of each panorama; pad rows with -1 to width k.

    Search with a larger k (e.g. 12× the largest N for Tokyo 24/7's 12 views) before
    de-duplicating, so that enough distinct panoramas remain.
    """
    pred_idx = np.asarray(pred_idx)
    _, pano = np.unique([panorama_id(n) for n in db_image_names], return_inverse=True)  # (N,)
    out = np.full_like(pred_idx, -1)  # `out`: (M, k)
    for i, row in enumerate(pred_idx):
        row = row[row >= 0]
        _, first = np.unique(pano[row], return_index=True)
        kept = row[np.sort(first)]
        out[i, :len(kept)] = kept
    return out


# ---------------------------------------------------------------------------------------------
# Recall@N of a model on a split, and of a checkpoint (the `evaluate` command)
# ---------------------------------------------------------------------------------------------


def encode_split(model, split, config, device, features=None,
                      label="Caching descriptors", stored=True, key=None):
    """(db_desc, q_desc) of a split: one cache pass over database then queries.

    `model` is a `run_model.RunModel` (its source decides), or an `EmbedNet` (`as_run`): with
    `features`, the split's local features, only the NetVLAD layer (and PCA) runs: the same
    descriptors as from the images, without the encoder. A frozen encoder's features of a small
    split are also kept between runs (`features.stored_local_features`), so a second pass over
    the same images skips the encoder; `stored=False` always encodes the images (the exact
    numbers `evaluate_checkpoint` reports).

    Args:
        key: the split's name in a `RunModel`'s storage ("val": the run's validation features).
    """
    run = as_run(model, config, device, features, stored)
    desc_all = run.encode_split(split, key, label=label)  # (numDb + numQ, out_dim)
    return desc_all[: split.db.numDb], desc_all[split.db.numDb:]


def evaluate_split(model, split, config, device, n_values=RECALL_VALUES, features=None,
                   stored=True, key=None, per_query=None):
    """Recall@N on a split (evaluation positives: within posDistThr, 25 m); arguments as
    `encode_split`, and `per_query`: a CSV file to write (`write_per_query`)."""
    db_desc, q_desc = encode_split(model, split, config, device, features, stored=stored,
                                        label=f"Evaluating ({split.db.whichSet})", key=key)
    positives = eval_positives(split.db)
    _, predictions = topk_search(q_desc, db_desc, max(n_values))  # (numQ, max N)
    if per_query is not None:
        write_per_query(per_query, split.db, predictions, positives)
    return recall_from_predictions(predictions, positives, n_values)


PER_QUERY_HEADER = ("query", "first_correct_rank", "top")


def write_per_query(path, db, predictions, positives):
    """A CSV with one row per query: `query,first_correct_rank,top`.

    `query` is the image name as the `.mat` has it; `first_correct_rank` the 1-based rank of the
    first database image within the positive radius, empty if none is among the `top`; `top`
    the predicted database names, nearest first, joined by ";".
    """
    ranks = first_hit_rank(predictions, positives)  # (numQ,), 0-based or inf
    rows = [",".join(PER_QUERY_HEADER)]
    for name, rank, pred in zip(db.qImage, ranks, np.asarray(predictions), strict=True):
        top = ";".join(db.dbImage[i] for i in pred if i >= 0)
        rows.append(f"{_csv_field(name)},{'' if np.isinf(rank) else int(rank) + 1},"
                    f"{_csv_field(top)}")
    atomic_write(Path(path), "\n".join(rows) + "\n")


def _csv_field(text):
    """`text` quoted as CSV needs it (names with commas or quotes)."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def read_per_query(path):
    """The rows of a `write_per_query` file: (query names, first correct ranks (inf: none))."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not rows or tuple(rows[0]) != PER_QUERY_HEADER or any(len(r) != 3 for r in rows[1:]):
        raise ValueError(f"{path} is not a per-query file of `evaluate --per-query` (header "
                         f"{','.join(PER_QUERY_HEADER)}, three fields a row)")
    try:
        ranks = np.array([int(r[1]) if r[1] else np.inf for r in rows[1:]], dtype=float)
    except ValueError as err:
        raise ValueError(f"{path}: a first_correct_rank is not a whole number ({err})") from err
    return [r[0] for r in rows[1:]], ranks


def paired_from_csv(before, after, n):
    """`PairedOutcomes` at Recall@`n` of two `evaluate --per-query` files of the same queries:
    McNemar's test of two models (`.p_value`)."""
    (names_a, ranks_a), (names_b, ranks_b) = read_per_query(before), read_per_query(after)
    if names_a != names_b:
        raise ValueError(f"{before} and {after} do not list the same queries in the same order: "
                         "evaluate both models on the same split")
    return PairedOutcomes(n, ranks_a <= n, ranks_b <= n)


def evaluate_checkpoint(data_root, split="test", checkpoint=None, untrained=False,
                        preset=None, pca=False, pca_dim=None, name=None, device=None,
                        precision=None, save_pca=False, per_query=None):
    """Recall@N of a trained checkpoint, or of the untrained model (`untrained=True`).

    The untrained model is built exactly as training starts (`preset`, default "tiny"): the same
    seed and k-means centroids.
    A checkpoint needs only the split evaluated: no train split, no centroid cache. With `pca`,
    whitening is taken from the checkpoint or the file beside it (`pca_path`) when it has one of
    that size, else fitted on up to 10,000 training-database descriptors. The checkpoint is
    never written; `save_pca` stores a fitted layer in `pca_path(checkpoint, dim)`.
    `per_query` names a CSV to write, one row per query (`write_per_query`).

    Returns:
        dict with `recall@N` for N in `RECALL_VALUES`, plus `split`, `dim` and `num_q`.
    """
    def error(message):
        return ArgumentError(message, **EVALUATE_ARGUMENTS)

    if checkpoint is not None and untrained:
        raise error("give either `checkpoint` or `untrained=True`, not both")
    if checkpoint is None and not untrained:
        raise error("give `checkpoint` (RUN_DIR/best.pth), or `untrained=True`")
    if checkpoint is not None and preset is not None:
        raise error("`preset` is only used with `untrained=True`: a checkpoint brings its own "
                    "settings")
    if pca_dim is not None and not pca:
        raise error("`pca_dim` is only used with `pca=True`")
    if pca_dim is not None and pca_dim < 1:
        raise error(f"`pca_dim` must be at least 1, not {pca_dim}")
    if save_pca and (not pca or checkpoint is None):
        raise error("`save_pca=True` needs `pca=True` and `checkpoint` (it stores the fitted "
                    "PCA beside the checkpoint)")
    config, ckpt = get_preset(preset or "tiny"), None
    if checkpoint is not None:  # read once: a released model file, or one of this package
        checkpoint = Path(checkpoint)
        contents = load_torch_file(checkpoint, "checkpoint") if checkpoint.is_file() else None
        if released_format(contents):
            return _evaluate_released(checkpoint, contents, data_root, split, name, device,
                                      precision, pca, pca_dim, per_query)
        ckpt = load_checkpoint(checkpoint, contents=contents)
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
    run = RunModel.build(config, train_split, device, source=ImageSource)  # the exact numbers
    model = run.model
    if checkpoint is not None:
        check_model_config(ckpt, checkpoint, model_config(model))
        load_weights(model, ckpt, checkpoint)
    if pca:
        model.pca = load_or_fit_pca(model, config, train_split, device, pca_dim, checkpoint,
                                    save=save_pca, ckpt=ckpt)
    recalls = evaluate_split(run, eval_split, config, device, per_query=per_query)
    result = {f"recall@{n}": float(r) for n, r in recalls.items()}
    result.update(split=split, dim=int(model.out_dim), num_q=int(eval_split.db.numQ),
                  model="untrained" if untrained and checkpoint is None else str(checkpoint))
    return result


# How the library names `evaluate_checkpoint`'s arguments in its errors (`ArgumentError`).
EVALUATE_ARGUMENTS = {
    "checkpoint": "`checkpoint`", "untrained": "`untrained=True`", "preset": "`preset`",
    "pca": "`pca=True`", "pca_dim": "`pca_dim`", "save_pca": "`save_pca=True`"}


def _check_best_is_current(path, ckpt):
    """Raise if `path` is a run's `best.pth` that is behind its `latest.pth` (a run stopped
    between the two writes of one epoch); resuming the run repairs it."""
    latest = path.parent / "latest.pth"
    if path.name != "best.pth" or not latest.is_file():
        return
    best_epoch = load_checkpoint(latest).get("best_epoch")
    if best_epoch is not None and ckpt.get("epoch") != best_epoch:
        raise ArgumentError(f"{path} holds epoch {ckpt.get('epoch')}, but {latest} says the "
                            f"best is epoch {best_epoch}: the run stopped while saving; resuming "
                            f"it (`resume=True`, run folder {path.parent}) repairs it",
                            resume="`resume=True`")


def released_format(contents):
    """"patchnetvlad" or "nanne" for the contents of a released model file
    (`checkpoints.detect_model_format`); None for this project's checkpoints, for files of no known
    format and for None (no file)."""
    if contents is None:
        return None
    try:
        fmt = detect_model_format(contents)
    except ValueError:
        return None
    return None if fmt == "netvlad_tutorial" else fmt


def _evaluate_released(checkpoint, contents, data_root, split, name, device, precision, pca,
                       pca_dim, per_query=None):
    """`evaluate_checkpoint` for Patch-NetVLAD and Nanne files (`checkpoints.load_model`): their
    input rule (Patch-NetVLAD resizes to 480x640), the reference settings otherwise."""
    config = PRESETS["pitts30k"].replace(data_root=str(data_root), weights=None, dataset=name,
                                         **({"precision": precision} if precision else {}),
                                         **({"device": device} if device else {}))
    device = resolve_device(config)
    model, info = load_model(checkpoint, device, contents=contents)
    config = config.replace(image_size=info["image_size"],
                            num_workers=min(config.num_workers, os.cpu_count() or 1))
    print(f"{display_path(checkpoint)}: {info['format']} weights, K = {info['num_clusters']}, "
          f"{info['out_dim']}-D; input: {info['input_rule']}")
    eval_split = load_split(config.data_root, split, name=config.dataset)
    if pca:
        if model.pca is not None:
            raise ArgumentError(f"{checkpoint} already holds its PCA whitening (WPCA to "
                                f"{info['pca_dim']}-D): evaluate it without `pca=True`",
                                **EVALUATE_ARGUMENTS)
        model.pca = load_or_fit_pca(model, config, None, device, pca_dim)
    recalls = evaluate_split(model, eval_split, config, device, stored=False,
                             per_query=per_query)
    result = {f"recall@{n}": float(r) for n, r in recalls.items()}
    result.update(split=split, dim=int(model.out_dim), num_q=int(eval_split.db.numQ),
                  model=str(checkpoint), format=info["format"])
    return result


def pca_path(checkpoint, dim):
    """Where `save_pca=True` keeps the PCA of `checkpoint`: `RUN/best.pca{dim}.pth` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.pca{dim}.pth")


def _check_pca_file(stored, path, in_dim):
    """`stored` (a PCA file read from `path`) if it holds a finite PCA of `in_dim` inputs."""
    keys = {"in_dim", "out_dim", "state_dict", "weights"}
    if not isinstance(stored, dict) or not keys <= stored.keys() \
            or not isinstance(stored["state_dict"], dict) or stored["in_dim"] != in_dim \
            or type(stored["out_dim"]) is not int:
        raise ValueError(f"{path} is not a PCA file of this model (expected {sorted(keys)}, "
                         f"in_dim {in_dim}); remove it or run with --save-pca to fit it again")
    if not all(torch.isfinite(v).all() for v in stored["state_dict"].values()
               if torch.is_tensor(v)):
        raise ValueError(f"{path} holds NaN or infinite values; remove it or run with "
                         "--save-pca to fit it again")
    return stored


def _weights_digest(state_dict):
    """A short digest of a state dict's tensors: ties a PCA file to its checkpoint."""
    h = hashlib.sha1()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()[:16]


def load_or_fit_pca(model, config, train_split, device, pca_dim=None, checkpoint=None,
                    save=False, ckpt=None):
    """PCA whitening of `model`: from `checkpoint` (or the file beside it) if it holds one of
    that size, else fitted on up to 10,000 training-database descriptors (the reference).

    Args:
        train_split: the split to fit on; None: loaded from `config` only if fitting is needed.
        pca_dim: the output size; None: `config.pca_dim` (reduced, with a note, when the
            data is too small for it). An explicit size larger than possible is an error.
        checkpoint: a checkpoint file; it is read, never written.
        save: store a fitted layer in `pca_path(checkpoint, dim)`.
        ckpt: `checkpoint` as already loaded (`checkpoints.load_checkpoint`), so it is read once.
    """
    if ckpt is None:
        ckpt = load_checkpoint(checkpoint) if checkpoint else {}
    dim = pca_dim or config.pca_dim
    stored, side = None, pca_path(checkpoint, dim) if checkpoint else None
    if side is not None and side.is_file():
        stored = _check_pca_file(load_torch_file(side, "PCA file"), side, model.out_dim)
        if stored.get("weights") != _weights_digest(ckpt["model"]):
            raise ArgumentError(f"{side} was fitted for other weights than {checkpoint}; "
                                "remove it or give `save_pca=True` to fit it again",
                                **EVALUATE_ARGUMENTS)
    if stored is not None:
        layer = PCAWhitening(stored["in_dim"], stored["out_dim"])
        try:
            layer.load_state_dict(stored["state_dict"])
        except (RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"{pca_path(checkpoint, dim)}: its PCA does not fit ({first}); "
                             "remove it or run with --save-pca to fit it again") from err
        return layer.to(device)
    if train_split is None:
        train_split = load_split(config.data_root, "train", name=config.dataset,
                                 allow_flat=False)
    limit = min(model.out_dim, min(train_split.db.numDb, 10000) - 1)
    if dim > limit:
        if pca_dim is not None:
            raise ArgumentError(f"`pca_dim` {pca_dim} is larger than possible: at most "
                                f"{limit} (descriptor size {model.out_dim}, "
                                f"{train_split.db.numDb} training database images to fit on)",
                                **EVALUATE_ARGUMENTS)
        print(f"PCA: {limit} dimensions, not the preset's {dim} (too little data)")
        dim = limit
    db_desc, _ = encode_split(model, train_split, config, device,
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


# ---------------------------------------------------------------------------------------------
# Evaluation as the VPR tutorial does it: similarity matrix, precision-recall, AUC
# ---------------------------------------------------------------------------------------------
# Definitions of Schubert et al., "Visual Place Recognition: A Tutorial" (2023), written anew:
# every distinct threshold is used (exact), where the tutorial samples 100.


def similarity_matrix(db, q):
    """Cosine similarity S (N, M): one row per database image, one column per query.

    Higher is more similar. Rows of `db` (N, D) and `q` (M, D) are L2-normalized first, so
    for unit descriptors S = 1 − d²/2 and ranking by S is ranking by Euclidean distance.
    """
    db = torch.as_tensor(np.asarray(db, dtype=np.float32))  # `db`: (N, D)
    q = torch.as_tensor(np.asarray(q, dtype=np.float32))  # `q`: (M, D)
    db, q = torch.nn.functional.normalize(db, dim=1), torch.nn.functional.normalize(q, dim=1)
    return (db @ q.T).numpy()  # (N, M)


def ground_truth_matrix(positives, num_db):
    """The (N, M) boolean matrix of a per-query list of positive database indices."""
    gt = np.zeros((num_db, len(positives)), dtype=bool)  # `gt`: (N, M)
    for j, pos in enumerate(positives):
        gt[np.asarray(pos, dtype=np.int64), j] = True
    return gt


def _ground_truth(S, gt_hard, gt_soft):
    """S as float64 and the hard and soft ground truths as booleans, shapes checked."""
    S = np.asarray(S, dtype=np.float64)  # `S`: (N, M)
    gt_hard = np.asarray(gt_hard, dtype=bool)
    gt_soft = gt_hard if gt_soft is None else np.asarray(gt_soft, dtype=bool)
    if S.ndim != 2 or S.shape != gt_hard.shape or S.shape != gt_soft.shape:
        raise ValueError(f"S {S.shape}, gt_hard {gt_hard.shape} and gt_soft {gt_soft.shape} "
                         "must be two-dimensional and of one shape (database x queries)")
    return S, gt_hard, gt_soft


def best_matches(S, gt_hard, gt_soft=None):
    """Each query's best match, as single-best-match evaluation sees it.

    Entries that are soft but not hard positives are skipped; equal scores go to the lowest
    database index.

    Returns:
        `best` (M,) database indices (-1 where a column has only skipped entries), `score`
        (M,) their S (-inf there) and `correct` (M,) booleans (hard positive or not).
    """
    S, gt_hard, gt_soft = _ground_truth(S, gt_hard, gt_soft)
    ignored = gt_soft & ~gt_hard  # `ignored`: (N, M)
    masked = np.where(ignored, -np.inf, S)  # `masked`: (N, M)
    best = masked.argmax(0)  # (M,)
    cols = np.arange(S.shape[1])
    score, correct = masked[best, cols], gt_hard[best, cols]  # (M,) each
    best[ignored.all(0)] = -1
    return best, score, correct & (best >= 0)


def _scored_matches(S, gt_hard, gt_soft, matching):
    """The scores and correctness of the matches a threshold decides on, and recall's
    denominator: (scores (P,), correct (P,) bool, num_positives)."""
    S, gt_hard, gt_soft = _ground_truth(S, gt_hard, gt_soft)
    ignored = gt_soft & ~gt_hard  # neither a true nor a false match
    if matching == "multi":
        num_positives = int(gt_hard.sum())
        scores, correct = S[~ignored], gt_hard[~ignored]  # (P,) each
    elif matching == "single":
        num_positives = int(gt_hard.any(0).sum())  # queries with at least one hard positive
        best, _, correct = best_matches(S, gt_hard, gt_soft)  # (M,) each
        kept = best >= 0  # queries with something left to match
        scores, correct = S[best[kept], np.flatnonzero(kept)], correct[kept]  # (P,) each
    else:
        raise ValueError(f"matching must be 'single' or 'multi', not {matching!r}")
    if num_positives == 0:
        raise ValueError("no hard positive in gt_hard: recall is undefined")
    return scores, correct, num_positives


def precision_recall_curve(S, gt_hard, gt_soft=None, matching="single"):
    """Precision and recall at every distinct threshold of S, exactly: (precision, recall).

    A threshold t accepts the matches with S >= t. With `matching="single"` each query
    contributes its best match (the largest S in its column), and recall is over the queries
    that have at least one hard positive; with `"multi"` every entry of S is a match, and
    recall is over all hard positives. Entries that are soft but not hard positives are
    ignored: never a match, never counted (the tutorial sets them to min(S) instead, which
    counts them only at the lowest threshold). The curve starts at recall 0, precision 1; the
    thresholds then fall from max(S) to min(S), so recall never decreases.

    Args:
        S: (N, M) similarities, one row per database image and one column per query.
        gt_hard: (N, M) booleans, the true matches.
        gt_soft: (N, M) booleans, matches that are not wrong either (e.g. neighbouring frames);
            default: `gt_hard`.
        matching: "single" or "multi".

    Returns:
        `precision`, `recall`: float64 arrays of length 1 + the number of distinct thresholds.
    """
    scores, correct, num_positives = _scored_matches(S, gt_hard, gt_soft, matching)
    order = np.argsort(-scores, kind="stable")
    scores, correct = scores[order], correct[order]  # highest score first
    tp = np.cumsum(correct)  # `tp`: (P,) true matches among the first i + 1
    fp = np.cumsum(~correct)  # `fp`: (P,)
    last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])  # end of each equal score
    tp, fp = tp[last], fp[last]
    precision = np.r_[1.0, tp / (tp + fp)]  # each threshold accepts at least one
    recall = np.r_[0.0, tp / num_positives]
    return precision, recall


def pr_auc(precision, recall):
    """The area under the precision-recall curve: trapezoids between consecutive points."""
    p, r = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    return float(np.sum((r[1:] - r[:-1]) * (p[1:] + p[:-1]) / 2))


def recall_at_100_precision(S, gt_hard, gt_soft=None, matching="single"):
    """The largest recall reached at precision 1 (no false match accepted); 0 if none is."""
    precision, recall = precision_recall_curve(S, gt_hard, gt_soft, matching)
    return float(recall[precision == 1].max())
