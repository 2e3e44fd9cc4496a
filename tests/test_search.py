"""faiss indexes against brute force: flat exactly, IVF-PQ and HNSW through their recall."""

import faiss
import numpy as np
import pytest

from netvlad_tutorial.search import (
    benchmark_search,
    build_index,
    generated_descriptors,
    index_memory_mib,
    index_search,
    knn_recall,
    search,
    sweep_search,
)

BUILD = {"ivfpq": {"nlist": 8, "pq_m": 8, "pq_bits": 4}, "hnsw": {"hnsw_m": 8}}


@pytest.fixture(autouse=True)
def one_thread():
    """One faiss thread: HNSW's graph (built in parallel otherwise) is then reproducible."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def brute_force(q, db, k):
    """Euclidean distances in float64 and the k nearest of each query, by a loop."""
    dist, idx = [], []
    for row in np.asarray(q, np.float64):
        d = np.sqrt(((np.asarray(db, np.float64) - row) ** 2).sum(1))
        order = np.argsort(d, kind="stable")[:k]
        dist.append(d[order])
        idx.append(order)
    return np.array(dist), np.array(idx)


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_exact_kinds_equal_brute_force(kind):
    db, q, _ = generated_descriptors(500, 20, 16, seed=1)
    dist, idx = search(q, db, 7, kind=kind)
    expected_dist, expected_idx = brute_force(q, db, 7)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(dist, expected_dist, atol=1e-5)


def test_generated_queries_are_noisy_copies():
    db, q, source = generated_descriptors(300, 40, 32, noise=0.3, seed=0)
    assert db.shape == (300, 32) and q.shape == (40, 32) and source.shape == (40,)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(brute_force(q, db, 1)[1][:, 0], source)


def test_knn_recall_by_hand():
    pred = np.array([[1, 2, 3, 0], [4, 5, 6, 0]])
    exact = np.array([[3, 2, 9], [7, 8, 9]])
    assert knn_recall(pred, exact, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert knn_recall(pred, exact, 1) == 0.0


def test_benchmark_recall_is_computed_against_brute_force():
    db, q, source = generated_descriptors(800, 30, 16, noise=0.8, seed=2)
    positives = [np.array([s]) for s in source]
    rows = {r["index"]: r for r in benchmark_search(db, q, k=5, positives=positives,
                                                     build=BUILD, nprobe=2, ef_search=8)}
    assert list(rows) == ["exact", "flat", "ivfpq", "hnsw"]
    _, truth = brute_force(q, db, 5)
    for kind, row in rows.items():
        _, idx = search(q, db, 5, kind=kind, **BUILD.get(kind, {}),
                        **({} if kind in ("exact", "flat") else {"nprobe": 2, "ef_search": 8}))
        hits = [len(set(idx[j]) & set(truth[j])) / 5 for j in range(len(q))]
        assert row["knn_recall"] == pytest.approx(np.mean(hits))
        assert row["top1_agreement"] == pytest.approx(np.mean(idx[:, 0] == truth[:, 0]))
        assert row["recall@1"] == pytest.approx(np.mean(idx[:, 0] == source))
        assert row["recall@5"] == pytest.approx(np.mean([s in i for s, i in zip(source, idx)]))
        assert row["query_ms"] >= 0 and row["build_s"] >= 0
    assert rows["exact"]["knn_recall"] == rows["flat"]["knn_recall"] == 1.0
    assert rows["ivfpq"]["knn_recall"] < 1.0  # 2 of 8 cells, 4-bit codes: approximate
    # memory: float32 vectors for exact and flat; 8 codes of 4 bits per vector for IVF-PQ
    assert rows["exact"]["memory_mib"] == 800 * 16 * 4 / 2**20
    assert rows["flat"]["memory_mib"] == pytest.approx(800 * 16 * 4 / 2**20, rel=0.01)
    assert rows["ivfpq"]["memory_mib"] < rows["flat"]["memory_mib"] / 2
    assert rows["hnsw"]["memory_mib"] > rows["flat"]["memory_mib"]  # vectors + graph


def test_index_memory_is_the_serialized_size():
    db, _, _ = generated_descriptors(100, 1, 8)
    index = build_index(db, "flat")
    assert index_memory_mib(index) * 2**20 == len(faiss.serialize_index(index))
    with pytest.raises(ValueError, match="unknown index"):
        build_index(db, "lsh")


def hits(idx, source, n):
    """Recall@n of predictions `idx` when each query's one positive is `source`, by a loop."""
    return np.mean([s in row[:n] for s, row in zip(source, idx)])


