"""Re-ranking the top candidates of global search by local-feature matching.

Reads top to bottom: mutual nearest neighbours between two conv5 feature maps (each position's
descriptor L2-normalized) -> a geometric check: the largest group of matches that agree on one
2-D translation of the feature grid -> `rerank`: the top 10 of each query re-ordered by that
inlier count. A simple relative of Patch-NetVLAD's and of local-feature re-ranking: a place
seen again is the same pattern of local features, shifted, while a look-alike that only shares
textures matches in scattered positions.
"""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .mining import torch_threads
from .utils import leave_progress, progress_hidden


def _grid(features):
    """A feature map (D, h, w) as unit descriptors (h*w, D) and their (row, col) (h*w, 2)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    d, h, w = x.shape
    desc = F.normalize(x.reshape(d, h * w).T, dim=1)  # `desc`: (h*w, D)
    rows, cols = np.divmod(np.arange(h * w), w)
    return desc, np.stack([rows, cols], axis=1)  # (h*w, 2)


def mutual_nearest_neighbours(fa, fb):
    """Positions of the mutual nearest neighbours of two feature maps (D, h, w).

    Position i of `fa` and j of `fb` match when j is i's most similar descriptor (cosine) in
    `fb` and i is j's in `fa`; equal similarities go to the lower index.

    Returns:
        `pos_a`, `pos_b`: (P, 2) int arrays of (row, col) grid positions, one row per match.
    """
    a, pos_a = _grid(fa)  # `a`: (Na, D)
    b, pos_b = _grid(fb)  # `b`: (Nb, D)
    sim = a @ b.T  # `sim`: (Na, Nb)
    nn_ab, nn_ba = sim.argmax(1).numpy(), sim.argmax(0).numpy()  # (Na,), (Nb,)
    i = np.flatnonzero(nn_ba[nn_ab] == np.arange(len(a)))  # mutual: back where it started
    return pos_a[i], pos_b[nn_ab[i]]


def translation_inliers(pos_a, pos_b, tolerance=1):
    """The geometric check: the most matches that agree on one translation of the grid.

    Every match proposes its own offset `pos_b − pos_a` (an exhaustive RANSAC: one match
    determines a translation); a match supports an offset within `tolerance` cells in row and
    column. The best-supported offset wins (the first one on a tie).

    Returns:
        the inlier count (int) and the (P,) boolean inlier mask.
    """
    offsets = np.asarray(pos_b) - np.asarray(pos_a)  # `offsets`: (P, 2)
    if len(offsets) == 0:
        return 0, np.zeros(0, dtype=bool)
    support = np.abs(offsets[:, None] - offsets[None]).max(2) <= tolerance  # (P, P)
    best = support.sum(1).argmax()
    return int(support[best].sum()), support[best]


def inlier_count(fa, fb, tolerance=1):
    """Geometrically consistent mutual nearest neighbours between two feature maps."""
    return translation_inliers(*mutual_nearest_neighbours(fa, fb), tolerance)[0]


def rerank(q_features, db_features, predictions, top_k=10, tolerance=1, label=None):
    """Re-order each query's first `top_k` predictions by their inlier counts.

    Args:
        q_features: (M, D, h, w) local features of the queries (array, memmap, or indexable).
        db_features: (N, D, h, w) local features of the database.
        predictions: (M, k) database indices from global search, nearest first (-1: none).
        top_k: how many candidates to re-rank; the rest keep their place.
        tolerance: grid cells of slack in the translation check.
        label: a progress bar over the queries with this description (None: no bar).

    Returns:
        `reranked` (M, k): the predictions, the first `top_k` sorted by inliers (most first;
        equal counts keep the global order), and `inliers` (M, top_k): the counts in the
        original order (-1 for padding).

    Runs on one torch thread: each pair is a (h*w, D) x (D, h*w) product, too small to share.
    """
    predictions = np.asarray(predictions)
    reranked = predictions.copy()
    inliers = np.full((len(predictions), top_k), -1, dtype=np.int64)
    bar = tqdm(predictions, desc=label, unit="query", leave=leave_progress(),
               disable=label is None or progress_hidden())
    with torch_threads(1):
        for j, row in enumerate(bar):
            cand = row[:top_k]
            counts = np.array([inlier_count(q_features[j], db_features[c], tolerance) if c >= 0
                               else -1 for c in cand], dtype=np.int64)
            reranked[j, :len(cand)] = cand[np.argsort(-counts, kind="stable")]
            inliers[j, :len(cand)] = counts
    return reranked, inliers
