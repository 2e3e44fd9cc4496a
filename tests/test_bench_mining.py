"""The mining benchmark: Pitts250k-shaped positions and both approaches, at a small scale."""

import numpy as np

from netvlad_tutorial import bench
from netvlad_tutorial.bench import (
    VIEWS_PER_PLACE,
    bench_mining,
    format_mining,
    main,
    pitts_like_struct,
    project_structures,
    seed_structures,
)


def test_pitts_like_struct_shape():
    db = pitts_like_struct(scale=0.05, seed=1)
    assert db.numDb == len(db.dbImage) == len(db.utmDb) == 91_464 * 5 // 100 // 24 * 24
    assert db.numQ == len(db.qImage) == round(7_824 * 0.05)
    views = db.utmDb.reshape(-1, VIEWS_PER_PLACE, 2)
    assert (views == views[:, :1]).all()  # 24 views per place, one position
    d = np.linalg.norm(db.utmQ[:, None] - db.utmDb[None, ::VIEWS_PER_PLACE], axis=2)
    assert np.median(d.min(axis=1)) < 10  # queries are near places


def test_both_approaches_agree_on_positives_and_negatives():
    db = pitts_like_struct(scale=0.01, seed=2)
    seed_pos, seed_train, seed_neg = seed_structures(db)
    pos, train, sampler = project_structures(db)
    rng = np.random.default_rng(0)
    for q in range(db.numQ):
        assert set(pos[q].tolist()) == set(seed_pos[q].tolist())
        assert set(train[q].tolist()) == set(seed_train[q].tolist())
        assert sampler.num_negatives(q) == len(seed_neg[q])
        assert set(sampler.sample(q, 20, rng).tolist()) <= set(seed_neg[q].tolist())


def test_bench_mining_measures_both_ways():
    result = bench_mining(scale=0.01, num_sample_queries=20)
    (seed_name, _, seed_mib), (project_name, _, project_mib) = result["rows"]
    assert "setdiff1d" in seed_name and "NegativeSampler" in project_name
    assert project_mib < seed_mib
    assert result["num_db"] == pitts_like_struct(0.01).numDb
    text = format_mining(result)
    assert seed_name in text and project_name in text


def test_cli_dispatches_mining(monkeypatch, capsys):
    calls = []

    def fake(scale, seed):
        calls.append((scale, seed))
        return {"num_db": 24, "num_q": 2, "rows": [("a", 1.0, 2048.0), ("b", 0.5, 3.0)],
                "sample_us": 7.0, "num_negatives": 5}

    monkeypatch.setattr(bench, "bench_mining", fake)
    main(["mining", "--scale", "0.5", "--seed", "3"])
    assert calls == [(0.5, 3)]
    out = capsys.readouterr().out
    assert "2.00 GiB" in out and "3.0 MiB" in out and "7 us" in out
