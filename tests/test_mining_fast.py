"""The blocked `mining.row_distances` gives exactly the results of the code it replaced, and
allocates nothing but its result (its buffers are reused across calls); mining with threads
across queries, and with a shared pool of potential negatives, equals its plain loop."""

import numpy as np
import pytest
import torch

from netvlad_tutorial.mining import (
    POOL_GROUP,
    NegativeCache,
    Workspace,
    _chunks,
    _float32,
    draw_shared,
    mine_triplets,
    mine_tuple,
    pool_distances,
    row_distances,
    torch_threads,
)


class _FixedSampler:
    """Returns the same hand-picked potential negatives for every query."""

    def __init__(self, negatives):
        self.negatives = np.asarray(negatives, dtype=np.int64)

    def sample(self, q, n, rng):
        return self.negatives[:n]


def _old_mine_tuple(q, q_desc_row, db_desc, train_pos_q, sampler, rng, neg_cache, n_neg_sample,
                    n_neg_dist, n_neg, margin):
    """`mining.mine_tuple` as it was before the blocked distances (commit 2475cb5)."""
    device = torch.device("cpu")
    train_pos_q = np.asarray(train_pos_q, dtype=np.int64)
    sampled = np.asarray(sampler.sample(q, n_neg_sample, rng), dtype=np.int64)
    cached = neg_cache[q] if neg_cache is not None else np.empty(0, dtype=np.int64)
    candidates = np.unique(np.concatenate([sampled, cached]))
    rows = _float32(db_desc[np.concatenate([train_pos_q, candidates])], device)
    dist = torch.linalg.vector_norm(rows - _float32(q_desc_row, device), dim=1)
    d_pos_all, d_cand = dist[:len(train_pos_q)], dist[len(train_pos_q):]
    best = d_pos_all.argmin()
    d_near, near = d_cand.topk(min(n_neg_dist, len(candidates)), largest=False)
    violating = d_near < d_pos_all[best] + margin ** 0.5
    d_negs, chosen = d_near[violating][:n_neg], near[violating][:n_neg]
    return (int(train_pos_q[best]), candidates[chosen.cpu().numpy()], float(d_pos_all[best]),
            d_negs.cpu().numpy())


