"""`evaluate --per-query`: one row per query, and the paired test of two models from two files."""

import csv

import numpy as np
import pytest
import torch

from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.config import PRESETS
from netvlad_tutorial.data import load_split
from netvlad_tutorial.evaluate import (
    RECALL_VALUES,
    encode_split,
    evaluate_split,
    paired_from_csv,
    read_per_query,
)
from netvlad_tutorial.model import make_model


def _config(city):
    return PRESETS["tiny-random"].replace(
        data_root=str(city), image_size=(32, 48), num_clusters=4, kmeans_images=20,
        kmeans_per_image=4, kmeans_iters=10, precision="fp32", device="cpu")


def test_per_query_rows_are_a_brute_force_ranking(micro_city, tmp_path):
    config = _config(micro_city)
    split = load_split(micro_city, "val")
    model = make_model(config, load_split(micro_city, "train"), torch.device("cpu"))
    path = tmp_path / "val.csv"
    recalls = evaluate_split(model, split, config, "cpu", stored=False, per_query=path)
    db_desc, q_desc = encode_split(model, split, config, "cpu", stored=False)
    db, top_n = split.db, max(RECALL_VALUES)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["query"] for r in rows] == list(db.qImage)
    for i, row in enumerate(rows):  # by hand: every distance, sorted, the first positive
        d = [float(np.sum((q_desc[i].astype(np.float32) - x.astype(np.float32)) ** 2))
             for x in db_desc]
        order = sorted(range(len(d)), key=lambda j: (d[j], j))[:top_n]
        near = [j for j in order if np.hypot(*(db.utmQ[i] - db.utmDb[j])) < db.posDistThr]
        expected = str(order.index(near[0]) + 1) if near else ""
        assert row["first_correct_rank"] == expected, i
        assert row["top"].split(";") == [db.dbImage[j] for j in order], i
    _, ranks = read_per_query(path)
    assert {n: float(np.mean(ranks <= n)) for n in RECALL_VALUES} == recalls


def _write(path, rows):
    path.write_text("query,first_correct_rank,top\n" + "".join(
        f"{q},{r},a.jpg;b.jpg\n" for q, r in rows))


def test_paired_outcomes_from_two_files(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write(a, [("q0", 1), ("q1", ""), ("q2", 3), ("q3", 1), ("q4", "")])
    _write(b, [("q0", 2), ("q1", 1), ("q2", 1), ("q3", ""), ("q4", 7)])
    r1 = paired_from_csv(a, b, 1)  # R@1: q0 broken, q1 fixed, q2 fixed, q3 broken
    assert (r1.fixed.tolist(), r1.broken.tolist(), r1.both.tolist()) == ([1, 2], [0, 3], [])
    assert r1.p_value == pytest.approx(1.0)
    r5 = paired_from_csv(a, b, 5)  # R@5: q1 fixed, q3 broken; q0, q2 both
    assert (r5.fixed.tolist(), r5.broken.tolist(), r5.both.tolist()) == ([1], [3], [0, 2])
    _write(b, [("q0", 2), ("qX", 1), ("q2", 1), ("q3", ""), ("q4", 7)])
    with pytest.raises(ValueError, match="same queries"):
        paired_from_csv(a, b, 1)
    a.write_text("name,rank\nq0,1\n")
    with pytest.raises(ValueError, match="not a per-query file"):
        read_per_query(a)


def test_evaluate_command_writes_the_file(micro_city, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "micro-test", _config(micro_city))  # k-means in a second
    path = tmp_path / "untrained.csv"
    cli_main(["evaluate", "--data-root", str(micro_city), "--split", "val", "--untrained",
              "--preset", "micro-test", "--fp32", "--per-query", str(path), "--json"])
    names, ranks = read_per_query(path)
    assert names == load_split(micro_city, "val").db.qImage and len(ranks) == len(names)
