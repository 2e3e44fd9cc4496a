"""Re-ranking by local features on hand-built feature maps whose answer is known."""

import numpy as np
import pytest

from netvlad_tutorial.rerank import (
    inlier_count,
    mutual_nearest_neighbours,
    rerank,
    translation_inliers,
)


def one_hot_map(codes, dim):
    """A (dim, h, w) feature map with a one-hot descriptor `codes[r][c]` at each position."""
    codes = np.asarray(codes)
    return np.eye(dim, dtype=np.float32)[codes].transpose(2, 0, 1)


def test_mutual_nearest_neighbours_by_hand():
    # a: e0 at (0, 0), 0.9 e0 + 0.1 e1 at (0, 1), e2 at (0, 2); b: e2 at (0, 0), e0 at (0, 1)
    fa = np.array([[[1.0, 0.9, 0.0]], [[0.0, 0.1, 0.0]], [[0.0, 0.0, 1.0]]])
    fb = np.array([[[0.0, 1.0]], [[0.0, 0.0]], [[1.0, 0.0]]])
    pos_a, pos_b = mutual_nearest_neighbours(fa, fb)
    # (0, 1) of a has b's e0 as nearest, but e0's nearest in a is (0, 0): not mutual
    np.testing.assert_array_equal(pos_a, [[0, 0], [0, 2]])
    np.testing.assert_array_equal(pos_b, [[0, 1], [0, 0]])


def test_mutual_nearest_neighbours_against_a_loop():
    rng = np.random.default_rng(0)
    fa, fb = rng.normal(size=(8, 3, 4)), rng.normal(size=(8, 2, 5))
    a = [fa[:, r, c] / np.linalg.norm(fa[:, r, c]) for r in range(3) for c in range(4)]
    b = [fb[:, r, c] / np.linalg.norm(fb[:, r, c]) for r in range(2) for c in range(5)]
    expected = []
    for i, x in enumerate(a):
        j = max(range(len(b)), key=lambda j: x @ b[j])
        if max(range(len(a)), key=lambda i2: a[i2] @ b[j]) == i:
            expected.append(((i // 4, i % 4), (j // 5, j % 5)))
    pos_a, pos_b = mutual_nearest_neighbours(fa, fb)
    assert [(tuple(p), tuple(q)) for p, q in zip(pos_a, pos_b)] == expected
    assert len(expected) > 0


def test_translation_inliers_by_hand():
    pos_a = np.array([[0, 0], [1, 1], [2, 0], [3, 3], [0, 4]])
    pos_b = pos_a + np.array([[1, 2], [1, 2], [1, 3], [-3, 0], [1, 2]])
    count, mask = translation_inliers(pos_a, pos_b, tolerance=0)
    assert count == 3
    np.testing.assert_array_equal(mask, [True, True, False, False, True])
    count, mask = translation_inliers(pos_a, pos_b, tolerance=1)  # (1, 3) is 1 cell away
    assert count == 4 and not mask[3]
    assert translation_inliers(np.zeros((0, 2)), np.zeros((0, 2)))[0] == 0


def shifted_scene(dim=80, h=6, w=8, shift=(1, 2), seed=0):
    """A query, the same place seen shifted by `shift` cells, a look-alike with the same
    descriptors scattered, and an unrelated map: (query, same, scrambled, other)."""
    rng = np.random.default_rng(seed)
    world = rng.permutation(dim)[: (h + shift[0]) * (w + shift[1])].reshape(h + shift[0], -1)
    query = world[shift[0]:, shift[1]:]  # (h, w) codes
    same = world[:h, :w]  # the view moved: query content appears shifted by +shift
    scrambled = rng.permutation(query.ravel()).reshape(h, w)
    other = rng.integers(0, dim, (h, w))
    return [one_hot_map(c, dim) for c in (query, same, scrambled, other)]


def test_inlier_count_prefers_the_consistent_shift():
    query, same, scrambled, other = shifted_scene()
    overlap = (6 - 1) * (8 - 2)  # positions the two views share
    assert inlier_count(query, same, tolerance=0) == overlap
    # every descriptor of the look-alike matches, but in scattered positions
    assert len(mutual_nearest_neighbours(query, scrambled)[0]) == 6 * 8
    assert inlier_count(query, scrambled, tolerance=0) < overlap / 4
    assert inlier_count(query, other, tolerance=0) < overlap / 4


def test_rerank_puts_the_true_place_first_and_keeps_the_rest():
    query, same, scrambled, other = shifted_scene()
    db = np.stack([other, scrambled, same, other])  # (N, D, h, w)
    queries = np.stack([query, query])
    predictions = np.array([[1, 0, 2, 3], [2, 1, -1, -1]])
    reranked, inliers = rerank(queries, db, predictions, top_k=3, tolerance=0)
    np.testing.assert_array_equal(reranked, [[2, 1, 0, 3], [2, 1, -1, -1]])
    expected = [[inlier_count(query, db[i], tolerance=0) for i in (1, 0, 2)],
                [inlier_count(query, db[i], tolerance=0) for i in (2, 1)] + [-1]]
    np.testing.assert_array_equal(inliers, expected)


@pytest.mark.parametrize("top_k", [1, 2])
def test_rerank_touches_only_the_top_k(top_k):
    query, same, scrambled, other = shifted_scene()
    db = np.stack([other, scrambled, same])
    predictions = np.array([[0, 1, 2]])
    reranked, _ = rerank(np.stack([query]), db, predictions, top_k=top_k, tolerance=0)
    np.testing.assert_array_equal(reranked[0, top_k:], predictions[0, top_k:])
    assert sorted(reranked[0, :top_k]) == sorted(predictions[0, :top_k])


def test_rerank_progress_bar_changes_nothing(capsys):
    query, same, scrambled, other = shifted_scene()
    db, queries = np.stack([other, scrambled, same]), np.stack([query, query])
    predictions = np.array([[0, 1, 2], [1, 2, 0]])
    quiet = rerank(queries, db, predictions, top_k=3, tolerance=0)
    shown = rerank(queries, db, predictions, top_k=3, tolerance=0, label="Re-ranking")
    for a, b in zip(quiet, shown):
        np.testing.assert_array_equal(a, b)
    assert "Re-ranking" in capsys.readouterr().err
