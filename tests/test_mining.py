"""Mining, triplet images and the triplet loss against hand-built cases and plain loops."""

import numpy as np
import pytest
import torch
from oracles import brute_force_mine, brute_positives
from PIL import Image
from torch import nn

from netvlad_tutorial.data import NegativeSampler
from netvlad_tutorial.dbstruct import DbStruct
from netvlad_tutorial.mining import (
    MinedTuple,
    NegativeCache,
    TripletDataset,
    collate_fn,
    mine_triplets,
    mine_tuple,
    triplet_loss,
)

MARGIN = 0.1


def _db(utm_db, utm_q):
    """A small DbStruct with the Pittsburgh thresholds (25 m, 10 m for training positives)."""
    utm_db, utm_q = np.asarray(utm_db, dtype=np.float64), np.asarray(utm_q, dtype=np.float64)
    return DbStruct("train", "handmade", [f"db/{i:03d}_0.png" for i in range(len(utm_db))],
                    utm_db, [f"{i:03d}_0.png" for i in range(len(utm_q))], utm_q,
                    len(utm_db), len(utm_q), 25, 625, 100)


def _geo_dist(db, q):
    return np.linalg.norm(db.utmDb - db.utmQ[q], axis=1)


def _hand_built():
    """Query 0 at the origin; descriptors placed at chosen distances from the query's.

    Database 0-2: within 10 m (descriptor distances 0.5, 0.3, 0.4: the best positive is 1);
    3-4: 15 m and 20 m, neither positive nor negative, but nearest in descriptor space (0.1);
    5-14: beyond 25 m, at descriptor distances 0.2, 0.45, 0.6 (violating: below 0.3 + 0.316)
    and 0.7 ... 1.3 (not violating).
    """
    utm_db = [[2, 0], [0, 5], [-8, 0], [15, 0], [0, -20]] + [[30 + 10 * i, 30] for i in range(10)]
    db = _db(utm_db, [[0, 0]])
    d_desc = [0.5, 0.3, 0.4, 0.1, 0.1, 0.6, 0.2, 0.45] + [0.7 + 0.1 * i for i in range(7)]
    dim = len(d_desc) + 1
    q_desc = np.zeros((1, dim), dtype=np.float32)
    q_desc[0, 0] = 1
    db_desc = np.repeat(q_desc, len(d_desc), axis=0)
    db_desc[np.arange(len(d_desc)), 1 + np.arange(len(d_desc))] = d_desc  # own direction each
    return db, q_desc, db_desc.astype(np.float16)


def test_hand_built_case():
    db, q_desc, db_desc = _hand_built()
    positives = brute_positives(db, 10)
    assert positives[0].tolist() == [0, 1, 2]
    t = mine_tuple(0, q_desc[0], db_desc, positives[0], NegativeSampler(db),
                   np.random.default_rng(0), n_neg_sample=10, n_neg=2, margin=MARGIN)
    assert t.positive == 1 and t.d_pos == pytest.approx(0.3, abs=1e-3)
    assert t.negatives.tolist() == [6, 7]  # 0.2 and 0.45; 0.6 violates too but n_neg = 2
    np.testing.assert_allclose(t.d_negs, [0.2, 0.45], atol=1e-3)
    assert sorted(t.sampled.tolist()) == list(range(5, 15))
    t3 = mine_tuple(0, q_desc[0], db_desc, positives[0], NegativeSampler(db),
                    np.random.default_rng(0), n_neg_sample=10, n_neg=10, margin=MARGIN)
    assert t3.negatives.tolist() == [6, 7, 5]
    # The same from torch tensors (e.g. a cache kept on the GPU).
    t_torch = mine_tuple(0, torch.from_numpy(q_desc[0]), torch.from_numpy(db_desc), positives[0],
                         NegativeSampler(db), np.random.default_rng(0), n_neg_sample=10,
                         n_neg=10, margin=MARGIN)
    assert t_torch.positive == 1 and t_torch.negatives.tolist() == [6, 7, 5]


def _random_city(num_db=300, num_q=40, dim=32, seed=0):
    """Random places on a 300 m square; random normalized float16 descriptors."""
    rng = np.random.default_rng(seed)
    utm_db = rng.uniform(0, 300, size=(num_db, 2))
    utm_q = utm_db[rng.choice(num_db, num_q, replace=False)] + rng.normal(0, 3, (num_q, 2))
    db = _db(utm_db, utm_q)
    desc = rng.normal(size=(num_db + num_q, dim))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    desc = desc.astype(np.float16)
    return db, desc[num_q:], desc[:num_q]


