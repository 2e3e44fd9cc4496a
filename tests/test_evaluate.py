"""Exact search and Recall@N against brute-force loops on random descriptors."""

import numpy as np
import pytest
import torch
from oracles import brute_force_dist, brute_force_recall

from netvlad_tutorial.evaluate import (
    RECALL_VALUES,
    dedup_panorama,
    panorama_id,
    recall_at_n,
    recall_curve,
    recall_from_predictions,
    topk_search,
)


def _random_case(num_q=37, num_db=101, dim=16, seed=0):
    """Normalized random descriptors; query i has 0 to 5 random positives (some have none)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(num_q, dim)).astype(np.float32)
    db = rng.normal(size=(num_db, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    sizes = rng.integers(0, min(6, num_db + 1), size=num_q)
    positives = [rng.choice(num_db, size=s, replace=False) for s in sizes]
    return q, db, positives


@pytest.mark.parametrize("chunk_size", [7, 32, 1000])
@pytest.mark.parametrize("k", [1, 5, 101, 200])
def test_topk_search_matches_brute_force(chunk_size, k):
    q, db, _ = _random_case()
    dist, idx = topk_search(q, db, k, chunk_size=chunk_size)
    full = brute_force_dist(q, db)
    k = min(k, len(db))
    assert dist.shape == idx.shape == (len(q), k)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    expected = np.sort(full, axis=1)[:, :k]
    np.testing.assert_allclose(dist, expected, atol=1e-3)
    # Ties may come in any order: the returned indices must have the returned distances.
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), expected, atol=1e-3)
    assert all(len(set(row)) == k for row in idx.tolist())


def test_topk_search_float16_numpy_and_torch_inputs():
    q, db, _ = _random_case(seed=1)
    q16, db16 = q.astype(np.float16), db.astype(np.float16)
    full = brute_force_dist(q16, db16)  # distances of the float16 values themselves
    for qq, dd in [(q16, db16), (torch.from_numpy(q16), torch.from_numpy(db16))]:
        dist, idx = topk_search(qq, dd, 10, chunk_size=13)
        np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1),
                                   np.sort(full, axis=1)[:, :10], atol=1e-3)
        np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :10], atol=1e-3)


def test_topk_search_reads_a_read_only_memmap(tmp_path):
    q, db, _ = _random_case(seed=2)
    np.save(tmp_path / "db.npy", db.astype(np.float16))
    db_map = np.load(tmp_path / "db.npy", mmap_mode="r")
    _, idx = topk_search(q, db_map, 3, chunk_size=10)
    np.testing.assert_array_equal(idx[:, 0], brute_force_dist(q, db_map).argmin(axis=1))


@pytest.mark.parametrize("n_values", [RECALL_VALUES, (1, 2, 3)])
def test_recall_at_n_matches_brute_force(n_values):
    q, db, positives = _random_case(seed=3)
    recalls = recall_at_n(q, db, positives, n_values=n_values)
    assert list(recalls) == list(n_values)
    for n in n_values:
        assert recalls[n] == pytest.approx(brute_force_recall(q, db, positives, n))


def test_recall_hand_built_predictions():
    predictions = np.array([[3, 1, 2], [0, 5, 4], [7, 8, 9], [2, 2, 2]])
    positives = [np.array([1]), np.array([0, 9]), np.array([6]), np.array([], dtype=np.int64)]
    # Query 0 is found at rank 2, query 1 at rank 1, queries 2 and 3 never (3 has no positive).
    assert recall_from_predictions(predictions, positives, (1, 2, 3)) == {
        1: 0.25, 2: 0.5, 3: 0.5}


def test_recall_with_n_beyond_database_size():
    q, db, positives = _random_case(num_q=9, num_db=4, seed=5)
    recalls = recall_at_n(q, db, positives, n_values=(1, 4, 20))
    # With every database image returned, exactly the queries with a positive are found.
    expected = np.mean([len(p) > 0 for p in positives])
    assert 0 < expected < 1
    assert recalls[4] == recalls[20] == pytest.approx(expected)
    assert recalls[1] == pytest.approx(brute_force_recall(q, db, positives, 1))


def test_recall_curve_matches_brute_force():
    q, db, positives = _random_case(seed=4)
    curve = recall_curve(q, db, positives, max_n=30)
    assert curve.shape == (30,)
    expected = [brute_force_recall(q, db, positives, n) for n in range(1, 31)]
    np.testing.assert_allclose(curve, expected)
    assert np.all(np.diff(curve) >= 0)


def test_panorama_id():
    assert panorama_id("03814/381447_012.jpg") == "03814/381447"
    assert panorama_id("000/000123_pitch1_yaw3.jpg") == "000/000123"


def test_dedup_panorama_keeps_first_view_of_each_panorama():
    names = ["a/1_000.jpg", "a/1_030.jpg", "a/2_000.jpg", "b/1_000.jpg", "a/2_090.jpg"]
    pred = np.array([[1, 0, 2, 4, 3], [4, 2, 3, 0, 1]])
    expected = np.array([[1, 2, 3, -1, -1], [4, 3, 0, -1, -1]])
    out = dedup_panorama(pred, names)
    np.testing.assert_array_equal(out, expected)
    # Same result by a plain loop over the names.
    for row, out_row in zip(pred, out):
        seen, kept = set(), []
        for j in row:
            pano = names[j].rsplit("_", 1)[0]
            if pano not in seen:
                seen.add(pano)
                kept.append(j)
        assert out_row[:len(kept)].tolist() == kept


def test_ties_are_ordered_by_index_whatever_k():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(5, 8)).astype(np.float32)
    db = np.repeat(base, 4, axis=0)  # every row appears 4 times: exact ties
    q = base[[2, 4]] + 0.01
    _, idx_small = topk_search(q, db, k=6, chunk_size=3, device="cpu")
    _, idx_large = topk_search(q, db, k=20, chunk_size=7, device="cpu")
    np.testing.assert_array_equal(idx_small, idx_large[:, :6])
    np.testing.assert_array_equal(idx_small[:, :4], [[8, 9, 10, 11], [16, 17, 18, 19]])
