"""Issue #12, "nothing lost, nothing silent": kills at every point of a run, damaged files,
refused folders, and the errors a hostile but realistic user meets."""

import dataclasses
import errno
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import cli_error
from PIL import Image
from scipy.io import savemat
from test_train import _micro_config  # tests/ is on sys.path under pytest

from netvlad_tutorial import files, synthetic, utils
from netvlad_tutorial import train as tr
from netvlad_tutorial.centroids import centroids_path
from netvlad_tutorial.checkpoints import checkpoint_config, load_checkpoint
from netvlad_tutorial.config import PRESETS, TrainConfig
from netvlad_tutorial.data import load_split
from netvlad_tutorial.dbstruct import (
    DataLayoutError,
    DbStruct,
    _cell,
    parse_db_struct,
    save_db_struct,
    struct_path,
)
from netvlad_tutorial.evaluate import evaluate_checkpoint
from netvlad_tutorial.files import FAULT_ENV, load_torch_file
from netvlad_tutorial.model import build_model, make_model
from netvlad_tutorial.synthetic import make_synthetic_city

# ---------------------------------------------------------------------------------------------
# Fault injection: SIGKILL (NETVLAD_FAULT) at defined points of `train`, then --resume
# ---------------------------------------------------------------------------------------------

def _by_recall_at_1(evaluate):
    """Validation scored by R@1 (0.75, 0.875 on this configuration): R@5 of the 8 micro
    queries is flat, so the best epoch would never move and a stale best.pth not be seen."""

    def scored(model, split, config, device, **kwargs):
        recalls = evaluate(model, split, config, device, **kwargs)
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
    tr.train(TrainConfig.from_dict(config_dict), run_dir, resume=True)


def _fault_config(city):
    # The whole encoder trains (lr 1e-3): on this configuration epoch 1 beats epoch 0 in val
    # R@1, so a stale best.pth is visible.
    return _micro_config(city).replace(image_size=(16, 24), cache_refresh=1000, max_queries=4,
                                       n_neg_sample=10, n_neg_dist=5, epochs=2,
                                       trainable="all", lr=1e-3, batch_size=4)


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
            with pytest.raises(ValueError, match="resume=True"):
                evaluate_checkpoint(micro_city, checkpoint=run_dir / "best.pth",
                                       precision="fp32")
        _run(config, run_dir)
        _assert_like_straight(run_dir, straight)


# ---------------------------------------------------------------------------------------------
# Shared pieces: one short run, copies of the micro city
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_run(micro_city, tmp_path_factory):
    """A finished 1-epoch run on the micro city (16 x 24 images, seconds)."""
    run_dir = tmp_path_factory.mktemp("fast_run")
    tr.train(_fault_config(micro_city).replace(epochs=1), run_dir)
    return run_dir


def _copy_run(fast_run, tmp_path):
    return Path(shutil.copytree(fast_run, tmp_path / "run"))


def _copy_city(micro_city, tmp_path):
    return Path(shutil.copytree(micro_city, tmp_path / "city"))


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _evaluate_argv(city, checkpoint, *more):
    return ["evaluate", "--data-root", city, "--checkpoint", checkpoint, "--fp32", *more]


# ---------------------------------------------------------------------------------------------
# 1. The end of an epoch is one recoverable commit
# ---------------------------------------------------------------------------------------------


def _failing_save(monkeypatch, name, on_call, error):
    """Make the `on_call`-th `atomic_save` to a file called `name` raise `error`."""
    real, calls = tr.atomic_save, {"n": 0}

    def save(obj, path):
        if Path(path).name == name:
            calls["n"] += 1
            if calls["n"] == on_call:
                raise error
        return real(obj, path)

    monkeypatch.setattr(tr, "atomic_save", save)


