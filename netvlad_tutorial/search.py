"""Approximate nearest-neighbour search with faiss, beside the exact search of `evaluate`.

Reads top to bottom: descriptors to search (`generated_descriptors`, any size) -> one index of
each kind behind `build_index` and `search` ("exact": `evaluate.topk_search`; "flat": faiss'
exhaustive L2; "ivfpq": an inverted file over k-means cells with product-quantized codes;
"hnsw": a navigable small-world graph) -> `benchmark_search`: recall against exact search,
query speed and memory of each -> `sweep_search`: one index at several search settings (IVF's
`nprobe`, HNSW's `efSearch`), the trade of speed for recall. Distances are Euclidean (not
squared), as `topk_search`'s.
"""

import time

import faiss
import numpy as np
from tqdm import tqdm

from .evaluate import recall_from_predictions, topk_search
from .utils import leave_progress, progress_hidden

INDEXES = ("exact", "flat", "ivfpq", "hnsw")


def generated_descriptors(num_db, num_q, dim, noise=0.6, seed=0):
    """Unit descriptors with a known answer: each query is a noisy copy of one database row.

    Database rows are random directions (N, dim); query j is `db[source[j]]` plus Gaussian
    noise of norm about `noise`, renormalized.

    Returns:
        `db` (N, dim) float32, `q` (M, dim) float32, `source` (M,) int64.
    """
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((num_db, dim), dtype=np.float32)  # `db`: (N, dim)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    source = rng.integers(0, num_db, num_q)  # (M,)
    q = db[source] + noise / np.sqrt(dim) * rng.standard_normal((num_q, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)  # `q`: (M, dim)
    return db, q, source


def _pq_subquantizers(dim, most=64, least_width=8):
    """The largest number of PQ sub-vectors <= `most`, of at least `least_width` dimensions
    each, that divides `dim` (k-means on narrower sub-vectors costs faiss more than it gains)."""
    return max(m for m in range(1, max(1, min(most, dim // least_width)) + 1) if dim % m == 0)


def build_index(db, kind="flat", nlist=None, pq_m=None, pq_bits=8, train_size=None,
                hnsw_m=32, ef_construction=40, seed=0):
    """A faiss index of the database rows `db` (N, D), trained where the kind needs it.

    Args:
        kind: "flat" (exhaustive, exact), "ivfpq" or "hnsw" (approximate).
        nlist: IVF cells (default about sqrt(N)); pq_m: PQ sub-vectors, one code of
            `pq_bits` bits each (default: the largest divisor of D up to min(64, D/8)).
        train_size: database rows drawn (`seed`) to train the IVF cells and PQ codebooks
            (default: 40 per cell or per PQ centroid, the least faiss asks for, at most N).
        hnsw_m: graph neighbours per node; ef_construction: the graph's build-time beam.
        seed: of the training sample and of the k-means that trains on it.
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    num_db, dim = db.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "ivfpq":
        nlist = nlist or max(1, min(int(np.sqrt(num_db)), num_db // 40))
        pq_m = pq_m or _pq_subquantizers(dim)
        train_size = min(num_db, train_size or 40 * max(nlist, 2 ** pq_bits))
        sample = np.random.default_rng(seed).choice(num_db, train_size, replace=False)
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, pq_m, pq_bits)
        index.cp.seed = seed
        index.pq.cp.seed = seed
        index.train(db[np.sort(sample)])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m)
        index.hnsw.efConstruction = ef_construction
    else:
        raise ValueError(f"unknown index {kind!r}; choose one of {', '.join(INDEXES[1:])}")
    index.add(db)
    return index


def index_search(index, q, k, nprobe=8, ef_search=64):
    """The `k` nearest database rows of each query in a faiss `index`: (dist, idx) (M, k).

    Args:
        nprobe: IVF cells visited per query; ef_search: HNSW's search beam (at least k).
    """
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(ef_search, k)
    sq_dist, idx = index.search(np.ascontiguousarray(q, dtype=np.float32), k)  # (M, k) each
    return np.sqrt(np.maximum(sq_dist, 0)), idx.astype(np.int64)


def search(q, db, k, kind="exact", **options):
    """The `k` nearest database rows of each query, exactly or with a faiss index of `kind`.

    Builds the index each call (`build_index` + `index_search` keep one). Returns (dist, idx),
    (M, k) each, nearest first; `options` go to `build_index` and `index_search`.
    """
    if kind == "exact":
        return topk_search(q, db, k, device="cpu")
    search_options = {n: options.pop(n) for n in ("nprobe", "ef_search") if n in options}
    return index_search(build_index(db, kind, **options), q, k, **search_options)


def index_memory_mib(index):
    """The index's size in MiB: its serialized bytes (vectors or codes, and structure)."""
    return faiss.serialize_index(index).nbytes / 2**20


def knn_recall(pred, exact, k):
    """The fraction of the exact `k` nearest neighbours (M, >= k) found among `pred`'s first
    `k` (M, >= k), averaged over the queries ("k-NN recall" or "recall k@k")."""
    pred, exact = np.asarray(pred)[:, :k], np.asarray(exact)[:, :k]
    return float(np.mean([len(np.intersect1d(p, e)) / k for p, e in zip(pred, exact)]))


def benchmark_search(db, q, k=10, kinds=INDEXES, positives=None, build=None, nprobe=8,
                     ef_search=64, label=None, return_indexes=False):
    """Each kind of search on the same descriptors: recall, speed and memory.

    Args:
        db, q: (N, D) and (M, D) descriptors.
        k: neighbours per query.
        positives: optional per-query positives (e.g. `[[s] for s in source]`): adds the
            place-recognition Recall@1 and Recall@k of each kind.
        build: {kind: options for `build_index`}.
        label: a progress bar over the kinds with this description (None: no bar).
        return_indexes: also return {kind: the faiss index built} (for `sweep_search`).

    Returns:
        one dict per kind: `index`, `knn_recall` (of the exact top-k), `top1_agreement` (the
        exact nearest neighbour found first), `build_s`, `query_ms` (per query, the threads
        faiss and torch are set to), `memory_mib`, and `recall@1`, `recall@k` with
        `positives`; with `return_indexes`, (rows, indexes).
    """
    build = build or {}
    db = np.ascontiguousarray(db, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    start = time.perf_counter()
    _, exact = topk_search(q, db, k, device="cpu")  # the reference, timed as kind "exact"
    exact_ms = 1000 * (time.perf_counter() - start) / len(q)
    rows, indexes = [], {}
    for kind in tqdm(kinds, desc=label, unit="index", leave=leave_progress(),
                     disable=label is None or progress_hidden()):
        start = time.perf_counter()
        index = None if kind == "exact" else build_index(db, kind, **build.get(kind, {}))
        built = time.perf_counter()
        if index is None:
            idx, query_ms, memory = exact, exact_ms, db.nbytes / 2**20
        else:
            _, idx = index_search(index, q, k, nprobe=nprobe, ef_search=ef_search)
            query_ms = 1000 * (time.perf_counter() - built) / len(q)
            memory = index_memory_mib(index)
            indexes[kind] = index
        row = {"index": kind, "knn_recall": knn_recall(idx, exact, k),
               "top1_agreement": float(np.mean(idx[:, 0] == exact[:, 0])),
               "build_s": built - start, "query_ms": query_ms, "memory_mib": memory}
        if positives is not None:
            recalls = recall_from_predictions(idx, positives, (1, k))
            row.update({f"recall@{n}": r for n, r in recalls.items()})
        rows.append(row)
    return (rows, indexes) if return_indexes else rows


SWEEPS = {"ivfpq": ("nprobe", (1, 2, 4, 8, 16, 32, 64)),
          "hnsw": ("ef_search", (16, 32, 64, 128, 256))}


def sweep_search(index, q, positives, k=10, values=None, exact=None):
    """One index searched at several settings: how much recall each bit of speed costs.

    Args:
        index: an IVF index (the setting is `nprobe`, cells visited) or an HNSW index
            (`ef_search`, the search beam; at least `k`).
        q: (M, D) queries; positives: per-query positives, as `recall_from_predictions`.
        values: the settings to try (default `SWEEPS` of the index's kind).
        exact: optional (M, >= k) exact neighbours: adds `knn_recall`.

    Returns:
        one dict per value: `setting` ("nprobe" or "ef_search"), `value`, `recall@1`,
        `recall@k`, `query_ms` (per query), and `knn_recall` with `exact`.
    """
    if isinstance(index, faiss.IndexIVF):
        setting = "nprobe"
    elif isinstance(index, faiss.IndexHNSW):
        setting = "ef_search"
    else:
        raise ValueError(f"{type(index).__name__} has no search setting to sweep; "
                         "give an IVF or an HNSW index")
    kind = "ivfpq" if setting == "nprobe" else "hnsw"
    q = np.ascontiguousarray(q, dtype=np.float32)
    rows = []
    for value in values or SWEEPS[kind][1]:
        start = time.perf_counter()
        _, idx = index_search(index, q, k, **{setting: value})
        query_ms = 1000 * (time.perf_counter() - start) / len(q)
        row = {"setting": setting, "value": value, "query_ms": query_ms}
        row.update({f"recall@{n}": r
                    for n, r in recall_from_predictions(idx, positives, (1, k)).items()})
        if exact is not None:
            row["knn_recall"] = knn_recall(idx, exact, k)
        rows.append(row)
    return rows