@pytest.mark.parametrize("kind, setting", [("ivfpq", "nprobe"), ("hnsw", "ef_search")])
def test_sweep_search_recalls_equal_each_setting_searched_alone(kind, setting):
    db, q, source = generated_descriptors(800, 30, 16, noise=0.8, seed=3)
    positives = [np.array([s]) for s in source]
    index = build_index(db, kind, **BUILD[kind])
    _, truth = brute_force(q, db, 5)
    rows = sweep_search(index, q, positives, k=5, values=(1, 4, 8), exact=truth)
    assert [(r["setting"], r["value"]) for r in rows] == [(setting, v) for v in (1, 4, 8)]
    for row in rows:
        _, idx = index_search(index, q, 5, **{setting: row["value"]})
        assert row["recall@1"] == pytest.approx(hits(idx, source, 1))
        assert row["recall@5"] == pytest.approx(hits(idx, source, 5))
        assert row["knn_recall"] == pytest.approx(
            np.mean([len(set(i) & set(t)) / 5 for i, t in zip(idx, truth)]))
        assert row["query_ms"] >= 0


def test_sweep_search_refuses_an_index_without_a_setting():
    db, q, source = generated_descriptors(50, 2, 8)
    with pytest.raises(ValueError, match="no search setting"):
        sweep_search(build_index(db, "flat"), q, [[s] for s in source])


def test_benchmark_returns_the_indexes_it_measured():
    db, q, source = generated_descriptors(400, 20, 16, noise=0.8, seed=4)
    positives = [np.array([s]) for s in source]
    rows, indexes = benchmark_search(db, q, k=5, positives=positives, build=BUILD, nprobe=2,
                                     ef_search=8, return_indexes=True)
    assert sorted(indexes) == ["flat", "hnsw", "ivfpq"]
    for row in rows[1:]:
        index = indexes[row["index"]]
        assert index.ntotal == len(db)
        assert row["memory_mib"] == index_memory_mib(index)
        _, idx = index_search(index, q, 5, nprobe=2, ef_search=8)
        assert row["recall@1"] == pytest.approx(hits(idx, source, 1))


def test_plot_search_tradeoff_draws_the_given_numbers():
    from netvlad_tutorial import viz

    rows = [{"index": "exact", "query_ms": 9.0, "memory_mib": 40.0, "recall@1": 1.0},
            {"index": "flat", "query_ms": 2.0, "memory_mib": 40.0, "recall@1": 1.0},
            {"index": "ivfpq", "query_ms": 0.1, "memory_mib": 2.0, "recall@1": 0.8}]
    sweep = [{"setting": "nprobe", "value": v, "query_ms": t, "recall@1": r}
             for v, t, r in [(1, 0.05, 0.5), (8, 0.1, 0.8), (64, 0.6, 0.85)]]
    ax, mem_ax = viz.plot_search_tradeoff(rows, {"ivfpq": sweep}).axes
    (line,) = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), [0.05, 0.1, 0.6])
    np.testing.assert_array_equal(line.get_ydata(), [0.5, 0.8, 0.85])
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_array_equal(points, [[9.0, 1.0], [2.0, 1.0]])  # the swept kind: a line
    assert [t.get_text() for t in ax.texts] == ["1", "8", "64"]
    assert [p.get_width() for p in mem_ax.patches] == [40.0, 40.0, 2.0]
    assert ax.get_xscale() == "log" and mem_ax.get_xscale() == "log"