def test_a_failed_best_write_is_repaired_on_resume(micro_city, tmp_path, monkeypatch):
    """Stopped while epoch 1's best.pth is written: the resume ends with best.pth = epoch 1
    and a log of both epochs (the old code kept epoch 0's weights and lost a log row)."""
    config = _fault_config(micro_city)
    monkeypatch.setattr(tr, "evaluate_split", _by_recall_at_1(tr.evaluate_split))
    _failing_save(monkeypatch, "best.pth", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        tr.train(config, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(tr, "evaluate_split", _by_recall_at_1(tr.evaluate_split))
    tr.train(config, tmp_path, resume=True)
    log = json.loads((tmp_path / "log.json").read_text())
    assert [row["epoch"] for row in log] == [0, 1]
    scores = [row["recall@5"] for row in log]
    best = load_torch_file(tmp_path / "best.pth")
    assert scores[1] > scores[0] and best["epoch"] == 1
    latest = load_torch_file(tmp_path / "latest.pth")
    for key, value in latest["model"].items():
        assert torch.equal(best["model"][key], value), key
    assert json.loads((tmp_path / "finished").read_text())["best_epoch"] == 1


def test_a_full_disk_in_epoch_0_loses_nothing_and_resume_writes_best(micro_city, tmp_path,
                                                                      capsys, monkeypatch):
    config = _fault_config(micro_city).replace(epochs=1)
    full = OSError(errno.ENOSPC, "No space left on device")
    _failing_save(monkeypatch, "best.pth", 1, full)
    with pytest.raises(OSError):
        tr.train(config, tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp"))
    tr.train(config, tmp_path, resume=True)
    assert load_torch_file(tmp_path / "best.pth")["epoch"] == 0
    result = evaluate_checkpoint(micro_city, checkpoint=tmp_path / "best.pth", precision="fp32")
    assert result["num_q"] == 8


def test_the_writer_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "latest.pth").write_bytes(b"old")

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="cannot write .*latest.pth: No space left") as err:
        files.atomic_save({"x": 1}, tmp_path / "latest.pth")
    assert err.value.errno == errno.ENOSPC
    assert (tmp_path / "latest.pth").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"]


def test_the_writer_keeps_a_file_mode_and_gives_new_files_the_usual_one(tmp_path):
    new = files.atomic_write(tmp_path / "new.json", "{}")
    mask = os.umask(0o022)
    os.umask(mask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~mask  # as open(path, "w") would
    new.chmod(0o640)
    files.atomic_write(new, "[]")
    assert new.stat().st_mode & 0o777 == 0o640 and new.read_text() == "[]"


def test_resume_removes_temporary_files_of_killed_writes(fast_run, tmp_path):
    run_dir = _copy_run(fast_run, tmp_path)
    left = run_dir / ".latest.pth.abc123.tmp"
    left.write_bytes(b"half a checkpoint")
    tr.train(TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text())),
             run_dir, resume=True)
    assert not left.exists()


# ---------------------------------------------------------------------------------------------
# 2. make-synthetic never writes into a foreign folder, and swaps a complete city in
# ---------------------------------------------------------------------------------------------


def test_make_synthetic_refuses_a_folder_with_other_files(tmp_path, capsys):
    mine = tmp_path / "photos" / "000" / "000000_pitch1_yaw1.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my holiday photo")
    err = cli_error(capsys, ["make-synthetic", "--out", tmp_path / "photos"])
    assert "photos" in err and "not a synthetic city" in err
    assert mine.read_bytes() == b"my holiday photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing left beside it