def _hand_built(dtype, tmp_path=None):
    """50 database rows of D = 300 (with exact duplicates: tied distances), 3 queries.

    Rows 0-4 are the positives; 37 candidates (more than two blocks of 16, not a multiple).
    """
    rng = np.random.default_rng(7)
    db = rng.normal(size=(50, 300)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db[20] = db[21] = db[22]  # ties
    q = db[:3] + 0.3 * rng.normal(size=(3, 300)).astype(np.float32)
    db, q = db.astype(dtype), q.astype(dtype)
    if tmp_path is not None:  # a disk-backed memmap, read-only as training opens it
        path = tmp_path / "db.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=db.shape)
        mm[:] = db
        mm.flush()
        db = np.load(path, mmap_mode="r")
    return db, q


@pytest.mark.parametrize("storage", ["float32", "float16", "memmap16", "tensor16"])
def test_mining_is_identical_to_the_previous_code(storage, tmp_path):
    dtype = np.float32 if storage == "float32" else np.float16
    db, q = _hand_built(dtype, tmp_path if storage == "memmap16" else None)
    if storage == "tensor16":
        db = torch.from_numpy(db)
    positives = [np.arange(5), np.array([1, 3]), np.array([2])]
    sampler = _FixedSampler(np.r_[5:42])
    for n_neg_dist, margin in [(100, 0.1), (8, 0.5), (3, 2.0)]:
        new_cache, old_cache = NegativeCache(3, 4), NegativeCache(3, 4)
        old_cache.update(0, np.array([45, 46]))
        new_cache.update(0, np.array([45, 46]))
        for query in range(3):
            old = _old_mine_tuple(query, q[query], db, positives[query], sampler, None,
                                  old_cache, 37, n_neg_dist, 4, margin)
            new = mine_tuple(query, q[query], db, positives[query], sampler, None, new_cache,
                             n_neg_sample=37, n_neg_dist=n_neg_dist, n_neg=4, margin=margin)
            assert (new.positive, new.d_pos) == old[:1] + old[2:3]
            np.testing.assert_array_equal(new.negatives, old[1])
            np.testing.assert_array_equal(new.d_negs, old[3])  # bit-identical
            assert len(new.negatives) > 0


def test_row_distances_block_boundaries_and_threads():
    db, q = _hand_built(np.float16)
    idx = np.r_[0:50, 3, 3]  # repeats, 52 rows: 3 full blocks of 16 and 4 rows
    expected = torch.linalg.vector_norm(_float32(db[idx], "cpu") - _float32(q[0], "cpu"), dim=1)
    for block in (1, 16, 64):
        with torch_threads(1):
            assert torch.equal(row_distances(db, idx, q[0], block=block), expected)
    assert torch.equal(row_distances(db.astype(np.float64), idx, q[0]), expected)  # plain path


def test_mine_triplets_restores_thread_count():
    db, q = _hand_built(np.float32)
    before = torch.get_num_threads()
    tuples, skipped = mine_triplets([0, 1], q, db, [np.arange(5), np.array([1])],
                                    _FixedSampler(np.r_[5:42]), None, NegativeCache(3, 4),
                                    n_neg_sample=37, n_neg=4, num_threads=1)
    assert torch.get_num_threads() == before
    assert len(tuples) + skipped == 2


@pytest.mark.parametrize("q_kind", ["float16", "float64", "tensor16", "memmap_row"])
def test_row_distances_query_forms(q_kind, tmp_path):
    db, q = _hand_built(np.float16, tmp_path)  # a read-only memmap database
    expected = torch.linalg.vector_norm(_float32(db[:], "cpu") - _float32(q[1], "cpu"), dim=1)
    row = {"float16": q[1], "float64": q[1].astype(np.float64),
           "tensor16": torch.from_numpy(q[1].copy()), "memmap_row": db[1]}[q_kind]
    if q_kind == "memmap_row":
        expected = torch.linalg.vector_norm(_float32(db[:], "cpu") - _float32(db[1], "cpu"), dim=1)
    assert torch.equal(row_distances(db, np.arange(50), row), expected)
    assert row_distances(db, np.empty(0, np.int64), row).shape == (0,)


def test_row_distances_reuses_its_buffers_and_allocates_only_the_result():
    """No allocation per block or per call beyond the (n,) result: what kept the heap flat."""
    from torch.profiler import ProfilerActivity, profile

    db, q = _hand_built(np.float16)
    idx = np.r_[0:50, 7]
    work = Workspace()
    with torch_threads(1):
        first = row_distances(db, idx, q[0], workspace=work)  # allocates the buffers once
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            again = row_distances(db, idx, q[0], workspace=work)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert torch.equal(first, again)
    assert allocated <= 4 * len(idx) + 1024  # the float32 result (and a few index bytes)
    wider = np.ones((3, 600), np.float16)  # a larger dimension: the buffers grow, still exact
    assert torch.allclose(row_distances(wider, np.array([0, 2]), np.zeros(600, np.float16),
                                        workspace=work), torch.full((2,), 600 ** 0.5))
    assert torch.equal(row_distances(db, idx, q[0], workspace=work), first)


def test_mining_agrees_with_a_float64_brute_force():
    """Distances within 1e-6 (relative) of float64 arithmetic, and the same tuples as float64
    ranking gives when no near-tie could reorder them: among the 51 nearest candidates no two
    distances, and none and the margin threshold, are closer than 4e-6 (checked)."""
    rng = np.random.default_rng(3)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)

    u = rng.normal(size=2048)  # rows around a common direction, the positives closest
    weight = np.r_[np.full(4, 1.6), rng.uniform(0, 1.4, 296)][:, None]  # positives: closest
    db = unit(weight * u / 45 + rng.normal(size=(300, 2048)) / 45)
    q = unit(1.6 * u / 45 + rng.normal(size=(4, 2048)) / 45)
    exact = np.linalg.norm(db.astype(np.float64)[None] - q.astype(np.float64)[:, None], axis=2)
    positives = [np.arange(4)] * 4
    sampler = _FixedSampler(np.r_[4:300])
    for query in range(4):
        got = row_distances(db, np.arange(300), q[query]).numpy()
        np.testing.assert_allclose(got, exact[query], rtol=1e-6)
        d = exact[query]
        best = int(np.argmin(d[:4]))
        nearest = np.sort(d[4:])[:51]
        assert np.diff(nearest).min() > 4e-6  # no near-ties: rounding cannot change the tuple
        assert np.abs(nearest - (d[best] + 0.1 ** 0.5)).min() > 4e-6
        t = mine_tuple(query, q[query], db, positives[query], sampler, None, None,
                       n_neg_sample=296, n_neg_dist=50, n_neg=10, margin=0.1)
        near = 4 + np.argsort(d[4:])[:50]
        expected = near[d[near] < d[best] + 0.1 ** 0.5][:10]
        assert t.positive == best and len(expected) > 0
        np.testing.assert_array_equal(t.negatives, expected)
        np.testing.assert_allclose(t.d_negs, d[expected], rtol=1e-6)


