"""The scale benchmark (`benchmarks/scale.py`) at a small scale: its variants mine the same
tuples as the reference draws where they should, and report what they measured."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale as scale_bench  # noqa: E402  (benchmarks/scale.py)

SCALE = 0.02  # 1,824 database rows (76 places of 24 views), 156 queries


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    return scale_bench.run_train("float16-ram-1worker", SCALE, tmp_path_factory.mktemp("one"), 0)


@pytest.mark.parametrize("variant", ["float16-ram", "float16-ram-shared", "float16-disk-shared"])
def test_variants_mine_every_query_and_report_their_figures(variant, tmp_path, one_at_a_time):
    one = one_at_a_time
    out = scale_bench.run_train(variant, SCALE, tmp_path, 0)
    assert out["num_db"] == 24 * (round(91_464 * SCALE) // 24)
    assert out["mined_queries"] == out["num_queries"]  # every query with a training positive
    assert out["num_q"] == round(7_824 * SCALE) >= out["num_queries"] > 140
    assert out["tuples"] + out["skipped"] == out["num_queries"] > 0
    assert out["negative_pool"] == scale_bench.VARIANTS[variant][4]
    assert (out["disk_gib"] > 0) == ("disk" in variant)
    if variant == "float16-ram":  # threads across queries: the tuples of one query at a time
        assert (out["tuples"], out["skipped"]) == (one["tuples"], one["skipped"])
    for key in ("peak_rss_gib", "mine_s", "fill_s"):
        assert out[key] > 0