def test_a_regeneration_stopped_midway_keeps_the_old_city(tmp_path, monkeypatch):
    root = make_synthetic_city(tmp_path / "city", preset="micro", seed=0)
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    real, calls = synthetic._make_split, {"n": 0}

    def killed_after_one_split(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_make_split", killed_after_one_split)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_city(root, preset="micro", seed=1)
    after = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == before and synthetic.city_is_current(root, "micro", 0)
    # A folder left by a real kill is removed by the next generation; seed 1 then replaces 0.
    monkeypatch.undo()
    (tmp_path / ".city.killed.partial").mkdir()
    (tmp_path / ".city.killed.partial" / synthetic.PARTIAL_MARK).touch()
    make_synthetic_city(root, preset="micro", seed=1)
    assert synthetic.city_is_current(root, "micro", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".city.lock", "city"]


# ---------------------------------------------------------------------------------------------
# 3. A run folder is never silently reused
# ---------------------------------------------------------------------------------------------


def test_train_refuses_a_folder_holding_a_run(fast_run, tmp_path, capsys):
    run_dir = _copy_run(fast_run, tmp_path)
    before = _snapshot(run_dir)
    err = cli_error(capsys, ["train", "--data-root", "unused", "--out", run_dir])
    assert "--resume" in err and "--out" in err and "--overwrite" in err
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    with pytest.raises(ValueError, match="already holds a run"):
        tr.train(config, run_dir)
    assert _snapshot(run_dir) == before
    # --resume with best.pth but no latest.pth: refused too, best.pth kept.
    (run_dir / "latest.pth").unlink()
    with pytest.raises(ValueError, match="no latest.pth"):
        tr.train(config, run_dir, resume=True)
    assert (run_dir / "best.pth").read_bytes() == before["best.pth"]


def test_overwrite_replaces_the_run(fast_run, tmp_path, monkeypatch):
    run_dir = _copy_run(fast_run, tmp_path)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.RunModel, "build", stop)  # stop right after the folder is prepared
    with pytest.raises(KeyboardInterrupt):
        tr.train(config, run_dir, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "data.json"]


# ---------------------------------------------------------------------------------------------
# 4. .mat fields by name, and checked
# ---------------------------------------------------------------------------------------------


def _fields(db):
    return {"whichSet": db.whichSet, "dbImageFns": _cell(db.dbImage), "utmDb": db.utmDb.T,
            "qImageFns": _cell(db.qImage), "utmQ": db.utmQ.T, "numImages": float(db.numDb),
            "numQueries": float(db.numQ), "posDistThr": 25.0, "posDistSqThr": 625.0,
            "nonTrivPosDistSqThr": 100.0}


def _toy_db():
    rng = np.random.default_rng(0)
    utm_db = rng.uniform(0, 100, (6, 2)) + (585_000, 4_477_000)
    return DbStruct("test", "toy", [f"000/{i:06d}_pitch1_yaw1.jpg" for i in range(6)], utm_db,
                    [f"000/{j:06d}_pitch1_yaw1.jpg" for j in range(3)], utm_db[:3] + 1.0, 6, 3,
                    25.0, 625.0, 100.0)


@pytest.mark.parametrize("order", ["thresholds swapped", "alphabetical", "queries first"])
def test_mat_fields_are_read_by_name_in_any_order(tmp_path, order):
    db = _toy_db()
    fields = _fields(db)
    names = {"thresholds swapped": [*list(fields)[:7], "nonTrivPosDistSqThr", "posDistSqThr",
                                    "posDistThr"],
             "alphabetical": sorted(fields),
             "queries first": ["whichSet", "qImageFns", "utmQ", "dbImageFns", "utmDb",
                               "numQueries", "numImages", "posDistThr", "posDistSqThr",
                               "nonTrivPosDistSqThr"]}[order]
    savemat(tmp_path / "toy_test.mat", {"dbStruct": {n: fields[n] for n in names}})
    parsed = parse_db_struct(tmp_path / "toy_test.mat")
    assert (parsed.posDistThr, parsed.posDistSqThr, parsed.nonTrivPosDistSqThr) == (25, 625, 100)
    assert parsed.dbImage == db.dbImage and parsed.qImage == db.qImage
    np.testing.assert_array_equal(parsed.utmDb, db.utmDb)
    np.testing.assert_array_equal(parsed.utmQ, db.utmQ)
    assert (parsed.numDb, parsed.numQ) == (6, 3)


def _bad_field(name, value):
    def change(fields):
        fields[name] = value(fields) if callable(value) else value
        return fields
    return change


