"""Training: resume equality, checkpoints, the evaluate command's errors."""

import contextlib
import csv
import json
import os

import numpy as np
import pytest
import torch

from netvlad_tutorial import train as tr
from netvlad_tutorial.centroids import centroids_path
from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.config import PRESETS, TrainConfig
from netvlad_tutorial.data import load_split
from netvlad_tutorial.evaluate import evaluate_checkpoint, pca_path
from netvlad_tutorial.files import load_torch_file
from netvlad_tutorial.model import make_model, model_config


def _micro_config(city):
    """The tiny preset shrunk to seconds: small images, few clusters, fp32 for exactness.

    As the tiny preset, only NetVLAD trains (a frozen encoder runs once per image); tests of
    what encoder training changes use `.replace(trainable="all")`.
    """
    return PRESETS["tiny-random"].replace(
        data_root=str(city), image_size=(32, 48), num_clusters=4, epochs=2, n_neg=2,
        n_neg_sample=20, n_neg_dist=10, cache_refresh=8, kmeans_images=20, kmeans_per_image=4,
        kmeans_iters=10, precision="fp32", lr=1e-2, device="cpu", trainable="netvlad")


@pytest.mark.parametrize("frozen,pool", [(False, "query"), (True, "query"), (True, "shared")],
                         ids=["whole-encoder", "feature-cache", "feature-cache-shared-pool"])
def test_resume_gives_the_same_final_weights(micro_city, tmp_path, frozen, pool):
    config = _micro_config(micro_city).replace(trainable="netvlad" if frozen else "all",
                                               lr=1e-2, negative_pool=pool)
    if not frozen:  # the whole VGG16 trains: smaller images and fewer queries keep it seconds
        config = config.replace(image_size=(16, 24), max_queries=8, lr=1e-3)
    straight = tr.train(config, tmp_path / "straight")
    tr.train(config, tmp_path / "resumed", stop_after=1)  # "killed" after epoch 0
    assert not (tmp_path / "resumed" / "finished").exists()
    resumed = tr.train(config, tmp_path / "resumed", resume=True)
    a = load_torch_file(tmp_path / "straight" / "latest.pth")
    b = load_torch_file(tmp_path / "resumed" / "latest.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    np.testing.assert_array_equal(a["neg_cache"]["negatives"], b["neg_cache"]["negatives"])
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    # Training changed the weights (the equality above is not trivially true).
    first = load_torch_file(tmp_path / "resumed" / "best.pth")
    init = make_model(config, load_split(micro_city, "train"), torch.device("cpu"))
    changed = [k for k, v in init.state_dict().items()
               if not torch.equal(v, a["model"][k])]
    assert changed and first["epoch"] in (0, 1)


def test_log_files_and_checkpoint_contents(micro_city, tmp_path):
    config = _micro_config(micro_city)  # 2 epochs
    history = tr.train(config, tmp_path)
    log = json.loads((tmp_path / "log.json").read_text())
    assert log == history and [row["epoch"] for row in log] == [0, 1]
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["recall@5"]) for row in rows] == [row["recall@5"] for row in log]
    recall5 = [row["recall@5"] for row in log]
    best, latest = (load_torch_file(tmp_path / name) for name in ("best.pth", "latest.pth"))
    # best.pth is the first epoch of the highest logged val R@5; latest.pth is the last epoch.
    assert best["epoch"] == latest["best_epoch"] == int(np.argmax(recall5))
    assert best["best_score"] == latest["best_score"] == max(recall5)
    assert latest["epoch"] == 1 and latest["history"] == log
    assert TrainConfig.from_dict(latest["config"]) == config
    assert latest["model_config"] == model_config(make_model(config, None, torch.device("cpu")))
    assert json.loads((tmp_path / "finished").read_text()) == {
        "best_epoch": int(np.argmax(recall5)), "best_recall@5": max(recall5), "epochs": 2}
    assert not list(tmp_path.glob("*.tmp"))


