"""Issue #12, "nothing lost, nothing silent": kills at every point of a run, damaged files,
refused folders, and the errors a hostile but realistic user meets."""

import json
import multiprocessing
import os
import sys

import pytest
import torch

from netvlad_tutorial import train as tr
from netvlad_tutorial.utils import FAULT_ENV, load_torch_file

from test_train import _micro_config  # noqa: E402  (tests/ is on sys.path under pytest)

# ---------------------------------------------------------------------------------------------
# Fault injection: SIGKILL (NETVLAD_FAULT) at defined points of `train`, then --resume
# ---------------------------------------------------------------------------------------------

def _by_recall_at_1(evaluate):
    """Validation scored by R@1 (0.75, 0.875 on this configuration): R@5 of the 8 micro
    queries is flat, so the best epoch would never move and a stale best.pth not be seen."""

    def scored(model, split, config, device):
        recalls = evaluate(model, split, config, device)
        return {**recalls, 5: recalls[1]}

    return scored


def _child(config_dict, run_dir, fault, threads):
    """`train --resume` in a child process, killed at `fault` (`NETVLAD_FAULT`) if given."""
    os.environ.pop(FAULT_ENV, None)
    if fault:
        os.environ[FAULT_ENV] = fault
    torch.set_num_threads(threads)
    tr.evaluate_split = _by_recall_at_1(tr.evaluate_split)
    sys.stdout = sys.stderr = open(os.devnull, "w")
    tr.train(tr.TrainConfig.from_dict(config_dict), run_dir, resume=True)


def _fault_config(city):
    return _micro_config(city).replace(image_size=(16, 24), cache_refresh=1000, max_queries=4,
                                       n_neg_sample=10, n_neg_dist=5, epochs=2)


# A fork server that has imported torch once: each run is a fork of it, not a new interpreter
# (seconds saved per run), and it has run no torch code that a fork could not copy safely.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "netvlad_tutorial.train"])


def _run(config, run_dir, fault=None):
    """`train --resume` in a child process; returns its exit code (-9: killed by SIGKILL)."""
    child = _CONTEXT.Process(target=_child, args=(tr._config_json(config), str(run_dir), fault,
                                                  torch.get_num_threads()))
    child.start()
    child.join(timeout=120)
    if fault is None:
        assert child.exitcode == 0, f"train --resume failed in {run_dir}"
    return child.exitcode


def _without_seconds(log):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


def _assert_like_straight(run_dir, straight):
    latest = load_torch_file(run_dir / "latest.pth")
    for key, value in straight["model"].items():
        assert torch.equal(latest["model"][key], value), key
    log = json.loads((run_dir / "log.json").read_text())
    assert _without_seconds(log) == _without_seconds(straight["history"])
    scores = [row["recall@5"] for row in log]
    best = load_torch_file(run_dir / "best.pth")
    assert best["epoch"] == scores.index(max(scores))  # the first epoch with the best score
    finished = json.loads((run_dir / "finished").read_text())
    assert finished["best_epoch"] == best["epoch"]
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob("*.tmp"))


def test_kills_at_every_point_then_resume_give_the_straight_run(micro_city, tmp_path):
    config = _fault_config(micro_city)
    _run(config, tmp_path / "straight")
    straight = load_torch_file(tmp_path / "straight" / "latest.pth")
    scores = [row["recall@5"] for row in straight["history"]]
    assert scores[1] > scores[0]  # epoch 1 is the best: a stale best.pth would be seen

    chains = {
        "a": ["epoch-trained",  # mid-epoch 0: nothing committed
              "write:latest.pth",  # latest.pth's temporary file complete, not renamed
              "after:latest.pth",  # epoch 0 committed, no best.pth yet
              "write:best.pth:2",  # after repairing best (epoch 0): epoch 1's best being written
              "write:finished"],  # every epoch done, the marker being written
        "b": ["after:best.pth",  # epoch 0: latest and best written, not the log
              "write:log.json",  # the log being repaired on resume
              "after:latest.pth"],  # epoch 1 committed, its best.pth not written: stale best
    }
    for name, faults in chains.items():
        run_dir = tmp_path / name
        for fault in faults:
            assert _run(config, run_dir, fault) == -9, fault  # killed by SIGKILL
        if name == "b":  # the stale best.pth is refused by evaluate, not used silently
            with pytest.raises(ValueError, match="train --resume"):
                tr.evaluate_checkpoint(micro_city, checkpoint=run_dir / "best.pth", amp=False)
        _run(config, run_dir)
        _assert_like_straight(run_dir, straight)