@pytest.mark.parametrize("change, message", [
    (_bad_field("posDistSqThr", 100.0), "posDistSqThr"),  # 10 m squared in the 25 m field
    (_bad_field("nonTrivPosDistSqThr", 900.0), "nonTrivPosDistSqThr"),
    (_bad_field("utmDb", lambda f: np.where(np.arange(6) == 2, np.nan, f["utmDb"])), "NaN"),
    (_bad_field("utmQ", lambda f: np.vstack([f["utmQ"], f["utmQ"][:1]])), "utmQ"),
    (_bad_field("numQueries", 4.0), "sizes disagree"),
])
def test_mat_consistency_is_checked(tmp_path, change, message):
    savemat(tmp_path / "toy_test.mat", {"dbStruct": change(_fields(_toy_db()))})
    with pytest.raises(DataLayoutError, match=message) as err:
        parse_db_struct(tmp_path / "toy_test.mat")
    assert "toy_test.mat" in str(err.value)


def test_tokyo_tm_with_13_fields_in_another_order_reads_by_name(tmp_path):
    db = _toy_db()
    fields = {**_fields(db), "dbTimeStamp": np.arange(6)[None] % 2,
              "qTimeStamp": np.arange(3)[None] % 2, "cutoffs": np.zeros((1, 3))}
    savemat(tmp_path / "tokyoTM_test.mat", {"dbStruct": dict(sorted(fields.items()))})
    parsed = parse_db_struct(tmp_path / "tokyoTM_test.mat")
    np.testing.assert_array_equal(parsed.dbTimeStamp, np.arange(6) % 2)
    np.testing.assert_array_equal(parsed.qTimeStamp, np.arange(3) % 2)
    assert parsed.dbImage == db.dbImage and parsed.numQ == 3


# ---------------------------------------------------------------------------------------------
# 5. Runs that would do nothing are errors
# ---------------------------------------------------------------------------------------------


def test_a_train_split_without_positives_is_an_error(micro_city, tmp_path, capsys):
    city = _copy_city(micro_city, tmp_path)
    train_mat = struct_path(city, "synthetic", "train")
    save_db_struct(parse_db_struct(train_mat)._replace(nonTrivPosDistSqThr=1e-6), train_mat,
                   float_counts=True)
    err = cli_error(capsys, ["train", "--data-root", city, "--out", tmp_path / "run"])
    assert "no query with a training positive" in err
    assert not (tmp_path / "run").exists()


def test_zero_epochs_is_an_error(micro_city, tmp_path, capsys):
    err = cli_error(capsys, ["train", "--data-root", micro_city, "--out", tmp_path / "run",
                              "--epochs", "0"])
    assert "--epochs" in err and not (tmp_path / "run").exists()


def test_a_split_without_database_images_is_an_error(micro_city, tmp_path, capsys):
    city = _copy_city(micro_city, tmp_path)
    test_mat = struct_path(city, "synthetic", "test")
    db = parse_db_struct(test_mat)
    save_db_struct(db._replace(dbImage=[], utmDb=np.zeros((0, 2)), numDb=0), test_mat)
    err = cli_error(capsys, ["evaluate", "--data-root", city, "--untrained", "--fp32"])
    assert "synthetic_test.mat" in err and "0 database images" in err


# ---------------------------------------------------------------------------------------------
# 6. A flat VPR folder: never trained on, evaluated as the split named
# ---------------------------------------------------------------------------------------------


def _flat_folder(micro_city, tmp_path):
    """ROOT/database + ROOT/queries from the micro city's test split, with VPR names."""
    split = load_split(micro_city, "test")
    root = tmp_path / "vpr"
    for kind, names, utm, folder in (
            ("database", split.db.dbImage, split.db.utmDb, micro_city),
            ("queries", split.db.qImage, split.db.utmQ, micro_city / split.queries_dir)):
        (root / kind).mkdir(parents=True)
        for i, (name, (east, north)) in enumerate(zip(names, utm)):
            shutil.copy(folder / name, root / kind / f"@{east:.2f}@{north:.2f}@17@T@{i:04d}@.jpg")
    return root, split


