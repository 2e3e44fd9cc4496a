"""`train.estimate_run` and the `tiny-imagenet` preset."""

import math
import warnings

import pytest

from netvlad_tutorial.config import PRESETS, TrainConfig
from netvlad_tutorial.model import build_model
from netvlad_tutorial.train import estimate_run


def test_estimate_run_closed_form(capsys):
    config = TrainConfig(num_clusters=8, cache_refresh=100, n_neg=10, epochs=3)
    est = estimate_run(config, num_db=1000, num_q=250)
    # 250 queries, refreshed before queries 0, 100, 200: 3 passes over 1000 + 250 images.
    assert est["refreshes_per_epoch"] == 3
    assert est["cache_images_per_epoch"] == 3 * 1250
    assert est["train_images_per_epoch"] == 250 * 12  # query + positive + 10 negatives
    assert est["images_total"] == 3 * (3750 + 3000)
    assert est["descriptor_dim"] == 8 * 512
    assert est["cache_bytes_float16"] == 1250 * 4096 * 2 == est["disk_bytes"]
    assert est["cache_bytes_float32"] == 2 * est["cache_bytes_float16"]
    assert "3 cache refreshes" in capsys.readouterr().out


def test_estimate_run_pitts250k_and_max_queries():
    # The pitts250k preset shares the pools; the reference draws are one setting away.
    assert PRESETS["pitts250k"].negative_pool == "shared"
    assert PRESETS["pitts30k"].negative_pool == "query"
    est = estimate_run(PRESETS["pitts250k"].replace(negative_pool="query"), 91_464, 7_824,
                       verbose=False)
    assert est["refreshes_per_epoch"] == math.ceil(7_824 / 1000) == 8
    assert est["cache_bytes_float16"] == 99_288 * 32_768 * 2  # 6.06 GiB
    capped = estimate_run(PRESETS["pitts250k"].replace(max_queries=1500), 91_464, 7_824,
                          verbose=False)
    assert capped["queries_per_epoch"] == 1500 and capped["refreshes_per_epoch"] == 2
    # Mining reads 1,000 sampled + 10 cached rows of 64 KiB per query; a shared pool of
    # 1,050 rows is read once per 32 queries.
    assert est["mining_bytes_per_epoch"] == 7_824 * 1_010 * 32_768 * 2  # 482 GiB
    shared = estimate_run(PRESETS["pitts250k"], 91_464, 7_824, verbose=False)
    assert shared["mining_bytes_per_epoch"] == round(7_824 * (1_050 / 32 + 10) * 32_768 * 2)


def test_tiny_imagenet_preset_without_the_file_warns_and_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: no ImageNet file
    config = PRESETS["tiny-imagenet"]
    tiny = PRESETS["tiny-random"]
    assert (config.weights, config.trainable, config.lr) == ("imagenet", "conv5", 1e-3)
    # The same city settings and batch; tiny-random trains NetVLAD alone, at its own rate.
    assert config.replace(weights=None, trainable="netvlad", lr=1e-2) == tiny
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = build_model(num_clusters=config.num_clusters, weights=config.weights,
                            trainable=config.trainable)
    assert any("not found" in str(w.message) for w in record)
    assert model.encoder.weights_source == "random"
    trainable = [name for name, p in model.encoder.named_parameters() if p.requires_grad]
    assert trainable == [f"{i}.{t}" for i in (24, 26, 28) for t in ("weight", "bias")]


def test_cli_preset_choices_follow_presets():
    from netvlad_tutorial.cli import build_parser

    args = build_parser().parse_args(["train", "--data-root", "x", "--out", "y",
                                      "--preset", "tiny-imagenet"])
    assert args.preset == "tiny-imagenet"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--data-root", "x", "--preset", "nope"])
