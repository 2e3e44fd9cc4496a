"""Stage 6: exact nearest-neighbour search and Recall@N, as in the NetVLAD evaluation."""

from dataclasses import dataclass
from math import comb
from pathlib import PurePosixPath

import numpy as np
import torch
from scipy.stats import binomtest

from .utils import get_device

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
        device: where to compute (default: `q`'s device if a tensor, else `utils.get_device()`).
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
    """Cached descriptors (N, D) (float16 numpy ok) through a fitted `model.PCAWhitening`.

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