@pytest.mark.parametrize("storage", ["float16", "memmap"])
def test_parallel_mining_equals_one_query_after_the_other(storage, tmp_path):
    """Threads across queries: the same tuples, cache and RNG state as `mine_tuple` in a loop.

    Queries repeat (a query met twice in one epoch reads its negatives of a moment ago), within
    a chunk and across chunks.
    """
    _, sampler, db, q_desc, positives = _random_city(tmp_path if storage == "memmap" else None)
    num_q, rng = len(q_desc), np.random.default_rng(0)
    queries = rng.permutation(num_q)[:150]
    queries = np.r_[queries[:140], queries[:3], queries[140:], queries[:3]]  # 3 repeats in a chunk
    settings = dict(n_neg_sample=60, n_neg_dist=30, n_neg=5, margin=0.0004)

    expected, expected_skipped = [], 0  # the oracle: one query after the other
    ref_cache, ref_rng = NegativeCache(num_q, 5), np.random.default_rng(11)
    for q in queries:
        t = mine_tuple(int(q), q_desc[q], db, positives[q], sampler, ref_rng, ref_cache,
                       **settings)
        if len(t.negatives) == 0:
            expected_skipped += 1
            continue
        ref_cache.update(t.query, t.negatives)
        expected.append(t)
    repeats = [t for t in expected if t.query in queries[:3]]
    assert len(repeats) > 3 and not all(np.isin(t.negatives, t.sampled).all() for t in repeats)
    assert 0 < expected_skipped < len(queries) // 2 and len(expected) > 100

    for workers in (1, 2, 3):
        cache, gen = NegativeCache(num_q, 5), np.random.default_rng(11)
        tuples, skipped = mine_triplets(queries, q_desc, db, positives, sampler, gen, cache,
                                        workers=workers, **settings)
        assert skipped == expected_skipped and len(tuples) == len(expected)
        for got, want in zip(tuples, expected):
            assert (got.query, got.positive, got.d_pos) == (want.query, want.positive, want.d_pos)
            np.testing.assert_array_equal(got.negatives, want.negatives)
            np.testing.assert_array_equal(got.d_negs, want.d_negs)
            np.testing.assert_array_equal(got.sampled, want.sampled)
        np.testing.assert_array_equal(cache.negatives, ref_cache.negatives)
        assert gen.bit_generator.state == ref_rng.bit_generator.state