def test_a_flat_folder_is_refused_for_training_and_evaluated_as_named(micro_city, fast_run,
                                                                       tmp_path, capsys):
    root, split = _flat_folder(micro_city, tmp_path)
    err = cli_error(capsys, ["train", "--data-root", root, "--out", tmp_path / "run"])
    assert "flat VPR folder" in err and "test images" in err
    assert not (tmp_path / "run").exists()
    result = evaluate_checkpoint(root, split="test", checkpoint=fast_run / "best.pth",
                                    precision="fp32")
    expected = evaluate_checkpoint(micro_city, split="test",
                                      checkpoint=fast_run / "best.pth", precision="fp32")
    assert result["split"] == "test" and result["num_q"] == split.db.numQ
    assert {k: v for k, v in result.items() if k.startswith("recall")} == \
        {k: v for k, v in expected.items() if k.startswith("recall")}


# ---------------------------------------------------------------------------------------------
# 7. Loading never runs code
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_refused(fast_run, micro_city, tmp_path, capsys):
    created = tmp_path / "pwned"
    ckpt = load_torch_file(fast_run / "best.pth")
    ckpt["history"] = _Payload(created)
    torch.save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(tmp_path / "evil.pth")
    err = cli_error(capsys, _evaluate_argv(micro_city, tmp_path / "evil.pth"))
    assert "evil.pth" in err and "refused" in err
    # The same as a run's latest.pth, for --resume.
    run_dir = _copy_run(fast_run, tmp_path)
    torch.save(ckpt, run_dir / "latest.pth")
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    with pytest.raises(ValueError, match="refused"):
        tr.train(config.replace(epochs=2), run_dir, resume=True)
    assert not created.exists()


# ---------------------------------------------------------------------------------------------
# Clear errors: checkpoints
# ---------------------------------------------------------------------------------------------


def _damaged(kind, good, path):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("model: best\n")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a checkpoint")
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "random bytes", "text", "zip"])
def test_a_damaged_checkpoint_is_one_clear_error(kind, fast_run, micro_city, tmp_path, capsys):
    path = _damaged(kind, fast_run / "best.pth", tmp_path / "damaged.pth")
    err = cli_error(capsys, _evaluate_argv(micro_city, path))
    assert "damaged.pth" in err and "\n" not in err


def test_resume_on_a_truncated_latest_is_a_clear_error_and_loses_nothing(fast_run, tmp_path,
                                                                         capsys):
    run_dir = _copy_run(fast_run, tmp_path)
    _damaged("truncated", fast_run / "latest.pth", run_dir / "latest.pth")
    before = _snapshot(run_dir)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    with pytest.raises(ValueError) as err:
        tr.train(config.replace(epochs=2), run_dir, resume=True)
    assert "latest.pth" in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(run_dir) == before


def test_a_config_from_another_version(fast_run, micro_city, tmp_path, capsys):
    ckpt = load_torch_file(fast_run / "best.pth")
    ckpt["config"]["future_setting"] = 3
    ckpt["version"] = "9.0.0"
    torch.save(ckpt, tmp_path / "newer.pth")
    # evaluate can load it (the setting is not needed to build the model) ...
    result = evaluate_checkpoint(micro_city, checkpoint=tmp_path / "newer.pth",
                                    precision="fp32")
    assert result["num_q"] == 8
    # ... but a run cannot be continued without it, and the message says which version.
    with pytest.raises(ValueError, match=r"future_setting.*9\.0\.0"):
        checkpoint_config(ckpt, tmp_path / "newer.pth", strict=True)
    # Weights that do not fit: one clear line, naming the file and the version.
    ckpt["model"] = {k: v[:1] for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "other.pth")
    err = cli_error(capsys, _evaluate_argv(micro_city, tmp_path / "other.pth"))
    assert "other.pth" in err and "9.0.0" in err and "\n" not in err


def test_old_configs_with_amp_load():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in dataclasses.asdict(PRESETS["tiny-random"]).items()
            if k not in ("amp", "precision")}
    assert "precision" in names and "amp" not in names
    on = TrainConfig.from_dict({**base, "amp": True, "image_size": [96, 128]})
    off = TrainConfig.from_dict({**base, "amp": False})
    assert (on.precision, off.precision) == ("auto", "fp32")
    assert on.image_size == (96, 128)
    assert on.replace(image_size=None) == off.replace(precision="auto", image_size=None)


