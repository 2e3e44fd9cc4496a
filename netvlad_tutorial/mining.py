"""Stage 4: hard-negative mining and the triplets it produces (the reference procedure).

For a training query, from a descriptor cache of the training split:
- the best positive is the training positive (within 10 m) nearest in descriptor space;
- the negatives are taken among `n_neg_sample` sampled potential negatives (beyond 25 m) plus the
  query's negatives of last time (the negative cache): of their `n_neg_dist` nearest, those with
  `d_neg < d_pos + sqrt(margin)`, at most `n_neg`, nearest first;
- a query without any such violating negative is skipped.

`margin` has one unit everywhere (`TrainConfig.margin`, 0.1): the paper's margin on squared
distances. Mining and `triplet_loss` compare plain distances, so both use `sqrt(margin)`.
"""

import contextlib
import math
import os
import threading
import warnings
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import NegativeSampler, Split
from .dbstruct import QUERIES_DIR
from .images import input_transform, load_image
from .utils import leave_progress, progress_bar, progress_hidden

MinedTuple = namedtuple("MinedTuple",
                        ["query", "positive", "negatives", "d_pos", "d_negs", "sampled"])
MinedTuple.__doc__ = """A mined training tuple.

query, positive: query index and database index of its best positive; negatives: (n,) database
indices, nearest first (empty: the query is skipped); d_pos: float; d_negs: (n,) float32
descriptor distances to the query; sampled: the database indices drawn by the negative sampler
(before adding the cached negatives), for visualization."""


class NegativeCache:
    """The hard negatives chosen last time for each query: (numQ, n_neg) int64, -1 = empty."""

    def __init__(self, num_q, n_neg=10):
        self.negatives = np.full((num_q, n_neg), -1, dtype=np.int64)

    def __getitem__(self, q):
        """The cached negatives of query `q`, without padding."""
        row = self.negatives[q]
        return row[row >= 0]

    def update(self, q, negatives):
        """Replace the cached negatives of query `q` (at most `n_neg` of them)."""
        self.negatives[q] = -1
        self.negatives[q, :len(negatives)] = negatives

    def state_dict(self):
        """A copy of the cache as a plain numpy array, for checkpoints."""
        return {"negatives": self.negatives.copy()}

    def load_state_dict(self, state):
        """Restore the cache from `state_dict()`."""
        negatives = np.asarray(state["negatives"], dtype=np.int64)
        if negatives.shape != self.negatives.shape:
            raise ValueError(f"negative cache of shape {negatives.shape} does not fit "
                             f"{self.negatives.shape} (numQ, n_neg)")
        self.negatives = negatives.copy()


@dataclass
class MiningState:
    """What mining carries from one cache refresh and one epoch to the next.

    `neg_cache` and `rng` are saved in checkpoints, so that a resumed run mines the same tuples.

    Attributes:
        split: the training `data.Split`.
        positives: per query, its training positives (`data.train_positives`).
        sampler: the `data.NegativeSampler` of the split.
        rng: the `np.random.Generator` of every draw.
        neg_cache: the `NegativeCache`, hard negatives of last time.
        work_dir: the folder of disk-backed caches (None: in memory only).
        workspace: the `Workspace` of mining's distances, reused by every refresh.
    """

    split: Split
    positives: list
    sampler: NegativeSampler
    rng: np.random.Generator
    neg_cache: NegativeCache
    work_dir: Path | None = None
    workspace: "Workspace" = field(default_factory=lambda: Workspace())


def _float32(x, device):
    """A descriptor array or row (numpy, memmap or tensor) as a float32 tensor on `device`."""
    if not torch.is_tensor(x):
        x = torch.from_numpy(np.require(x, dtype=np.float32, requirements="W"))
    return x.to(device, torch.float32)


BLOCK_ROWS = 16  # rows per block in `row_distances`: 16 x 32,768 float32 = 2 MiB, cache-sized


def _cpu_view(x):
    """A numpy array or memmap (float16/float32) as a CPU tensor sharing its memory, or None."""
    if torch.is_tensor(x):
        return x if x.device.type == "cpu" and x.dtype in (torch.float16, torch.float32) else None
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float16, np.float32) or x.ndim != 2:
        return None
    with warnings.catch_warnings():  # a read-only memmap: only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


