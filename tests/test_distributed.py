"""torchrun on 2 CPU ranks (gloo) against one process: cache, training, resume, files, loads.

One 2-rank session (`torch.multiprocessing.spawn`, rendezvous on a free 127.0.0.1 port) runs
every distributed scenario once and leaves each rank's results in files; each test compares
one of them with a single-process computation done here, in the test process.
"""

import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_feature_cache import _frozen_config  # tests/ is on sys.path under pytest
from torch.utils.data import Dataset

from netvlad_tutorial import distributed
from netvlad_tutorial import train as tr
from netvlad_tutorial.checkpoints import load_checkpoint
from netvlad_tutorial.data import load_split, whole_dataset
from netvlad_tutorial.evaluate import evaluate_checkpoint
from netvlad_tutorial.features import (
    FeatureDataset,
    encode_descriptors,
    encode_local_features,
)
from netvlad_tutorial.model import make_model

WORLD = 2
BATCH = 2  # per rank; the single-process reference uses WORLD * BATCH


class CountingDataset(Dataset):
    """The first `n` items of `base`, recording every index asked for."""

    def __init__(self, base, n):
        self.base, self.n, self.calls = base, n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls.append(int(i))
        return self.base[i]


def _odd_count(split):
    n = split.db.numDb + split.db.numQ
    return n if n % 2 else n - 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, city, out, single_ckpt):
    """One rank of the session: every scenario, results in `out/rank{rank}_*.pt`."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init("gloo", timeout_s=120)
    try:
        config = _frozen_config(city)
        results = {}
        # 1. The cache passes: the local-feature cache (images, float16), then descriptors
        # (float32) from it, counting which items each rank reads.
        split = load_split(city, "train")
        model = make_model(config, split, torch.device("cpu"))
        images = CountingDataset(whole_dataset(split, config), _odd_count(split))
        features = encode_local_features(model.encoder, images, batch_size=7, precision="fp32")
        counting = CountingDataset(FeatureDataset(features), len(features))
        results["desc32"] = encode_descriptors(model.head, counting, batch_size=7,
                                                dtype=np.float32, precision="fp32")
        results["calls"], results["features"] = list(counting.calls), features
        # 2.-4. Training: straight 2 epochs (rank 1's folder must stay empty), and 1 + resume.
        config = config.replace(batch_size=BATCH)
        tr.train(config, out / ("straight" if rank == 0 else "straight_rank1"))
        tr.train(config, out / "resumed", stop_after=1)
        if rank == 0:
            shutil.copy(out / "resumed" / "latest.pth", out / "epoch0.pth")
        distributed.barrier()
        results["resumed_history"] = tr.train(config, out / "resumed", resume=True)
        # 5. A single-process checkpoint evaluated under 2 ranks (sharded descriptors).
        results["evaluate"] = evaluate_checkpoint(city, split="val", checkpoint=single_ckpt,
                                                     precision="fp32", device="cpu")
        torch.save(results, out / f"rank{rank}_results.pt")
    finally:
        distributed.destroy()


@pytest.fixture(scope="module")
def session(micro_city, tmp_path_factory):
    """(out folder, per-rank results, single-process run folder, config) of the session."""
    out = tmp_path_factory.mktemp("ddp")
    config = _frozen_config(micro_city)
    single = out / "single"  # the reference: one process, batch WORLD * BATCH, one epoch
    tr.train(config.replace(batch_size=WORLD * BATCH, epochs=1), single)
    (out / "straight_rank1").mkdir()
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(_free_port(), micro_city, out, single / "latest.pth"),
             nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}_results.pt", weights_only=False)
               for r in range(WORLD)]
    return out, results, single, config


def test_two_rank_cache_equals_one_process_cache(session, micro_city):
    _, results, _, config = session
    split = load_split(micro_city, "train")
    model = make_model(config, split, torch.device("cpu"))
    n = _odd_count(split)
    assert n % 2 == 1
    images = CountingDataset(whole_dataset(split, config), n)
    single_features = encode_local_features(model.encoder, images, precision="fp32")
    # The descriptors from the gathered features, in one process: the same inputs as the ranks'.
    single32 = encode_descriptors(model.head, FeatureDataset(results[0]["features"]),
                                   dtype=np.float32, precision="fp32")
    for res in results:  # every rank holds the whole cache, in image order
        assert res["features"].shape == single_features.shape == (n, 512, 2, 3)
        assert res["features"].dtype == np.float16
        # float16 features: at most one float16 step apart (other batch compositions)
        np.testing.assert_allclose(res["features"], single_features, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(res["features"], results[0]["features"])  # exact gather
        np.testing.assert_allclose(res["desc32"], single32, rtol=0, atol=1e-6)
    assert (np.abs(single_features).reshape(n, -1).max(axis=1) > 0).all()  # no row left at 0
    assert (np.abs(single32).max(axis=1) > 0).all()
    # No image encoded twice, none dropped: each rank encoded its own block.
    calls = [sorted(res["calls"]) for res in results]
    for rank, rank_calls in enumerate(calls):
        assert rank_calls == list(distributed.shard(n, rank, WORLD))
    assert sorted(calls[0] + calls[1]) == list(range(n))


def test_two_rank_epoch_equals_one_process_epoch_with_the_global_batch(session, micro_city):
    out, _, single, config = session
    a = torch.load(single / "latest.pth", weights_only=False)
    b = torch.load(out / "epoch0.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 0
    assert a["history"][0]["tuples"] == b["history"][0]["tuples"] > WORLD * BATCH
    np.testing.assert_allclose(b["history"][0]["loss"], a["history"][0]["loss"], rtol=1e-5)
    for key in ("pool.centroids", "pool.conv.weight"):
        # float32 reduction order only (DDP's all-reduce vs one batch): 1e-5
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-5, rtol=1e-5,
                                   msg=key)
    init = make_model(config, load_split(micro_city, "train"), torch.device("cpu"))
    moved = (init.state_dict()["pool.centroids"] - a["model"]["pool.centroids"]).abs().max()
    assert moved > 1e-3  # the epoch moved the weights much more than the tolerance


def test_resume_under_two_ranks_equals_an_uninterrupted_run(session):
    out, results, _, _ = session
    a = torch.load(out / "straight" / "latest.pth", weights_only=False)
    b = torch.load(out / "resumed" / "latest.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    np.testing.assert_array_equal(a["neg_cache"]["negatives"], b["neg_cache"]["negatives"])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    without_time = [[{k: v for k, v in row.items() if k != "seconds"}
                     for row in res["resumed_history"]] for res in results]
    assert without_time[0] == without_time[1]  # the same on both ranks (but the time taken)


def test_only_rank_zero_writes_files(session):
    out, _, _, _ = session
    assert list((out / "straight_rank1").iterdir()) == []  # rank 1 ran with this folder
    written = {p.name for p in (out / "straight").iterdir()}
    assert {"latest.pth", "best.pth", "log.json", "log.csv", "config.json",
            "finished"} <= written
    assert not list(out.rglob("*.tmp"))


def test_two_rank_checkpoint_loads_in_one_process_and_the_reverse(session, micro_city):
    out, results, single, config = session
    ckpt = load_checkpoint(out / "straight" / "latest.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])
    model = make_model(config, load_split(micro_city, "train"), torch.device("cpu"))
    model.load_state_dict(ckpt["model"])  # strict: the same keys as a single-process model
    # The reverse: a single-process checkpoint evaluated under 2 ranks gives the same recalls.
    expected = evaluate_checkpoint(micro_city, split="val", checkpoint=single / "latest.pth",
                                      precision="fp32", device="cpu")
    for res in results:
        assert res["evaluate"] == pytest.approx(expected)