@pytest.mark.parametrize("train_all, freeze_encoder, weights, trainable", [
    (None, False, "imagenet", "conv5"),  # the old default: conv5 with ImageNet weights
    (None, False, None, "all"),  # ... and everything with random ones
    (False, False, None, "conv5"), (True, False, "imagenet", "all"),
    (None, True, None, "netvlad"), (False, True, "imagenet", "netvlad"),  # the tiny presets
])
def test_old_configs_with_train_all_and_freeze_encoder_load(train_all, freeze_encoder, weights,
                                                            trainable):
    base = {k: v for k, v in dataclasses.asdict(PRESETS["pitts30k"]).items()
            if k != "trainable"}
    old = {**base, "weights": weights, "train_all": train_all, "freeze_encoder": freeze_encoder}
    config = TrainConfig.from_dict(old, strict=True)
    assert config == PRESETS["pitts30k"].replace(weights=weights, trainable=trainable)
    model = build_model(num_clusters=2, weights=None, trainable=config.trainable)
    grads = [p.requires_grad for p in model.encoder.parameters()]  # 13 conv layers, 26 tensors
    assert grads == [trainable == "all"] * 20 + [trainable != "netvlad"] * 6
    assert model.encoder_frozen == (trainable == "netvlad")


# ---------------------------------------------------------------------------------------------
# Clear errors: output folders, devices, images, flags
# ---------------------------------------------------------------------------------------------


def test_a_read_only_out_is_found_before_kmeans(micro_city, tmp_path, capsys, monkeypatch):
    out = tmp_path / "readonly"
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    def kmeans(*args, **kwargs):
        raise AssertionError("k-means ran before the output folder was checked")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tr, "make_model", kmeans)
    err = cli_error(capsys, ["train", "--data-root", micro_city, "--out", out])
    assert "readonly" in err and "Permission denied" in err


@pytest.mark.parametrize("device, message", [("nonsense", "unknown device"),
                                             ("cuda", "no CUDA GPU"), ("cuda:7", "cuda")])
def test_an_unavailable_device_is_a_clear_error(device, message, micro_city, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPUs")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = cli_error(capsys, ["train", "--data-root", micro_city, "--out", tmp_path / "run",
                              "--device", device])
    assert message in err and device in err


def test_an_image_of_another_size_is_a_clear_error(fast_run, micro_city, tmp_path, capsys):
    city = _copy_city(micro_city, tmp_path)
    split = load_split(city, "test")
    odd = city / split.db.dbImage[3]
    Image.new("RGB", (60, 40), (120, 80, 40)).save(odd)
    ckpt = load_torch_file(fast_run / "best.pth")
    ckpt["config"]["image_size"] = None  # a preset that keeps the files' size
    torch.save(ckpt, tmp_path / "native.pth")
    err = cli_error(capsys, _evaluate_argv(city, tmp_path / "native.pth"))
    assert odd.name in err and "60x40" in err and "48x32" in err


@pytest.mark.parametrize("argv, message", [
    (["--untrained"], "not both"),
    (["--pca", "--pca-dim", "0"], "at least 1"),
    (["--pca", "--pca-dim", "100000"], "larger than possible"),
    (["--pca-dim", "8"], "only used with --pca"),
    (["--preset", "small"], "only used with --untrained"),
])
def test_conflicting_and_out_of_range_evaluate_flags(argv, message, fast_run, micro_city,
                                                     capsys):
    err = cli_error(capsys, _evaluate_argv(micro_city, fast_run / "best.pth", *argv))
    assert message in err


def test_struct_with_split_is_an_error(micro_city, capsys):
    err = cli_error(capsys, ["check-data", "--root", micro_city, "--struct",
                              "synthetic_val.mat", "--split", "test"])
    assert "--struct" in err and "--split" in err
    err = cli_error(capsys, ["check-data", "--root", micro_city, "--split", "test",
                              "--queries-dir", "elsewhere"])
    assert "--queries-dir is only used with --struct" in err


# ---------------------------------------------------------------------------------------------
# Evaluation needs only what it uses
# ---------------------------------------------------------------------------------------------


