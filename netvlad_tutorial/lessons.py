"""Measurements that only the course uses, kept out of the data layer: what listing every
query's negatives, as the seed does, costs against drawing them on demand (notebook 01).
"""

import time

import numpy as np

from .data import NegativeSampler, eval_positives, train_positives
from .utils import measure


def seed_negative_lists(db):
    """The seed's (and Nanne's) way: radius search, then one `setdiff1d` array per query.

    Returns:
        (evaluation positives, training positives, negatives): three lists of `numQ` arrays,
        the negatives each as long as the database.
    """
    from sklearn.neighbors import NearestNeighbors  # imported here: 1.7 s at import time

    knn = NearestNeighbors().fit(db.utmDb)
    dist, positives = knn.radius_neighbors(db.utmQ, radius=db.posDistThr)
    train = [p[d ** 2 <= db.nonTrivPosDistSqThr] for d, p in zip(dist, positives)]
    all_db = np.arange(db.numDb)
    negatives = [np.setdiff1d(all_db, p, assume_unique=True) for p in positives]
    return positives, train, negatives


def project_negatives(db):
    """This project's way: sorted positives per query and a `NegativeSampler`."""
    return eval_positives(db), train_positives(db), NegativeSampler(db)


def compare_negative_memory(db, num_sample_queries=1000, n_neg_sample=1000, seed=0):
    """Time and peak memory of both ways to get positives and negatives for `db`, measured now.

    Returns:
        dict with `num_db`, `num_q`, `rows` (one `(approach, seconds, peak MiB)` per way) and
        `sample_us`: the mean time of one `NegativeSampler.sample(q, n_neg_sample)` call in
        microseconds (`n_neg_sample` is capped at a quarter of the database).
    """
    rows = [("seed: radius_neighbors + setdiff1d per query", *measure(seed_negative_lists, db)),
            ("project: positives + NegativeSampler", *measure(project_negatives, db))]
    sampler, rng = NegativeSampler(db), np.random.default_rng(seed)
    n_neg_sample = min(n_neg_sample, db.numDb // 4)  # small databases have fewer images
    queries = rng.integers(0, db.numQ, num_sample_queries)
    start = time.perf_counter()
    for q in queries:
        sampler.sample(q, n_neg_sample, rng)
    sample_us = (time.perf_counter() - start) / len(queries) * 1e6
    return {"num_db": db.numDb, "num_q": db.numQ, "rows": rows, "sample_us": sample_us,
            "n_neg_sample": n_neg_sample}


def format_negative_memory(result):
    """The `compare_negative_memory` result as a small table."""
    lines = [f"Positives and negatives for {result['num_db']:,} database images and "
             f"{result['num_q']:,} queries",
             f"{'approach':<48}{'time (s)':>10}{'peak extra memory':>20}"]
    for name, seconds, mib in result["rows"]:
        size = f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"
        lines.append(f"{name:<48}{seconds:>10.2f}{size:>20}")
    lines.append(f"NegativeSampler.sample(q, {result['n_neg_sample']}): "
                 f"{result['sample_us']:.0f} us per query")
    return "\n".join(lines)
