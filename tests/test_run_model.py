"""A run's decisions, made once: the backbone registry, `RunModel`'s sources, the checked
configuration and `--set`, library errors, and no global state changed behind the caller."""

import builtins
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from netvlad_tutorial import distributed
from netvlad_tutorial import train as tr
from netvlad_tutorial.backbone import BACKBONES, Backbone
from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.config import PRESETS, ArgumentError, TrainConfig
from netvlad_tutorial.data import load_split
from netvlad_tutorial.evaluate import evaluate_checkpoint
from netvlad_tutorial.files import load_torch_file
from netvlad_tutorial.images import input_transform
from netvlad_tutorial.model import build_model, make_model
from netvlad_tutorial.run_model import ImageSource, LocalFeatureSource, RunModel
from netvlad_tutorial.utils import progress_hidden


def _micro_config(city, **changes):
    """The tiny preset shrunk to seconds (as in test_train), fp32."""
    return PRESETS["tiny-random"].replace(
        data_root=str(city), image_size=(32, 48), num_clusters=4, epochs=1, n_neg=2,
        n_neg_sample=20, n_neg_dist=10, cache_refresh=8, kmeans_images=20, kmeans_per_image=4,
        kmeans_iters=10, precision="fp32", lr=1e-2, device="cpu", trainable="netvlad").replace(
        **changes)