class Workspace(threading.local):
    """The buffers of `row_distances` and `pool_distances`, kept across calls (one set per
    thread). A training run keeps one in its `MiningState`; a call given none makes its own.

    Mining calls `row_distances` once per query; buffers allocated per call (or per block, as
    a mixed float16/float32 `torch.sub` does internally) made glibc's heap grow by gigabytes
    over a Pitts250k epoch (`benchmarks/scale.py`). These are allocated once and grown only
    when a larger block or dimension comes: 3.1 MiB at 32,768-D.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name, shape, dtype):
        """A tensor of at least `shape` (its leading slice is returned), reused across calls."""
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
            buf = self.buffers[(name, dtype)] = torch.empty(shape, dtype=dtype)
        return buf[:shape[0]]


def row_distances(db_desc, indices, q_row, device=None, block=BLOCK_ROWS, workspace=None):
    """Euclidean distances (float32) from `q_row` to the database rows `indices`.

    The same values, bit for bit, as
    `vector_norm(float32(db_desc[indices]) - float32(q_row), dim=1)`, but on the CPU the rows
    are gathered, converted and reduced `block` rows at a time in buffers that are allocated
    once and reused by every later call (`_Workspace`): the ~1,100 gathered rows of a query
    (72 MB in float16, 144 MB in float32) are never materialized at once, each block stays in
    the CPU cache, and no step allocates memory (which, once per query or per block, grew the
    heap by gigabytes over an epoch). Only the (n,) result is new.

    Args:
        db_desc: (numDb, D) descriptors: numpy array, memmap or tensor.
        indices: (n,) int64 database indices.
        q_row: (D,) query descriptor.
        device: where to compute; the blocked path is used on the CPU.
        workspace: the `Workspace` whose buffers to reuse (None: new ones for this call).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    workspace = workspace if workspace is not None else Workspace()
    db = _cpu_view(db_desc) if device.type == "cpu" else None
    if db is None:
        rows = _float32(db_desc[indices], device)  # (n, D)
        return torch.linalg.vector_norm(rows - _float32(q_row, device), dim=1)  # (n,)
    idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))  # (n,)
    out = torch.empty(len(idx))  # (n,)
    if len(idx) == 0:
        return out
    dim, rows_n = db.shape[1], min(block, len(idx))
    q = workspace.get("query", (1, dim), torch.float32)[0]  # (D,)
    q_src = _cpu_view(np.asarray(q_row)[None]) if not torch.is_tensor(q_row) else None
    q.copy_(q_src[0] if q_src is not None else torch.as_tensor(q_row))  # exact in float32
    diff = workspace.get("diff", (rows_n, dim), torch.float32)  # (block, D) float32
    gathered = (diff if db.dtype == torch.float32 else
                workspace.get("gathered", (rows_n, dim), db.dtype))  # (block, D)
    for start in range(0, len(idx), block):
        part = idx[start:start + block]
        n = len(part)
        torch.index_select(db, 0, part, out=gathered[:n])
        if gathered is not diff:
            diff[:n].copy_(gathered[:n])  # float16 -> float32: exact
        diff[:n].sub_(q)  # same-dtype, in place: no temporary (a mixed-dtype sub makes one)
        torch.linalg.vector_norm(diff[:n], dim=1, out=out[start:start + n])
    return out