def test_evaluate_errors_are_clear(micro_city, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--data-root", str(micro_city), "--checkpoint",
                  str(tmp_path / "missing.pth")])
    assert exit_info.value.code == 2
    assert "missing.pth not found" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--data-root", str(tmp_path), "--untrained"])
    assert str(tmp_path) in capsys.readouterr().err

    # A checkpoint of another model configuration (K = 4 vs the preset's 16).
    config = _micro_config(micro_city).replace(epochs=1)
    tr.train(config, tmp_path / "run")
    ckpt = load_torch_file(tmp_path / "run" / "best.pth")
    ckpt["model_config"] = {**ckpt["model_config"], "num_clusters": 64}
    torch.save(ckpt, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="use the matching `preset`"):
        evaluate_checkpoint(micro_city, checkpoint=tmp_path / "other.pth")


def test_pca_whitening_is_stored_beside_the_checkpoint_only_when_asked(micro_city, tmp_path):
    config = _micro_config(micro_city).replace(epochs=1)
    tr.train(config, tmp_path)
    ckpt_path = tmp_path / "best.pth"
    before = ckpt_path.read_bytes()
    first = evaluate_checkpoint(micro_city, checkpoint=ckpt_path, pca=True, pca_dim=8,
                                   precision="fp32", save_pca=True)
    assert ckpt_path.read_bytes() == before  # the checkpoint itself is never written
    stored = load_torch_file(pca_path(ckpt_path, 8))
    assert (stored["in_dim"], stored["out_dim"]) == (4 * 512, 8) and first["dim"] == 8
    # The second evaluation loads the stored layer: same recalls, file unchanged.
    side = pca_path(ckpt_path, 8).read_bytes()
    again = evaluate_checkpoint(micro_city, checkpoint=ckpt_path, pca=True, pca_dim=8,
                                   precision="fp32")
    assert again == first and pca_path(ckpt_path, 8).read_bytes() == side


def test_trainable_netvlad_trains_only_netvlad(micro_city, tmp_path):
    config = _micro_config(micro_city).replace(epochs=1, trainable="netvlad", lr=0.1)
    tr.train(config, tmp_path)
    trained = load_torch_file(tmp_path / "latest.pth")["model"]
    init = make_model(config, load_split(micro_city, "train"), torch.device("cpu"))
    changed = {k for k, v in init.state_dict().items() if not torch.equal(v, trained[k])}
    assert changed and all(k.startswith("pool.") for k in changed)
    assert not any(p.requires_grad for p in init.encoder.parameters())


def test_centroid_cache_key_follows_the_data(micro_city, tmp_path):
    config = _micro_config(micro_city)
    split = load_split(micro_city, "train")
    assert centroids_path(config, split) == centroids_path(config, split)
    assert centroids_path(config, split) != centroids_path(config.replace(seed=1), split)
    # The same path with other images (a regenerated city) must not reuse the old centroids.
    before = centroids_path(config, split)
    with _changed_first_image(micro_city, split):
        assert centroids_path(config, split) != before
    assert centroids_path(config, split) == before


@contextlib.contextmanager
def _changed_first_image(city, split):
    """Temporarily replace the first database image by another one of the city (its bytes
    and modification time restored after: the data fingerprint reads both)."""
    first = city / split.db.dbImage[0]
    original, stat = first.read_bytes(), first.stat()
    first.write_bytes((city / split.db.dbImage[1]).read_bytes())
    try:
        yield
    finally:
        first.write_bytes(original)
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_run_on_other_data_is_refused(micro_city, tmp_path):
    config = _micro_config(micro_city).replace(epochs=1)
    tr.train(config, tmp_path)
    assert tr.load_trained(config, tmp_path, device="cpu")[1][0]["epoch"] == 0
    split = load_split(micro_city, "train")
    with _changed_first_image(micro_city, split):
        with pytest.raises(ValueError, match="trained on other data"):
            tr.load_trained(config, tmp_path, device="cpu")
        with pytest.raises(ValueError, match="trained on other data"):
            tr.train(config, tmp_path, resume=True)