def _random_city(tmp_path=None, seed=3):
    """A Pitts-like city of 1,824 database rows and 156 queries, with random unit descriptors."""
    from netvlad_tutorial.data import NegativeSampler
    from netvlad_tutorial.synthetic import pitts_like_struct

    db_struct = pitts_like_struct(scale=0.02, seed=seed)
    rng = np.random.default_rng(0)
    db = rng.normal(size=(db_struct.numDb, 96)).astype(np.float32)
    q_desc = rng.normal(size=(db_struct.numQ, 96)).astype(np.float32)
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float16)
    q_desc = (q_desc / np.linalg.norm(q_desc, axis=1, keepdims=True)).astype(np.float16)
    if tmp_path is not None:
        mm = np.lib.format.open_memmap(tmp_path / "db.npy", mode="w+", dtype=db.dtype,
                                       shape=db.shape)
        mm[:] = db
        mm.flush()
        db = np.load(tmp_path / "db.npy", mmap_mode="r")
    positives = [np.sort(rng.choice(db_struct.numDb, size=3, replace=False))
                 for _ in range(db_struct.numQ)]
    return db_struct, NegativeSampler(db_struct), db, q_desc, positives


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_pool_distances_agree_with_float64(dtype, tmp_path):
    """The dot-product expansion against the direct distance in float64, and `row_distances`."""
    _, _, db, q_desc, _ = _random_city(tmp_path if dtype == np.float16 else None)
    db = db if dtype == np.float16 else np.asarray(db, np.float32)
    pool = np.random.default_rng(1).choice(len(db), size=53, replace=False)  # not a multiple
    got = pool_distances(db, pool, q_desc[:7])
    assert got.shape == (7, 53) and got.dtype == torch.float32
    exact = np.linalg.norm(np.asarray(db[pool], np.float64)[None]
                           - np.asarray(q_desc[:7], np.float64)[:, None], axis=2)  # (7, 53)
    np.testing.assert_allclose(got.numpy(), exact, rtol=0, atol=2e-6)
    for g in range(7):
        torch.testing.assert_close(got[g], row_distances(db, pool, q_desc[g]), rtol=0, atol=2e-6)
    same = pool_distances(db, pool[:5], q_desc[:1])
    assert torch.equal(same[0, :5], pool_distances(db, pool[:5], q_desc[0][None])[0])
    assert pool_distances(db, np.array([3]), db[3][None]).item() < 1e-3  # ‖x − x‖: clamped, ≥ 0


def test_draw_shared_gives_each_query_a_uniform_sample_of_its_negatives():
    """Every sample: n distinct negatives (beyond 25 m); over many draws each negative of a
    query is drawn about n / (its negatives) of the time (a chi-square bound)."""
    db_struct, sampler, *_ = _random_city()
    group = list(range(10))
    rng = np.random.default_rng(5)
    counts, draws, n = np.zeros(db_struct.numDb), 3000, 40
    for _ in range(draws):
        pool, samples = draw_shared(group, sampler, rng, n)
        assert len(np.unique(pool)) == len(pool) == n + 8
        for q, sample in zip(group, samples):
            assert len(sample) == len(np.unique(sample)) == n
            assert sampler.is_negative(q, sample).all()
        counts[samples[0]] += 1
    negatives = np.flatnonzero(sampler.is_negative(0, np.arange(db_struct.numDb)))
    assert counts[np.setdiff1d(np.arange(db_struct.numDb), negatives)].sum() == 0
    expected = draws * n / len(negatives)
    chi2 = ((counts[negatives] - expected) ** 2 / expected).sum()
    dof = len(negatives) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof)  # about 5 standard deviations