@pytest.mark.parametrize("n_neg_dist,n_neg,margin", [(100, 10, 0.1), (5, 3, 0.5), (50, 10, 1.0)])
def test_mine_triplets_matches_brute_force(n_neg_dist, n_neg, margin):
    db, db_desc, q_desc = _random_city()
    positives = brute_positives(db, 10)
    queries = [q for q in range(db.numQ) if len(positives[q])]
    sampler, cache = NegativeSampler(db), NegativeCache(db.numQ, n_neg)
    rng, rng_copy = np.random.default_rng(7), np.random.default_rng(7)
    tuples, skipped = mine_triplets(queries, q_desc, db_desc, positives, sampler, rng, cache,
                                    n_neg_sample=40, n_neg_dist=n_neg_dist, n_neg=n_neg,
                                    margin=margin)
    assert len(tuples) + skipped == len(queries) and len(tuples) > 0
    by_query = {t.query: t for t in tuples}
    for q in queries:
        sampled = sampler.sample(q, 40, rng_copy)  # the same draws, in the same order
        assert np.all(_geo_dist(db, q)[sampled] > 25)
        positive, negatives = brute_force_mine(q_desc[q].astype(np.float64), db_desc,
                                                positives[q], sampled, n_neg_dist, n_neg, margin)
        if not negatives:
            assert q not in by_query and np.all(cache.negatives[q] == -1)
            continue
        t = by_query[q]
        assert t.positive == positive and t.negatives.tolist() == negatives
        np.testing.assert_array_equal(t.sampled, sampled)
        assert np.all(_geo_dist(db, q)[t.negatives] > 25)
        assert cache[q].tolist() == negatives  # the cache holds the new negatives
        d_pos = np.linalg.norm(db_desc[positives[q]].astype(np.float64) - q_desc[q], axis=1)
        assert t.d_pos == pytest.approx(d_pos.min(), abs=1e-4)
        assert np.all(t.d_negs < t.d_pos + margin ** 0.5) and np.all(np.diff(t.d_negs) >= 0)


class FixedSampler:
    """A stand-in sampler that always draws the same database indices."""

    def __init__(self, indices):
        self.indices = np.asarray(indices)

    def sample(self, q, n, rng):
        return self.indices[:n]


def test_cached_negative_is_picked_even_if_not_sampled():
    db, q_desc, db_desc = _hand_built()
    positives = brute_positives(db, 10)
    sampler = FixedSampler([9, 10, 11])  # descriptor distances 0.8, 0.9, 1.0: none violates
    cache = NegativeCache(db.numQ, n_neg=10)
    tuples, skipped = mine_triplets([0], q_desc, db_desc, positives, sampler, None, cache,
                                    margin=MARGIN)
    assert tuples == [] and skipped == 1 and len(cache[0]) == 0
    cache.update(0, [6, 12])  # 0.2 (violating) and 1.1, chosen last time
    tuples, skipped = mine_triplets([0], q_desc, db_desc, positives, sampler, None, cache,
                                    margin=MARGIN)
    assert skipped == 0 and tuples[0].negatives.tolist() == [6]
    assert 6 not in tuples[0].sampled and cache[0].tolist() == [6]


def test_negative_cache_state_dict_round_trip():
    cache = NegativeCache(4, n_neg=3)
    cache.update(1, [5, 7])
    cache.update(3, [1, 2, 3])
    state = cache.state_dict()
    assert state["negatives"].tolist() == [[-1] * 3, [5, 7, -1], [-1] * 3, [1, 2, 3]]
    restored = NegativeCache(4, n_neg=3)
    restored.load_state_dict(state)
    cache.update(1, [])  # the state dict is a copy
    assert restored[1].tolist() == [5, 7] and restored[3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="does not fit"):
        NegativeCache(5, n_neg=3).load_state_dict(state)


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def test_triplet_dataset_and_collate(tmp_path):
    db = _db([[0, 0]] * 6, [[0, 0]] * 2)
    colors = {}
    for i, name in enumerate(db.dbImage):
        colors[name] = (10 * i, 0, 0)
    for i, name in enumerate(db.qImage):
        colors["queries_real/" + name] = (0, 10 * i, 0)
    for name, color in colors.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 4), color).save(tmp_path / name)
    tuples = [MinedTuple(1, 2, np.array([5, 3, 4]), 0.1, None, None),
              MinedTuple(0, 0, np.array([1]), 0.1, None, None)]
    data = TripletDataset(tmp_path, db, tuples, transform=_to_tensor)
    query, positive, negatives, i = data[0]
    assert i == 0 and negatives.shape == (3, 3, 4, 5)
    assert query[1, 0, 0] == 10 and positive[0, 0, 0] == 20
    assert negatives[:, 0, 0, 0].tolist() == [50, 30, 40]
    q, p, n, counts, indices = collate_fn([data[0], data[1]])
    assert q.shape == p.shape == (2, 3, 4, 5) and n.shape == (4, 3, 4, 5)
    assert counts.dtype == torch.long and counts.tolist() == [3, 1] and indices == [0, 1]
    assert n[:, 0, 0, 0].tolist() == [50, 30, 40, 10]
    with pytest.raises(ValueError, match="at least one negative"):
        TripletDataset(tmp_path, db, [tuples[0]._replace(negatives=np.array([]))])
    (tmp_path / db.dbImage[5]).unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        data[0]


def test_triplet_loss_matches_loop_of_triplet_margin_loss():
    torch.manual_seed(0)
    counts = torch.tensor([3, 1, 2])
    q = torch.randn(3, 8, requires_grad=True)
    p, negs = torch.randn(3, 8), torch.randn(6, 8)
    # Put some triplets inside the margin so that both branches of the hinge are exercised.
    negs = negs.clone()
    negs[0] = q.detach()[0] + 0.01
    criterion = nn.TripletMarginLoss(margin=0.1 ** 0.5, p=2, reduction="sum")
    expected, j = 0.0, 0
    for i, count in enumerate(counts.tolist()):
        for _ in range(count):
            expected = expected + criterion(q[i:i + 1], p[i:i + 1], negs[j:j + 1])
            j += 1
    expected = expected / 6
    loss = triplet_loss(q, p, negs, counts)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, q)
    (expected_grad,) = torch.autograd.grad(expected, q)
    torch.testing.assert_close(grad, expected_grad)
