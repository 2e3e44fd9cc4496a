"""The mining benchmark (`benchmarks/mining.py`): Pitts250k-shaped positions and both ways to
get negatives (`lessons.compare_negative_memory`), at a small scale."""

import sys
from pathlib import Path

import numpy as np

from netvlad_tutorial.lessons import (
    compare_negative_memory,
    format_negative_memory,
    project_negatives,
    seed_negative_lists,
)
from netvlad_tutorial.synthetic import PITTS250K_TRAIN, VIEWS_PER_PLACE, pitts_like_struct

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mining as mining_bench  # noqa: E402  (benchmarks/mining.py)


def test_pitts_like_struct_shape():
    db = pitts_like_struct(scale=0.05, seed=1)
    assert db.numDb == len(db.dbImage) == len(db.utmDb) == 91_464 * 5 // 100 // 24 * 24
    assert db.numQ == len(db.qImage) == round(7_824 * 0.05)
    assert PITTS250K_TRAIN == (91_464, 7_824)
    views = db.utmDb.reshape(-1, VIEWS_PER_PLACE, 2)
    assert (views == views[:, :1]).all()  # 24 views per place, one position
    d = np.linalg.norm(db.utmQ[:, None] - db.utmDb[None, ::VIEWS_PER_PLACE], axis=2)
    assert np.median(d.min(axis=1)) < 10  # queries are near places


def test_both_approaches_agree_on_positives_and_negatives():
    db = pitts_like_struct(scale=0.01, seed=2)
    seed_pos, seed_train, seed_neg = seed_negative_lists(db)
    pos, train, sampler = project_negatives(db)
    rng = np.random.default_rng(0)
    for q in range(db.numQ):
        assert set(pos[q].tolist()) == set(seed_pos[q].tolist())
        assert set(train[q].tolist()) == set(seed_train[q].tolist())
        assert sampler.count(q) == len(seed_neg[q])
        assert set(sampler.sample(q, 20, rng).tolist()) <= set(seed_neg[q].tolist())


def test_compare_negative_memory_measures_both_ways():
    db = pitts_like_struct(0.01)
    result = compare_negative_memory(db, num_sample_queries=20)
    (seed_name, _, seed_mib), (project_name, _, project_mib) = result["rows"]
    assert "setdiff1d" in seed_name and "NegativeSampler" in project_name
    # The seed's lists hold numQ x (numDb - positives) int64 at least; the sampler far less.
    lists_mib = sum(n.nbytes for n in seed_negative_lists(db)[2]) / 2**20
    assert seed_mib >= lists_mib > project_mib
    assert (result["num_db"], result["num_q"]) == (db.numDb, db.numQ)
    text = format_negative_memory(result)
    assert seed_name in text and project_name in text
    assert "reference" not in text  # every figure printed is measured in this run


def test_the_script_measures_the_scale_asked(monkeypatch, capsys):
    calls = []

    def fake(db, seed):
        calls.append((db.numDb, seed))
        return {"num_db": 24, "num_q": 2, "rows": [("a", 1.0, 2048.0), ("b", 0.5, 3.0)],
                "sample_us": 7.0, "n_neg_sample": 5}

    monkeypatch.setattr(mining_bench, "compare_negative_memory", fake)
    mining_bench.main(["--scale", "0.5", "--seed", "3"])
    assert calls == [(pitts_like_struct(0.5, 3).numDb, 3)]
    out = capsys.readouterr().out
    assert "2.00 GiB" in out and "3.0 MiB" in out and "7 us" in out
