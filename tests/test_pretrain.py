"""Pretraining on the synthetic world: apart from every city, BatchNorm folded, resumable."""

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from netvlad_tutorial import synthetic, world
from netvlad_tutorial.backbone import build_encoder
from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.config import apply_settings, setting_text
from netvlad_tutorial.pretrain import (
    ENCODER_FILE,
    PretrainConfig,
    PretrainNet,
    fold_batchnorm,
    learning_rate,
    pretrain,
    recipe,
)

MICRO = dict(steps=4, batch_size=2, image_size=(32, 48), val_views=4, chunk_steps=2,
             streets_per_chunk=2, save_every=2, log_every=2, precision="fp32", device="cpu")


def _first_draw(rng):
    return int(rng.integers(2 ** 63))


def test_no_world_stream_is_a_city_stream():
    """A city draws from `default_rng([seed, i])` (i = 0: its styles, 1-3: its splits; see
    `synthetic._write_city`); the world from `[WORLD_TAG, seed, ...]`. For every city seed below
    10,000 the first draw of each city stream differs from that of every world stream the
    pretraining recipe uses (styles, the streets of the first chunks, the first batches)."""
    assert world.WORLD_TAG >= 10_000
    ours = {_first_draw(world.world_rng(0, 0))}
    ours |= {_first_draw(world.world_rng(0, 1, k)) for k in range(256)}
    ours |= {_first_draw(world.world_rng(0, 2, step)) for step in range(256)}
    assert len(ours) == 513
    for seed in range(10_000):
        for i in range(4):
            assert _first_draw(np.random.default_rng([seed, i])) not in ours, (seed, i)


def test_world_styles_differ_from_city_styles():
    """No facade style of the world equals one of a city's library (the first 300 seeds; each
    library takes ~1 ms)."""
    ours = set(world.world_styles(0))
    assert len(ours) == world.NUM_STYLES
    for seed in range(300):
        assert not ours.intersection(synthetic.make_styles(np.random.default_rng([seed, 0])))


def test_world_batches_are_labelled_and_deterministic():
    styles = world.world_styles(0)
    streets = [world.world_street(0, i, styles, world.facade_ppm((32, 48))) for i in range(2)]
    images, labels = world.world_batch(0, (5,), streets, (32, 48), 6)
    again, labels_again = world.world_batch(0, (5,), streets, (32, 48), 6)
    assert images.shape == (6, 32, 48, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    sides = {label for _, pair in streets for label in pair}
    assert set(labels[:, 0]) <= sides  # the style label is one of the two rows' styles
    assert labels[:, 1].max() < len(world.SKY_NAMES)
    other, _ = world.world_batch(0, (6,), streets, (32, 48), 6)
    assert not np.array_equal(images, other)


def test_a_row_of_a_world_street_has_one_style():
    """The label is clean: every building of a row is drawn from the one style of its side."""
    styles = world.world_styles(0)
    _, (left, right) = world.world_street(0, 3, styles, 16.0)
    assert left != right
    calls = []
    original = synthetic._draw_building

    def spy(canvas, rng, style, x0, x1):
        calls.append(style)
        return original(canvas, rng, style, x0, x1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "_draw_building", spy)
        world.world_street(0, 3, styles, 16.0)
    assert set(calls) == {styles[left], styles[right]}


def test_folded_encoder_equals_the_batchnorm_network_in_eval_mode():
    net = PretrainNet(seed=1)
    gen = torch.Generator().manual_seed(0)
    for m in net.encoder:  # BatchNorms with non-trivial statistics and affine maps
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    net.eval()
    x = torch.randn(2, 3, 32, 48, generator=gen)
    plain = fold_batchnorm(net.encoder)
    with torch.no_grad():
        expected, got = net.encoder(x), plain(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The folded encoder is plain VGG16: torchvision's features[:-2] takes its state dict.
    reference = torchvision.models.vgg16(weights=None).features[:-2]
    reference.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reference(x), expected, rtol=1e-4, atol=1e-4)


def test_schedule_warms_up_then_decays_to_zero():
    c = PretrainConfig(steps=1000, warmup=100, lr=0.1)
    assert learning_rate(c, 0) == pytest.approx(0.001)
    assert learning_rate(c, 99) == pytest.approx(0.1)
    assert learning_rate(c, 550) == pytest.approx(0.05)
    assert learning_rate(c, 1000) == pytest.approx(0.0, abs=1e-12)


def test_pretraining_resumes_to_the_same_weights_and_exports_plain_vgg16(tmp_path):
    """An interrupted run resumes to the uninterrupted one's weights; the command line runs
    it and records a command that, read back with `apply_settings`, is the recipe it ran."""
    config = PretrainConfig(**MICRO)
    settings = [f"{k}={setting_text(v)}" for k, v in MICRO.items()
                if k not in ("precision", "device")]
    argv = ["pretrain", "--out", str(tmp_path / "whole"), "--fp32", "--device", "cpu"]
    cli_main(argv + [a for s in settings for a in ("--set", s)])
    whole = tmp_path / "whole" / ENCODER_FILE
    prov = json.loads((tmp_path / "whole" / "provenance.json").read_text())
    words = prov["command"].split()
    assert words[:4] == ["python", "-m", "netvlad_tutorial", "pretrain"]
    assert words[4::2] == ["--set"] * len(words[5::2])
    assert recipe(apply_settings(PretrainConfig(), words[5::2])) == prov["recipe"]
    assert prov["recipe"] == recipe(config) and len(prov["sha256"]) == 64
    with pytest.raises(SystemExit) as exit_info:  # a bad setting is exit 2, naming it
        cli_main(argv + ["--overwrite", "--set", "steps=0"])
    assert exit_info.value.code == 2
    assert pretrain(config, tmp_path / "parts", max_steps=1) is None  # interrupted after step 1
    assert pretrain(config, tmp_path / "parts", max_steps=3, resume=True) is None
    parts = pretrain(config, tmp_path / "parts", resume=True)
    a, b = torch.load(whole), torch.load(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values())
    log = [json.loads(row) for row in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert log == [json.loads(line) | {"seconds": row["seconds"]} for line, row in zip(
        (tmp_path / "whole" / "log.jsonl").read_text().splitlines(), log, strict=True)]
    assert [row["step"] for row in log] == [2, 4]
    encoder = build_encoder(tmp_path / "whole" / ENCODER_FILE)
    assert encoder.weights_source.endswith(ENCODER_FILE)


def test_pretraining_refuses_a_folder_with_another_run_or_recipe(tmp_path):
    config = PretrainConfig(**MICRO)
    pretrain(config, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="already holds a pretraining run"):
        pretrain(config, tmp_path)
    with pytest.raises(ValueError, match="another recipe.*lr"):
        pretrain(config.__class__(**{**MICRO, "lr": 0.5}), tmp_path, resume=True)