def test_evaluate_a_test_split_alone_without_centroid_cache(fast_run, micro_city, tmp_path,
                                                            monkeypatch):
    city = _copy_city(micro_city, tmp_path)
    for split in ("train", "val"):
        struct_path(city, "synthetic", split).unlink()
    cache = tmp_path / "empty_cache"
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(cache))
    result = evaluate_checkpoint(city, checkpoint=fast_run / "best.pth", precision="fp32")
    expected = evaluate_checkpoint(micro_city, checkpoint=fast_run / "best.pth",
                                      precision="fp32")
    assert result == {**expected, "model": result["model"]}
    assert not cache.exists()


def test_tokyo247_by_name_and_split(fast_run, micro_city, tmp_path):
    city = _copy_city(micro_city, tmp_path)
    test = parse_db_struct(struct_path(city, "synthetic", "test"))
    for split in ("train", "val", "test"):
        struct_path(city, "synthetic", split).unlink()
    save_db_struct(test._replace(dataset="tokyo247"),
                   city / "netvlad_v100_datasets" / "datasets" / "tokyo247.mat")
    result = evaluate_checkpoint(city, split="test", name="tokyo247",
                                    checkpoint=fast_run / "best.pth", precision="fp32")
    assert result["num_q"] == test.numQ
    with pytest.raises(DataLayoutError, match="holds the 'test' split"):
        load_split(city, "val", name="tokyo247")


def test_evaluate_pca_never_writes_the_checkpoint(fast_run, micro_city, tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    target = folder / "weights.pth"
    shutil.copy(fast_run / "best.pth", target)
    target.chmod(0o444)
    link = folder / "best.pth"
    link.symlink_to(target)
    before = (target.read_bytes(), target.stat().st_mode)
    evaluate_checkpoint(micro_city, checkpoint=link, pca=True, pca_dim=4, precision="fp32")
    assert link.is_symlink() and (target.read_bytes(), target.stat().st_mode) == before
    assert sorted(p.name for p in folder.iterdir()) == ["best.pth", "weights.pth"]
    # Asked to, it stores the PCA beside the checkpoint, and uses it next time.
    first = evaluate_checkpoint(micro_city, checkpoint=link, pca=True, pca_dim=4,
                                   precision="fp32",
                                   save_pca=True)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pca4.pth", "best.pth",
                                                        "weights.pth"]
    assert evaluate_checkpoint(micro_city, checkpoint=link, pca=True, pca_dim=4,
                                  precision="fp32") == first


def test_the_centroid_cache_is_a_user_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path / "mine"))
    assert utils.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NETVLAD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert utils.cache_dir() == tmp_path / "xdg" / "netvlad_tutorial"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert utils.cache_dir() == tmp_path / "home" / ".cache" / "netvlad_tutorial"
    package = Path(tr.__file__).resolve().parent.parent
    assert package not in utils.cache_dir().resolve().parents


def test_centroids_are_cached_in_the_cache_folder(micro_city, tmp_path, monkeypatch):
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path / "cache"))
    config = _fault_config(micro_city)
    split = load_split(micro_city, "train")
    path = centroids_path(config, split)
    assert path.parent == tmp_path / "cache"
    make_model(config, split, torch.device("cpu"))
    assert path.is_file()


# ---------------------------------------------------------------------------------------------
# Resume that helps
# ---------------------------------------------------------------------------------------------


def test_resume_accepts_the_same_data_by_another_path_and_extends_a_run(fast_run, micro_city,
                                                                        tmp_path, monkeypatch):
    run_dir = _copy_run(fast_run, tmp_path)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    monkeypatch.chdir(micro_city.parent)
    relative = config.replace(data_root=micro_city.name, epochs=2, device=None)
    history = tr.train(relative, run_dir, resume=True)
    assert [row["epoch"] for row in history] == [0, 1]
    assert json.loads((run_dir / "finished").read_text())["epochs"] == 2
    with pytest.raises(ValueError) as err:
        tr.train(relative.replace(num_clusters=8), run_dir, resume=True)
    assert "num_clusters" in str(err.value) and "delete" not in str(err.value)