def _tiny_cnn():
    """Two stride-2 convolutions and a last block of one: 16 channels at stride 4."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(16, 16, 3, padding=1))


@pytest.fixture
def tiny_backbone(monkeypatch):
    """A second backbone, registered for the test only: one entry of `BACKBONES`."""
    spec = Backbone("tiny_cnn", _tiny_cnn, channels=16, tail=1)
    monkeypatch.setitem(BACKBONES, spec.name, spec)
    return spec


def _brute_recalls(model, split, config, n_values=(1, 5)):
    """Recall@N by hand: each image through `model` alone, all distances, sorted."""
    transform = input_transform(config.image_size)
    db, root = split.db, split.root

    def encode(path):
        with Image.open(path) as img, torch.no_grad():
            return model(transform(img.convert("RGB"))[None])[0].numpy()

    d = np.stack([encode(root / name) for name in db.dbImage])  # (numDb, out_dim)
    q = np.stack([encode(root / split.queries_dir / name) for name in db.qImage])  # (numQ, ...)
    utm_dist = np.linalg.norm(db.utmQ[:, None] - db.utmDb[None], axis=2)  # (numQ, numDb)
    order = np.argsort(np.linalg.norm(q[:, None] - d[None], axis=2), axis=1, kind="stable")
    found = {n: 0 for n in n_values}
    for i in range(len(q)):
        for n in n_values:
            found[n] += bool((utm_dist[i, order[i, :n]] < db.posDistThr).any())
    return {n: found[n] / len(q) for n in n_values}


def test_a_registered_backbone_trains_and_evaluates(micro_city, tmp_path, tiny_backbone):
    config = _micro_config(micro_city, backbone="tiny_cnn", trainable="conv5")
    assert tr.estimate_run(config, 10, 5, verbose=False)["descriptor_dim"] == 4 * 16
    tr.train(config, tmp_path)
    ckpt = load_torch_file(tmp_path / "best.pth")
    assert ckpt["model_config"]["encoder"] == "tiny_cnn" and ckpt["model_config"]["dim"] == 16
    # trainable="conv5" trains the backbone's last block (`tail`) only: the prefix is as built.
    untrained = make_model(config, None, "cpu")
    for name, value in untrained.encoder.state_dict().items():
        trained = ckpt["model"][f"encoder.{name}"]
        assert torch.equal(trained, value) == (not name.startswith("4.")), name
    # evaluate rebuilds the model from the registry; the recall is that of a brute-force search.
    result = evaluate_checkpoint(micro_city, split="val", checkpoint=tmp_path / "best.pth",
                                 device="cpu")
    model = build_model(num_clusters=4, backbone="tiny_cnn")
    model.load_state_dict(ckpt["model"])
    expected = _brute_recalls(model.eval(), load_split(micro_city, "val"), config)
    assert result["dim"] == 64
    assert result["recall@1"] == pytest.approx(expected[1])
    assert result["recall@5"] == pytest.approx(expected[5])


def test_sources_give_the_same_descriptors(micro_city, tiny_backbone):
    config = _micro_config(micro_city, backbone="tiny_cnn")
    split = load_split(micro_city, "train")
    run = RunModel.build(config, split, "cpu")
    assert isinstance(run.source, LocalFeatureSource)  # frozen encoder: local features
    assert run.trainable is run.trainable  # built once
    plain = RunModel(run.model, config, "cpu", source=ImageSource)
    assert plain.precision == run.precision
    cached = run.encode_split(split, "train").astype(np.float32)
    images = plain.encode_split(split, "train").astype(np.float32)
    assert cached.shape == images.shape == (split.db.numDb + split.db.numQ, 4 * 16)
    np.testing.assert_allclose(cached, images, atol=2e-3)  # float16 storage
    trains = RunModel(make_model(config.replace(trainable="all"), split, "cpu"), config, "cpu")
    assert isinstance(trains.source, ImageSource)  # a trainable encoder: the images
    off = RunModel(run.model, config.replace(feature_cache=False), "cpu")
    assert isinstance(off.source, ImageSource)


def test_make_model_leaves_the_global_random_state_alone(micro_city):
    config = _micro_config(micro_city)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a, b = make_model(config, None, "cpu"), make_model(config, None, "cpu")
    assert torch.equal(torch.get_rng_state(), before)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    other = make_model(config.replace(seed=1), None, "cpu")
    assert not torch.equal(other.pool.centroids, a.pool.centroids)


@pytest.mark.parametrize("field,value,words", [
    ("epochs", 0, "at least 1"), ("lr", 0.0, "above 0"), ("num_workers", -1, "at least 0"),
    ("precision", "fp16", "one of"), ("cache_storage", "ssd", "one of"),
    ("optimizer", "rmsprop", "one of"), ("batch_size", 2.5, "must be int"),
    ("feature_cache", 1, "must be bool"), ("max_queries", 0, "at least 1"),
    ("image_size", (32,), "(H, W)"), ("margin", -0.1, "above 0"), ("n_neg", True, "int"),
])
def test_every_setting_is_checked(field, value, words):
    with pytest.raises(ArgumentError, match=words) as err:
        TrainConfig(**{field: value})
    assert f"`{field}`" in str(err.value)


def test_settings_from_text_are_typed():
    config = PRESETS["tiny-random"].with_settings([
        "lr=0.5", "max_queries=none", "image_size=32,48", "feature_cache=false", "batch-size=8"])
    assert (config.lr, config.max_queries, config.image_size, config.feature_cache,
            config.batch_size) == (0.5, None, (32, 48), False, 8)
    unchanged = {f.name for f in dataclasses.fields(config)} - {
        "lr", "max_queries", "image_size", "feature_cache", "batch_size"}
    assert all(getattr(config, k) == getattr(PRESETS["tiny-random"], k) for k in unchanged)
    for bad, named in [("lr=fast", "lr=fast"), ("colour=red", "colour=red"), ("lr", "lr"),
                       ("epochs=0", "epochs")]:
        with pytest.raises(ArgumentError, match=named):
            PRESETS["tiny-random"].with_settings([bad])


@pytest.mark.parametrize("setting,named", [("nope=1", "nope=1"), ("lr=x", "lr=x"),
                                           ("epochs=0", "--epochs")])
def test_cli_set_refuses_a_bad_setting(micro_city, tmp_path, capsys, setting, named):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--data-root", str(micro_city), "--out", str(tmp_path / "run"),
                  "--set", setting])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_library_errors_name_arguments_and_the_cli_its_flags(micro_city, tmp_path, capsys):
    config = _micro_config(micro_city)
    with pytest.raises(ArgumentError) as err:
        tr.train(config, tmp_path, resume=True, overwrite=True)
    assert "`resume=True`" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(ArgumentError) as err:
        evaluate_checkpoint(micro_city, pca_dim=8, untrained=True)
    assert "`pca_dim`" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--data-root", str(micro_city), "--untrained", "--pca-dim", "8"])
    assert "--pca-dim is only used with --pca" in capsys.readouterr().err


def test_quiet_other_ranks_is_scoped(monkeypatch, capsys):
    printer = builtins.print
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # as on rank 1
    with distributed.quiet_other_ranks():
        print("hidden")
        assert progress_hidden()
    print("shown")
    assert builtins.print is printer and not progress_hidden()
    assert capsys.readouterr().out == "shown\n"