def _mine_float64(q, q_desc, db, positives, sampled, cached, n_neg_dist, n_neg, margin):
    """The oracle of a mined tuple, by brute force in float64: (positive, negatives)."""
    cand = np.unique(np.concatenate([sampled, cached]))
    qv = np.asarray(q_desc[q], np.float64)
    d_pos = np.linalg.norm(np.asarray(db[positives[q]], np.float64) - qv, axis=1)
    d_cand = np.linalg.norm(np.asarray(db[cand], np.float64) - qv, axis=1)
    near = np.argsort(d_cand, kind="stable")[:n_neg_dist]
    chosen = [j for j in near if d_cand[j] < d_pos.min() + margin ** 0.5][:n_neg]
    return int(positives[q][d_pos.argmin()]), cand[chosen], d_pos.min(), d_cand[chosen]


@pytest.mark.parametrize("storage", ["float16", "memmap"])
def test_shared_pool_mining_equals_its_draws_mined_in_float64(storage, tmp_path):
    """negative_pool="shared": for the samples `draw_shared` gives (query after query, the
    negative cache updated), the tuples of a float64 brute force, and the same tuples, cache and
    RNG state whatever the number of workers."""
    _, sampler, db, q_desc, positives = _random_city(tmp_path if storage == "memmap" else None)
    rng = np.random.default_rng(0)
    queries = rng.permutation(len(q_desc))[:150]
    queries = np.r_[queries[:140], queries[:3], queries[140:], queries[:3]]
    settings = dict(n_neg_sample=60, n_neg_dist=30, n_neg=5, margin=0.0004)

    ref_rng, drawn = np.random.default_rng(11), {}
    for group in _chunks([int(q) for q in queries], POOL_GROUP):
        _, samples = draw_shared(group, sampler, ref_rng, settings["n_neg_sample"])
        for q, sample in zip(group, samples):
            drawn.setdefault(q, []).append(sample)
    expected, ref_cache = [], NegativeCache(len(q_desc), 5)
    for q in queries:
        sampled = drawn[q].pop(0)
        pos, negs, d_pos, d_negs = _mine_float64(q, q_desc, db, positives, sampled,
                                                 ref_cache[q], 30, 5, 0.0004)
        if len(negs):
            ref_cache.update(q, negs)
            expected.append((q, pos, negs, d_pos, d_negs, sampled))
    assert len(queries) // 2 < len(expected) < len(queries) - 5  # some skipped, most mined
    assert any(not np.isin(e[2], e[5]).all() for e in expected)  # cached negatives were used

    results = []
    for workers in (1, 2, 3):
        cache, gen = NegativeCache(len(q_desc), 5), np.random.default_rng(11)
        tuples, skipped = mine_triplets(queries, q_desc, db, positives, sampler, gen, cache,
                                        workers=workers, negative_pool="shared", **settings)
        assert skipped == len(queries) - len(expected) and len(tuples) == len(expected)
        for got, (q, pos, negs, d_pos, d_negs, sampled) in zip(tuples, expected):
            assert (got.query, got.positive) == (q, pos)
            np.testing.assert_array_equal(got.negatives, negs)
            np.testing.assert_array_equal(got.sampled, sampled)
            np.testing.assert_allclose(got.d_pos, d_pos, atol=2e-6)
            np.testing.assert_allclose(got.d_negs, d_negs, atol=2e-6)
        np.testing.assert_array_equal(cache.negatives, ref_cache.negatives)
        assert gen.bit_generator.state == ref_rng.bit_generator.state
        results.append([(t.d_pos, t.d_negs.tobytes()) for t in tuples])
    assert results[0] == results[1] == results[2]  # bit for bit, whatever the threads
    with pytest.raises(ValueError, match="negative_pool"):
        mine_triplets(queries, q_desc, db, positives, sampler, gen, cache, negative_pool="x")


def test_config_refuses_an_unknown_negative_pool():
    from netvlad_tutorial.config import TrainConfig

    assert TrainConfig().negative_pool == "query"  # the reference by default
    with pytest.raises(ValueError, match="negative_pool` must be one of 'query', 'shared'"):
        TrainConfig(negative_pool="pooled")
