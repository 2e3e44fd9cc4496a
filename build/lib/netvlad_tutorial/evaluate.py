"""Stage 6: exact nearest-neighbour search and Recall@N, as in the NetVLAD evaluation."""

from pathlib import PurePosixPath

import numpy as np
import torch

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
