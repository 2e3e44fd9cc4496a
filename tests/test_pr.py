"""Precision-recall as the VPR tutorial defines it: hand-computed cases and a brute-force loop
over every threshold."""

import numpy as np
import pytest
import torch

from netvlad_tutorial.evaluate import (
    best_matches,
    ground_truth_matrix,
    pr_auc,
    precision_recall_curve,
    recall_at_100_precision,
    similarity_matrix,
)


def test_similarity_matrix_is_cosine_database_by_query():
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    S = similarity_matrix(db, q)
    assert S.shape == (5, 4)
    for i in range(5):
        for j in range(4):
            cos = db[i] @ q[j] / np.linalg.norm(db[i]) / np.linalg.norm(q[j])
            assert S[i, j] == pytest.approx(cos, abs=1e-6)
    np.testing.assert_allclose(similarity_matrix(torch.tensor(db), q), S)


def test_ground_truth_matrix():
    gt = ground_truth_matrix([np.array([2, 0]), np.array([], dtype=np.int64)], 3)
    np.testing.assert_array_equal(gt, [[True, False], [False, False], [True, False]])


def test_multi_matching_by_hand():
    S = np.array([[0.9, 0.2], [0.4, 0.8]])
    precision, recall = precision_recall_curve(S, np.eye(2, dtype=bool), matching="multi")
    # thresholds 0.9 (T), 0.8 (T), 0.4 (F), 0.2 (F)
    np.testing.assert_allclose(precision, [1, 1, 1, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [0, 1 / 2, 1, 1, 1])
    assert pr_auc(precision, recall) == pytest.approx(1.0)


def test_single_matching_by_hand():
    S = np.array([[0.9, 0.1, 0.3, 0.1],
                  [0.2, 0.7, 0.6, 0.95],
                  [0.1, 0.5, 0.2, 0.3]])
    gt = np.zeros((3, 4), dtype=bool)
    gt[[0, 1, 2], [0, 1, 2]] = True  # query 3 has no true match anywhere
    # best matches: q0 -> db0 0.9 (T), q1 -> db1 0.7 (T), q2 -> db1 0.6 (F)
    precision, recall = precision_recall_curve(S[:, :3], gt[:, :3])
    np.testing.assert_allclose(precision, [1, 1, 1, 2 / 3])
    np.testing.assert_allclose(recall, [0, 1 / 3, 2 / 3, 2 / 3])
    assert pr_auc(precision, recall) == pytest.approx(2 / 3)
    assert recall_at_100_precision(S[:, :3], gt[:, :3]) == pytest.approx(2 / 3)
    # q3 -> db1 0.95 (F) comes first; the denominator stays 3 queries with a true match
    precision, recall = precision_recall_curve(S, gt)
    np.testing.assert_allclose(precision, [1, 0, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [0, 0, 1 / 3, 2 / 3, 2 / 3])
    assert recall_at_100_precision(S, gt) == 0.0
    # trapezoids (0, 1)-(0, 0): 0; then 1/3 * (0 + 1/2) / 2 and 1/3 * (1/2 + 2/3) / 2; then 0
    assert pr_auc(precision, recall) == pytest.approx(1 / 12 + 7 / 36)


def test_soft_but_not_hard_entries_are_ignored():
    S = np.array([[0.9], [0.5], [0.3]])
    hard = np.array([[False], [True], [False]])
    soft = np.array([[True], [True], [False]])
    # without the soft ground truth the best match (db0) is false
    assert recall_at_100_precision(S, hard) == 0.0
    precision, recall = precision_recall_curve(S, hard, soft)
    np.testing.assert_allclose(precision, [1, 1])  # db0 is skipped: db1 is the best match
    np.testing.assert_allclose(recall, [0, 1])
    precision, recall = precision_recall_curve(S, hard, soft, matching="multi")
    np.testing.assert_allclose(precision, [1, 1, 1 / 2])  # 0.9 is never counted
    np.testing.assert_allclose(recall, [0, 1, 1])


def test_equal_scores_are_one_threshold():
    S = np.array([[0.5, 0.5], [0.5, 0.1]])
    precision, recall = precision_recall_curve(S, np.eye(2, dtype=bool), matching="multi")
    np.testing.assert_allclose(precision, [1, 1 / 3, 1 / 2])  # 0.5: one true, two false
    np.testing.assert_allclose(recall, [0, 1 / 2, 1])


def test_errors():
    with pytest.raises(ValueError, match="matching"):
        precision_recall_curve(np.eye(2), np.eye(2, dtype=bool), matching="best")
    with pytest.raises(ValueError, match="shape"):
        precision_recall_curve(np.eye(2), np.eye(3, dtype=bool))
    with pytest.raises(ValueError, match="no hard positive"):
        precision_recall_curve(np.eye(2), np.zeros((2, 2), dtype=bool))


def brute_force_pr(S, hard, soft, matching):
    """Precision and recall by explicit loops over every threshold, entry and query."""
    num_db, num_q = S.shape
    if matching == "single":
        matches = []  # (score, correct) of each query's best non-ignored match
        for j in range(num_q):
            best = None
            for i in range(num_db):
                if soft[i, j] and not hard[i, j]:
                    continue
                if best is None or S[i, j] > S[best, j]:
                    best = i
            if best is not None:
                matches.append((S[best, j], hard[best, j]))
        num_pos = sum(hard[:, j].any() for j in range(num_q))
    else:
        matches = [(S[i, j], hard[i, j]) for i in range(num_db) for j in range(num_q)
                   if not (soft[i, j] and not hard[i, j])]
        num_pos = hard.sum()
    precision, recall = [1.0], [0.0]
    for t in sorted({s for s, _ in matches}, reverse=True):
        tp = sum(1 for s, c in matches if s >= t and c)
        fp = sum(1 for s, c in matches if s >= t and not c)
        precision.append(tp / (tp + fp))
        recall.append(tp / num_pos)
    return np.array(precision), np.array(recall)


@pytest.mark.parametrize("matching", ["single", "multi"])
@pytest.mark.parametrize("seed", range(4))
def test_against_brute_force(matching, seed):
    rng = np.random.default_rng(seed)
    S = rng.integers(0, 12, size=(9, 7)) / 10  # many ties
    hard = rng.random((9, 7)) < 0.2
    soft = hard | (rng.random((9, 7)) < 0.2)
    precision, recall = precision_recall_curve(S, hard, soft, matching)
    expected_p, expected_r = brute_force_pr(S, hard, soft, matching)
    np.testing.assert_allclose(precision, expected_p)
    np.testing.assert_allclose(recall, expected_r)
    auc = sum((expected_r[i + 1] - expected_r[i]) * (expected_p[i + 1] + expected_p[i]) / 2
              for i in range(len(expected_r) - 1))
    assert pr_auc(precision, recall) == pytest.approx(auc)
    at_one = [r for p, r in zip(expected_p, expected_r) if p == 1]
    assert recall_at_100_precision(S, hard, soft, matching) == pytest.approx(max(at_one))
    assert recall[0] == 0 and precision[0] == 1 and np.all(np.diff(recall) >= 0)


def test_best_matches_skip_soft_entries():
    S = np.array([[0.9, 0.2, 0.4], [0.5, 0.2, 0.1]])
    hard = np.array([[False, False, False], [True, True, False]])
    soft = np.array([[True, False, True], [True, True, True]])
    best, score, correct = best_matches(S, hard, soft)
    np.testing.assert_array_equal(best, [1, 0, -1])  # query 1: a tie goes to index 0
    np.testing.assert_array_equal(score, [0.5, 0.2, -np.inf])
    np.testing.assert_array_equal(correct, [True, False, False])