@contextlib.contextmanager
def torch_threads(num_threads):
    """Run the block with `torch.set_num_threads(num_threads)` (None: unchanged)."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mine_tuple(q, q_desc_row, db_desc, train_pos_q, sampler, rng, neg_cache=None, *,
               n_neg_sample=1000, n_neg_dist=100, n_neg=10, margin=0.1, device=None,
               workspace=None):
    """The best positive and the hard negatives of training query `q` as a `MinedTuple`.

    Pure: reads `neg_cache` but does not update it (`mine_triplets` does).

    Args:
        q: query index.
        q_desc_row: (D,) cached descriptor of query `q`.
        db_desc: (numDb, D) cached database descriptors (numpy, memmap or tensor).
        train_pos_q: database indices of the training positives of `q` (at least one).
        sampler: `data.NegativeSampler`, drawing database indices beyond 25 m.
        rng: `np.random.Generator` given to the sampler.
        neg_cache: `NegativeCache` or None.
        margin: the margin on squared distances (`TrainConfig.margin`, 0.1); on the plain
            distances compared here, negatives must satisfy `d_neg < d_pos + sqrt(margin)`.
        device: where to compute distances (default: `db_desc`'s device if a tensor, else CPU).
        workspace: the `Workspace` of the distances (None: new buffers).
    """
    train_pos_q = _checked_positives(q, train_pos_q)
    sampled = np.asarray(sampler.sample(q, n_neg_sample, rng), dtype=np.int64)
    cached = neg_cache[q] if neg_cache is not None else np.empty(0, dtype=np.int64)
    return mine_drawn(q, q_desc_row, db_desc, train_pos_q, sampled, cached,
                      n_neg_dist=n_neg_dist, n_neg=n_neg, margin=margin, device=device,
                      workspace=workspace)


def _checked_positives(q, train_pos_q):
    """`train_pos_q` as int64, or a clear error when query `q` has none."""
    train_pos_q = np.asarray(train_pos_q, dtype=np.int64)
    if len(train_pos_q) == 0:
        raise ValueError(f"query {q} has no training positive (database image within 10 m)")
    return train_pos_q


def mine_drawn(q, q_desc_row, db_desc, train_pos_q, sampled, cached, *, n_neg_dist, n_neg,
               margin, device, workspace=None):
    """`mine_tuple` once the potential negatives are drawn: the distances to the positives and
    to the candidates (`sampled` and the `cached` negatives of last time), then the choice."""
    if device is None:
        device = db_desc.device if torch.is_tensor(db_desc) else torch.device("cpu")
    candidates = np.unique(np.concatenate([sampled, cached]))  # `candidates`: (C,) sorted
    dist = row_distances(db_desc, np.concatenate([train_pos_q, candidates]), q_desc_row,
                         device, workspace=workspace)  # (P + C,)
    d_pos_all, d_cand = dist[:len(train_pos_q)], dist[len(train_pos_q):]  # (P,), (C,)
    return choose_negatives(q, train_pos_q, candidates, d_pos_all, d_cand, sampled,
                            n_neg_dist=n_neg_dist, n_neg=n_neg, margin=margin)


def choose_negatives(q, train_pos_q, candidates, d_pos_all, d_cand, sampled, *, n_neg_dist,
                     n_neg, margin):
    """The `MinedTuple` of query `q` from its distances: the best positive is the nearest; of
    the `n_neg_dist` nearest candidates, those violating the margin, at most `n_neg`."""
    best = d_pos_all.argmin()
    d_near, near = d_cand.topk(min(n_neg_dist, len(candidates)), largest=False)  # nearest first
    violating = d_near < d_pos_all[best] + margin ** 0.5
    d_negs, chosen = d_near[violating][:n_neg], near[violating][:n_neg]  # (n,), (n,)
    return MinedTuple(q, int(train_pos_q[best]), candidates[chosen.cpu().numpy()],
                      float(d_pos_all[best]), d_negs.cpu().numpy(), sampled)


POOL_GROUP = 32  # queries sharing one pool of potential negatives (negative_pool="shared")


def draw_shared(group, sampler, rng, n_neg_sample):
    """One pool of potential negatives for a group of queries, and each query's sample of it.

    The pool is a uniform random sample, in random order, of `n_neg_sample` + 5 % database
    indices; the sample of query q is the first `n_neg_sample` of them that are q's negatives
    (beyond 25 m). By exchangeability that is a uniform sample without replacement of q's
    negatives, as `sampler.sample` draws: each query's sample has the reference distribution,
    only the samples of one group are no longer independent. Should the pool hold too few of
    q's negatives, q draws its own (`sampler.sample`).

    Returns:
        (pool (P,) int64, list of each query's sample (n_neg_sample,) int64).
    """
    num_db = len(sampler.utm_db)
    pool = rng.choice(num_db, size=min(num_db, n_neg_sample + max(8, n_neg_sample // 20)),
                      replace=False).astype(np.int64)  # (P,), random order
    samples = []
    for q in group:
        sample = pool[sampler.is_negative(q, pool)][:n_neg_sample]
        if len(sample) < n_neg_sample:
            sample = np.asarray(sampler.sample(q, n_neg_sample, rng), dtype=np.int64)
        samples.append(sample)
    return pool, samples


POOL_BLOCK = 16  # pool rows per block in `pool_distances`: 16 x 32,768 float32 = 2 MiB


def pool_distances(db_desc, pool, q_rows, device=None, block=POOL_BLOCK, workspace=None):
    """(G, P) float32 Euclidean distances from each query row to the database rows `pool`.

    Computed as sqrt(max(0, ‖x‖² + ‖q‖² − 2 q·x)) in float32, one matrix product per block of
    pool rows: each row is read and converted once for the G queries, and the work is a matrix
    product, not G passes over the rows. The expansion is what scikit-learn's
    `NearestNeighbors` (Nanne/pytorch-NetVlad's mining) computes; it agrees with the direct
    distance (`row_distances`) to about 1e-6 here (`tests/test_mining_fast.py`).

    Args:
        db_desc: (numDb, D) descriptors; pool: (P,) int64 database indices; q_rows: (G, D).
        workspace: the `Workspace` whose buffers to reuse (None: new ones for this call).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    workspace = workspace if workspace is not None else Workspace()
    db = _cpu_view(db_desc) if device.type == "cpu" else None
    q = _float32(q_rows, device)  # (G, D)
    q_sq = torch.linalg.vector_norm(q, dim=1).square_()  # (G,)
    out = torch.empty(len(q), len(pool), device=device)  # (G, P)
    idx = torch.from_numpy(np.ascontiguousarray(pool, dtype=np.int64))  # (P,)
    for start in range(0, len(idx), block):
        part = idx[start:start + block]
        n = len(part)
        if db is None:
            rows = _float32(db_desc[part.numpy()], device)  # (n, D)
        else:  # gathered and converted in reused buffers (no allocation per block)
            rows = workspace.get("pool_rows", (min(block, len(idx)), db.shape[1]),
                                  torch.float32)[:n]  # (n, D)
            if db.dtype == torch.float32:
                torch.index_select(db, 0, part, out=rows)
            else:
                gathered = workspace.get("pool_gathered", (min(block, len(idx)), db.shape[1]),
                                          db.dtype)[:n]
                torch.index_select(db, 0, part, out=gathered)
                rows.copy_(gathered)  # float16 -> float32: exact
        x_sq = torch.linalg.vector_norm(rows, dim=1).square_()  # (n,)
        d2 = torch.addmm(q_sq[:, None] + x_sq[None], q, rows.T, alpha=-2)  # (G, n)
        out[:, start:start + n] = d2.clamp_min_(0).sqrt_()
    return out


def mine_group(group, pool, pool_dist, q_desc, db_desc, *, n_neg_dist, n_neg, margin, device,
               workspace=None):
    """`mine_drawn` for every query of a group: the pool's distances come from one
    `pool_distances` for the group, the rest (positives, cached negatives) from the same
    formula per query."""
    order = np.argsort(pool, kind="stable")
    sorted_pool = pool[order]  # (P,)
    tuples = []
    for g, (q, pos, sampled, cached) in enumerate(group):
        candidates = np.unique(np.concatenate([sampled, cached]))  # (C,) sorted
        at = np.minimum(np.searchsorted(sorted_pool, candidates), len(pool) - 1)
        in_pool = sorted_pool[at] == candidates  # (C,)
        d_cand = torch.empty(len(candidates))  # (C,)
        d_cand[torch.from_numpy(in_pool)] = pool_dist[g][torch.from_numpy(order[at[in_pool]])]
        rest = np.concatenate([pos, candidates[~in_pool]])  # positives, cached negatives
        dist = pool_distances(db_desc, rest, q_desc[q][None], device,
                              workspace=workspace)[0]  # (P + C_rest,)
        d_cand[torch.from_numpy(~in_pool)] = dist[len(pos):]
        tuples.append(choose_negatives(q, pos, candidates, dist[:len(pos)], d_cand, sampled,
                                       n_neg_dist=n_neg_dist, n_neg=n_neg, margin=margin))
    return tuples


def _batches(groups, size):
    """Consecutive groups in batches of at most `size` that share no query."""
    batch, seen = [], set()
    for group in groups:
        if len(batch) == size or seen.intersection(group):
            yield batch
            batch, seen = [], set()
        batch.append(group)
        seen.update(group)
    if batch:
        yield batch


def mining_workers():
    """The default number of mining threads: the CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _chunks(queries, size):
    """`queries` in consecutive chunks of at most `size`, none holding a query twice."""
    chunk = []
    for q in queries:
        if len(chunk) == size or q in chunk:
            yield chunk
            chunk = []
        chunk.append(q)
    if chunk:
        yield chunk


def mine_triplets(queries, q_desc, db_desc, train_positives, sampler, rng, neg_cache, *,
                  n_neg_sample=1000, n_neg_dist=100, n_neg=10, margin=0.1, device=None,
                  num_threads=1, workers=None, negative_pool="query", workspace=None):
    """Mine a tuple for each query of `queries`: (list of `MinedTuple`, number of skipped).

    Skipped queries (no violating negative) are left out of the list; the negative cache of
    every mined query is updated with its new negatives.

    On the CPU, `workers` threads compute the queries' distances at once. The result does not
    depend on `workers`, and equals one query after the other bit for bit
    (`tests/test_mining_fast.py`): the negatives are drawn from `rng` in query order first, a
    chunk of queries at a time; each query reads only its own row of the negative cache (a
    query met again waits for its first tuple); each distance is computed by one thread with
    the same operations.

    Args:
        queries: query indices to mine.
        q_desc: (numQ, D) cached query descriptors; `db_desc`: (numDb, D).
        train_positives: per query index, its training positives (`data.train_positives`).
        num_threads: torch CPU threads inside each operation (None: unchanged). Each query's
            work is a few small, memory-bound operations: threads inside them only add
            synchronization, which on a busy 2-core machine made them many times slower
            (`benchmarks/scale.py`). The parallelism is across queries instead (`workers`).
        workers: threads mining queries at once (None: `mining_workers()`, the usable CPU
            cores; always 1 when the distances are computed on a GPU).
        negative_pool: "query", the reference (Nanne/pytorch-NetVlad, MATLAB NetVLAD): every
            query draws its own `n_neg_sample` potential negatives, and its distances are the
            direct ones (`row_distances`); or "shared": each group of `POOL_GROUP` queries
            draws one pool and each query takes its sample from it (`draw_shared`). Each
            query's sample has the same distribution; the pool's rows are read once per group
            instead of once per query, and its distances to the group are one matrix product
            (`pool_distances`, within about 1e-6 of the direct ones). At Pitts250k scale on a
            CPU, mining is bound by the rows it reads (`benchmarks/scale.py`).
        workspace: the `Workspace` of the distances, reused across calls (None: new buffers
            for this call).
        Others: as `mine_tuple`.
    """
    if negative_pool not in ("query", "shared"):
        raise ValueError(f"negative_pool must be 'query' or 'shared', not {negative_pool!r}")
    if device is None:
        device = db_desc.device if torch.is_tensor(db_desc) else torch.device("cpu")
    device = torch.device(device)
    workers = 1 if device.type != "cpu" else (workers or mining_workers())
    workspace = workspace if workspace is not None else Workspace()
    settings = dict(n_neg_dist=n_neg_dist, n_neg=n_neg, margin=margin, device=device,
                    workspace=workspace)
    queries = [int(q) for q in queries]
    tuples, num_skipped = [], 0

    def drawn(q, sampled):  # (q, positives, sampled, cached), in query order
        cached = neg_cache[q] if neg_cache is not None else np.empty(0, np.int64)
        return q, _checked_positives(q, train_positives[q]), sampled, cached

    def select(item):
        q, pos, sampled, cached = item
        return [mine_drawn(q, q_desc[q], db_desc, pos, sampled, cached, **settings)]

    def select_group(item):
        group, pool = item
        pool_dist = pool_distances(db_desc, pool, q_desc[[g[0] for g in group]], device,
                                   workspace=workspace)
        return mine_group(group, pool, pool_dist, q_desc, db_desc, **settings)

    def batches():  # lists of work items, each item's result a list of tuples
        if negative_pool == "query":
            for chunk in _chunks(queries, POOL_GROUP * workers):
                yield select, [drawn(q, np.asarray(sampler.sample(q, n_neg_sample, rng),
                                                   dtype=np.int64)) for q in chunk]
            return
        for batch in _batches(_chunks(queries, POOL_GROUP), workers):
            items = []
            for group in batch:
                for q in group:
                    _checked_positives(q, train_positives[q])
                pool, samples = draw_shared(group, sampler, rng, n_neg_sample)
                items.append(([drawn(q, s) for q, s in zip(group, samples)], pool))
            yield select_group, items

    with (torch_threads(num_threads),
          progress_bar(total=len(queries), desc="Mining", unit="query", leave=leave_progress(),
                       disable=progress_hidden()) as bar,
          ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool):
        for fn, items in batches():
            for result in (pool.map(fn, items) if pool is not None else map(fn, items)):
                for t in result:
                    bar.update()
                    if len(t.negatives) == 0:
                        num_skipped += 1
                        continue
                    if neg_cache is not None:
                        neg_cache.update(t.query, t.negatives)
                    tuples.append(t)
    return tuples, num_skipped


class TripletDataset(Dataset):
    """The images of mined tuples: item i is `(query, positive, negatives (n, 3, H, W), i)`.

    Database images are read from `root/<dbImage>`, queries from `root/<queries_dir>/<qImage>`
    (the Pittsburgh layout; `data.load_split` gives `root` and `queries_dir`).

    Args:
        features: a frozen encoder's cached output for the whole split (numDb + numQ, D, h, w),
            database first (`features.encode_local_features`). Given, the items hold these
            features (float32) in place of the images, in the same layout.
    """

    def __init__(self, root, db, tuples, transform=None, queries_dir=QUERIES_DIR,
                 features=None):
        self.root, self.db, self.tuples = Path(root), db, list(tuples)
        self.transform = transform if transform is not None else input_transform()
        self.queries_dir, self.features = queries_dir, features
        if any(len(t.negatives) == 0 for t in self.tuples):
            raise ValueError("every tuple needs at least one negative: leave skipped queries out")
        if features is not None and len(features) != db.numDb + db.numQ:
            raise ValueError(f"features has {len(features)} rows; expected numDb + numQ = "
                             f"{db.numDb + db.numQ} (database first, then queries)")

    def __len__(self):
        return len(self.tuples)

    def _database(self, j):
        if self.features is not None:
            return torch.from_numpy(np.asarray(self.features[j], dtype=np.float32))
        return self.transform(load_image(self.root / self.db.dbImage[j], self.root))

    def _query(self, q):
        if self.features is not None:
            return torch.from_numpy(np.asarray(self.features[self.db.numDb + q],
                                               dtype=np.float32))
        qroot = self.root / self.queries_dir
        return self.transform(load_image(qroot / self.db.qImage[q], qroot))

    def __getitem__(self, i):
        t = self.tuples[i]
        negatives = torch.stack([self._database(n) for n in t.negatives])  # (n, 3, H, W)
        return self._query(t.query), self._database(t.positive), negatives, i


def collate_fn(batch):
    """Batch `TripletDataset` items into (query, positive, negatives, neg_counts, indices).

    query, positive: (B, 3, H, W); negatives: (sum(neg_counts), 3, H, W), grouped by tuple;
    neg_counts: (B,) int64; indices: the list of the tuples' dataset indices.
    """
    query, positive, negatives, indices = zip(*batch)
    neg_counts = torch.tensor([len(n) for n in negatives], dtype=torch.long)
    return (torch.stack(query), torch.stack(positive), torch.cat(negatives), neg_counts,
            list(indices))


def triplet_loss(q, p, negs, neg_counts, margin=0.1):
    """The reference triplet loss of a batch of tuples, divided by the number of negatives.

    Equal to `nn.TripletMarginLoss(margin=sqrt(0.1), p=2, reduction="sum")` summed over every
    (query, positive, negative j) of the batch, divided by the total number of negatives
    (Nanne/pytorch-NetVlad). The paper and the MATLAB code use squared distances instead:
    sum_j max(0, ‖q − p‖² + 0.1 − ‖q − n_j‖²), with margin 0.1.

    Args:
        q, p: (B, D) query and positive descriptors.
        negs: (N, D) negative descriptors, grouped by tuple.
        neg_counts: (B,) negatives per tuple, summing to N (on the descriptors' device).
        margin: the margin on squared distances, as `TrainConfig.margin` and `mine_tuple`;
            the loss, on plain distances, uses `distance_margin = sqrt(margin)`.
    """
    distance_margin = math.sqrt(margin)
    q = q.repeat_interleave(neg_counts, dim=0)  # `q`: (N, D)
    p = p.repeat_interleave(neg_counts, dim=0)  # `p`: (N, D)
    return F.triplet_margin_loss(q, p, negs, margin=distance_margin, p=2,
                                 reduction="sum") / len(negs)
