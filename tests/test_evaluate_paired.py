"""Reading the results (chance, paired before/after, distances, neighbours) against closed
forms, simulations and brute-force loops."""

from math import comb

import numpy as np
import pytest
import torch

from netvlad_tutorial import evaluate
from netvlad_tutorial.pca import fit_pca_whitening


def _random_case(num_q=30, num_db=50, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(num_q, dim)).astype(np.float32)
    db = rng.normal(size=(num_db, dim)).astype(np.float32)
    sizes = rng.integers(0, 6, size=num_q)
    positives = [rng.choice(num_db, size=s, replace=False) for s in sizes]
    return q, db, positives


def test_chance_recall_closed_form_and_simulation():
    # One positive among 10: R@n = n / 10. No positive: 0. Every image positive: 1.
    assert evaluate.chance_recall([np.array([3])], 10, 4) == pytest.approx(0.4)
    assert evaluate.chance_recall([np.array([], dtype=int)], 10, 4) == 0.0
    assert evaluate.chance_recall([np.arange(10)], 10, 1) == 1.0
    # Monte-Carlo: random rankings of the database, fixed seed.
    rng = np.random.default_rng(0)
    num_db = 40
    positives = [rng.choice(num_db, size=s, replace=False) for s in (0, 1, 3, 7)]
    trials = 20_000
    rankings = rng.permuted(np.tile(np.arange(num_db), (trials, 1)), axis=1)  # (trials, N)
    for n in (1, 5, 20):
        hits = [np.isin(rankings[:, :n], p).any(axis=1).mean() for p in positives]
        # per query, the standard error of 20,000 Bernoulli draws is below 0.0036
        for p, hit in zip(positives, hits):
            assert evaluate.chance_recall([p], num_db, n) == pytest.approx(hit, abs=0.012)
        assert evaluate.chance_recall(positives, num_db, n) == pytest.approx(
            np.mean([evaluate.chance_recall([p], num_db, n) for p in positives]))


def test_paired_outcomes_hand_built():
    positives = [np.array([1]), np.array([2]), np.array([3]), np.array([4])]
    before = np.array([[1, 9], [9, 2], [3, 9], [9, 9]])  # R@1: q0, q2 ; R@2: q0, q1, q2
    after = np.array([[9, 1], [2, 9], [3, 9], [9, 4]])  # R@1: q1, q2 ; R@2: all
    at1 = evaluate.paired_outcomes(before, after, positives, 1)
    assert at1.both.tolist() == [2] and at1.fixed.tolist() == [1]
    assert at1.broken.tolist() == [0] and at1.neither.tolist() == [3]
    np.testing.assert_array_equal(at1.table, [[1, 1], [1, 1]])
    assert at1.p_value == 1.0
    at2 = evaluate.paired_outcomes(before, after, positives, 2)
    assert at2.fixed.tolist() == [3] and len(at2.broken) == 0 and len(at2.both) == 3
    assert at2.p_value == pytest.approx(1.0)  # one discordant pair: 2 · 0.5 capped at 1


def test_paired_outcomes_match_recall():
    q, db, positives = _random_case()
    _, before = evaluate.topk_search(q, db, 5)
    _, after = evaluate.topk_search(q + 0.5 * np.roll(q, 1, axis=0), db, 5)
    for n in (1, 5):
        out = evaluate.paired_outcomes(before, after, positives, n)
        assert out.table.sum() == len(q)
        assert out.before.mean() == pytest.approx(
            evaluate.recall_from_predictions(before, positives, (n,))[n])
        assert out.after.mean() == pytest.approx(
            evaluate.recall_from_predictions(after, positives, (n,))[n])
        # recall after − before = (fixed − broken) / M
        assert out.after.mean() - out.before.mean() == pytest.approx(
            (len(out.fixed) - len(out.broken)) / len(q))


def _mcnemar_brute(b, c):
    """Two-sided exact p: sum of Binomial(b + c, 1/2) terms no more likely than the observed."""
    n = b + c
    if n == 0:
        return 1.0
    pmf = [comb(n, k) / 2 ** n for k in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[b] * (1 + 1e-7)))


def test_mcnemar_exact_closed_forms():
    assert evaluate.mcnemar_exact(5, 0) == pytest.approx(2 * 0.5 ** 5)  # 0.0625
    assert evaluate.mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert evaluate.mcnemar_exact(7, 7) == 1.0
    assert evaluate.mcnemar_exact(0, 0) == 1.0
    # b=1, c=9: 2 · (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert evaluate.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)


@pytest.mark.parametrize("b, c", [(3, 11), (12, 4), (20, 20), (0, 13), (30, 17), (1, 2)])
def test_mcnemar_exact_brute_force(b, c):
    assert evaluate.mcnemar_exact(b, c) == pytest.approx(_mcnemar_brute(b, c), rel=1e-9)


def test_positive_negative_distances_brute_force():
    q, db, positives = _random_case(seed=1)
    positives[0] = np.arange(len(db))  # every image positive: no negative
    d_pos, d_neg = evaluate.positive_negative_distances(q, db, positives)
    for i in range(len(q)):
        dist = [float(np.sqrt(np.sum((db[j].astype(np.float64) - q[i]) ** 2)))
                for j in range(len(db))]
        pos = set(positives[i].tolist())
        near_pos = min((dist[j] for j in pos), default=np.inf)
        near_neg = min((dist[j] for j in range(len(db)) if j not in pos), default=np.inf)
        assert d_pos[i] == pytest.approx(near_pos, abs=1e-4)
        assert d_neg[i] == pytest.approx(near_neg, abs=1e-4)
    assert d_neg[0] == np.inf and np.isinf(d_pos).sum() == sum(len(p) == 0 for p in positives)
    # correct at R@1 exactly when the nearest positive is nearer than the nearest negative
    _, pred = evaluate.topk_search(q, db, 1)
    np.testing.assert_array_equal(d_pos < d_neg, evaluate.hits_at_n(pred, positives, 1))


def test_neighbour_agreement_brute_force():
    rng = np.random.default_rng(2)
    desc = rng.normal(size=(24, 6)).astype(np.float32)
    labels = rng.integers(0, 4, size=24)
    for k in (1, 3):
        same = 0
        for i in range(24):
            dist = [np.sum((desc[j] - desc[i]) ** 2) if j != i else np.inf for j in range(24)]
            same += sum(labels[j] == labels[i] for j in np.argsort(dist, kind="stable")[:k])
        assert evaluate.neighbour_agreement(desc, labels, k) == pytest.approx(same / (24 * k))


def test_whiten_matches_the_formula():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(40, 12)) * np.arange(1, 13)
    desc = rng.normal(size=(5, 12)).astype(np.float16)
    pca = fit_pca_whitening(train, 4)
    out = evaluate.whiten(pca, desc)
    w, b = pca.linear.weight.double().numpy(), pca.linear.bias.double().numpy()
    expected = desc.astype(np.float64) @ w.T + b
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert out.shape == (5, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(out, pca(torch.from_numpy(desc).float()).numpy())
