"""Issue #28: untrusted input, real faults, concurrent runs. Each test is one case of a class
(data loss, concurrent writers, reads outside the root, caches, disk faults, network, tracebacks,
images) that failed before the fix: a clear exit-2 error every time, nothing of the user's lost."""

import hashlib
import http.server
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import cli_error
from PIL import Image
from scipy.io import loadmat, savemat
from test_train import _micro_config  # tests/ is on sys.path under pytest

from netvlad_tutorial import synthetic, weights
from netvlad_tutorial import train as tr
from netvlad_tutorial.centroids import centroids_path
from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.config import TrainConfig
from netvlad_tutorial.data import (
    NegativeSampler,
    WholeDataset,
    data_fingerprint,
    load_split,
    whole_dataset,
)
from netvlad_tutorial.dbstruct import (
    QUERIES_DIR,
    DataLayoutError,
    parse_db_struct,
    save_db_struct,
    struct_path,
)
from netvlad_tutorial.evaluate import pca_path
from netvlad_tutorial.features import features_key, stored_local_features
from netvlad_tutorial.files import load_torch_file
from netvlad_tutorial.images import load_image
from netvlad_tutorial.model import build_model, make_model
from netvlad_tutorial.precision import resolve_precision
from netvlad_tutorial.synthetic import city_is_current, make_synthetic_city
from netvlad_tutorial.utils import cache_dir, default_data_root
from netvlad_tutorial.viz import to_image


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def city(micro_city, tmp_path):
    """A copy of the micro city to change freely."""
    return Path(shutil.copytree(micro_city, tmp_path / "city"))


# ---------------------------------------------------------------------------------------------
# 1. Data loss: make-synthetic deletes only the files it wrote
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "000/my_photo.jpg", "queries_real/extra.jpg",
                                  "netvlad_v100_datasets/datasets/mine_train.mat"])
def test_make_synthetic_refuses_a_city_holding_other_files(city, name, capsys):
    (city / name).parent.mkdir(parents=True, exist_ok=True)
    (city / name).write_bytes(b"the user's own file")
    before = _files(city)
    err = cli_error(capsys, ["make-synthetic", "--out", city, "--preset", "micro"])
    assert name.split("/")[-1] in err and "did not write" in err
    assert _files(city) == before


def test_a_folder_named_like_a_leftover_but_not_ours_is_kept(city):
    mine = city.parent / ".city.backup.partial" / "thesis.txt"
    mine.parent.mkdir()
    mine.write_bytes(b"keep me")
    make_synthetic_city(city, preset="micro", seed=1)
    assert mine.read_bytes() == b"keep me" and city_is_current(city, "micro", 1)


def test_replacing_a_city_deletes_only_its_named_files(city, monkeypatch):
    """The old city's files go by name (`city_files`), never by `rmtree` of the folder."""
    named = synthetic.city_files(city)
    assert {p for p in _files(city)} == named  # the micro city is exactly its named files
    removed = []
    real = synthetic._remove_named
    monkeypatch.setattr(synthetic, "_remove_named",
                        lambda folder, names: removed.append(set(names)) or real(folder, names))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: pytest.fail("rmtree of a city"))
    make_synthetic_city(city, preset="micro", seed=1)
    assert removed[0] == named
    assert not [p for p in city.parent.iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# 2. Concurrent writers of one folder: the second is refused, the folder stays consistent
# ---------------------------------------------------------------------------------------------


class _LockHolder:
    """Another process holding `lock_file` (`filelock`), as a running writer would."""

    def __init__(self, lock_file):
        code = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
                "lock.acquire(); print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_a_second_make_synthetic_on_one_folder_is_refused(city, capsys):
    before = _files(city)
    holder = _LockHolder(city.parent / ".city.lock")
    try:
        err = cli_error(capsys, ["make-synthetic", "--out", city, "--preset", "micro",
                                  "--seed", "3"])
    finally:
        holder.release()
    assert "another process" in err and str(city) in err
    assert _files(city) == before
    make_synthetic_city(city, preset="micro", seed=3)  # the lock is free again
    assert city_is_current(city, "micro", 3)


def test_a_second_train_on_one_run_folder_is_refused(micro_city, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"seed": 1}')  # the first run's, being written
    holder = _LockHolder(tmp_path / ".run.lock")
    try:
        err = cli_error(capsys, ["train", "--data-root", micro_city, "--out", run_dir,
                                  "--overwrite", "--seed", "2"])
    finally:
        holder.release()
    assert "another process" in err and "train" in err
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 1}


# ---------------------------------------------------------------------------------------------
# 3. Image names are untrusted: a regular file inside its root, or a clear error naming it
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_hang():
    """Fail (SIGALRM) instead of hanging for ever, e.g. on a FIFO opened for reading."""

    def stop(*args):
        raise TimeoutError("hung: the call did not return within 60 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _with_db_names(city, split, change):
    """Rewrite `split`'s `.mat` of `city` with database names `change(names)`."""
    path = struct_path(city, "synthetic", split)
    db = parse_db_struct(path)
    save_db_struct(db._replace(dbImage=change(list(db.dbImage))), path)
    return db


@pytest.mark.parametrize("bad, message", [
    ("../outside.jpg", "climbs out"), ("000/../../outside.jpg", "climbs out"),
    ("/etc/passwd", "absolute path"), ("", "empty"), (7.0, "not a file name")])
def test_a_mat_name_that_leaves_the_root_is_refused(city, bad, message, capsys):
    (city.parent / "outside.jpg").write_bytes(b"not part of the dataset")
    _with_db_names(city, "test", lambda names: [bad, *names[1:]])
    err = cli_error(capsys, ["check-data", "--root", city, "--split", "test"])
    assert "synthetic_test.mat" in err and "dbImageFns[0]" in err and message in err
    with pytest.raises(DataLayoutError, match=re.escape("dbImageFns[0]")):
        load_split(city, "test")


def test_numbers_where_mat_names_belong_are_a_clear_error(city, capsys):
    path = struct_path(city, "synthetic", "test")
    db = parse_db_struct(path)
    save_db_struct(db._replace(qImage=list(range(db.numQ))), path)
    err = cli_error(capsys, ["evaluate", "--data-root", city, "--untrained", "--preset",
                              "tiny", "--fp32"])
    assert "synthetic_test.mat" in err and "qImageFns[0]" in err


def _image_problem(city, kind, name):
    """Make database image `name` of `city` a `kind`: symlinks out of or in the root, a FIFO,
    a folder, a device."""
    path = city / name
    path.unlink()
    if kind == "symlink-out":
        (city.parent / "elsewhere.jpg").write_bytes((city / "000").glob("*.jpg").__next__()
                                                    .read_bytes())
        path.symlink_to(city.parent / "elsewhere.jpg")
    elif kind == "symlink-in":
        path.symlink_to(sorted((city / "000").glob("*.jpg"))[-1])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("kind, message", [
    ("symlink-out", "leads outside"), ("fifo", "FIFO"), ("folder", "a folder"),
    ("device", "character device")])
def test_an_image_that_is_not_a_file_in_the_root_is_named(city, kind, message, capsys,
                                                          no_hang):
    name = parse_db_struct(struct_path(city, "synthetic", "test")).dbImage[0]
    path = _image_problem(city, kind, name)
    err = cli_error(capsys, ["check-data", "--root", city, "--split", "test"])
    assert str(path) in err and message in err
    split = load_split(city, "test")
    with pytest.raises(DataLayoutError, match=message):
        WholeDataset(split.root, split.db)[0]


def test_a_symlink_inside_the_root_is_followed(city):
    name = parse_db_struct(struct_path(city, "synthetic", "test")).dbImage[0]
    path = _image_problem(city, "symlink-in", name)
    assert np.array_equal(np.asarray(load_image(path, city)),
                          np.asarray(load_image(path.resolve())))


def test_a_query_must_lie_in_the_query_folder(city, capsys):
    """A query name may not reach the database images beside `queries_real/` by a symlink."""
    split = load_split(city, "test")
    query = city / QUERIES_DIR / split.db.qImage[0]
    query.unlink()
    query.symlink_to(city / split.db.dbImage[0])
    err = cli_error(capsys, ["check-data", "--root", city, "--split", "test"])
    assert str(query) in err and "leads outside" in err


def test_a_vpr_folder_image_linking_outside_is_refused(micro_city, tmp_path, capsys):
    folder = tmp_path / "vpr" / "test"
    for sub in ("database", "queries"):
        (folder / sub).mkdir(parents=True)
    images = sorted((micro_city / "000").glob("*.jpg"))
    for i, image in enumerate(images[:4]):
        shutil.copy(image, folder / "database" / f"@0@{i}@.jpg")
    shutil.copy(images[5], folder / "queries" / "@0@1@.jpg")
    (folder / "database" / "@0@9@.jpg").symlink_to(images[6])  # outside tmp_path/vpr
    err = cli_error(capsys, ["check-data", "--root", tmp_path / "vpr", "--split", "test"])
    assert "@0@9@.jpg" in err and "leads outside" in err


# ---------------------------------------------------------------------------------------------
# 8. Images are read as they are: 16-bit, EXIF orientation, decompression bombs
# ---------------------------------------------------------------------------------------------


def test_a_16_bit_png_is_scaled_not_saturated(tmp_path):
    grey = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # PIL reads 16-bit grey as I;16 (or I)
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    assert rgb.shape == (2, 2, 3)
    assert rgb[..., 0].tolist() == [[0, 64], [128, 255]] and (rgb == rgb[..., :1]).all()
    assert np.allclose(to_image(Image.open(tmp_path / "deep.png"))[..., 1],
                       [[0, 64 / 255], [128 / 255, 1]])


@pytest.mark.parametrize("orientation, rotate", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    """EXIF Orientation 3, 6, 8: rotated 180, 90 clockwise, 90 counter-clockwise when read."""
    pixels = np.zeros((2, 3, 3), np.uint8)  # `pixels`: (H, W, 3), one bright corner
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    read = np.asarray(load_image(tmp_path / "photo.png"))
    assert np.array_equal(read, np.rot90(pixels, rotate))


def _bomb_png(path, width=40_000, height=40_000):
    """A PNG header claiming width x height 1-bit pixels (1.6 G): PIL refuses it as a bomb."""

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_a_clear_error(city, capsys):
    split = load_split(city, "test")
    path = city / split.db.dbImage[0]
    _bomb_png(path)
    with pytest.raises(DataLayoutError, match="cannot be read"):
        load_image(path)
    err = cli_error(capsys, ["check-data", "--root", city, "--split", "test"])
    assert str(path) in err and "decompression bomb" in err.lower()


# ---------------------------------------------------------------------------------------------
# 4. Caches are keyed by content and checked before use
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_run(micro_city, tmp_path_factory):
    """A private copy of the micro city and a finished 1-epoch run on it (16 x 24 images)."""
    base = tmp_path_factory.mktemp("own_run")
    city = Path(shutil.copytree(micro_city, base / "city"))
    config = _micro_config(city).replace(image_size=(16, 24), epochs=1, max_queries=4)
    with pytest.MonkeyPatch.context() as mp:  # the cache folder of every test (conftest)
        mp.setenv("NETVLAD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        tr.train(config, base / "run")
    return city, base / "run", config


def _copy(path, tmp_path):
    return Path(shutil.copytree(path, tmp_path / path.name))


def test_resume_refuses_train_images_replaced_in_place(own_run):
    city, run_dir, config = own_run
    image = city / load_split(city, "train").db.dbImage[-1]  # not the first: main read that
    old, stat = image.read_bytes(), image.stat()
    try:
        image.write_bytes(old[:-10] + b"\xff\xd9" * 5)  # another picture under the same name
        with pytest.raises(ValueError, match="other data"):
            tr.train(config.replace(epochs=2), run_dir, resume=True)
    finally:
        image.write_bytes(old)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not (run_dir / "log.json").read_text().count('"epoch": 1')


def test_the_fingerprint_sees_every_file_by_size_and_time(own_run, tmp_path):
    city, _, _ = own_run
    split = load_split(city, "train")
    before = data_fingerprint(split)
    last = city / split.db.dbImage[-1]
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 10**9))
    try:
        assert data_fingerprint(split) != before
    finally:
        os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns - 10**9))
    assert data_fingerprint(split) == before


def _centroid_setup(own_run):
    city, _, config = own_run
    split = load_split(city, "train")
    return split, config, centroids_path(config, split)


@pytest.mark.parametrize("damage", ["nan", "shape", "list", "alpha-string", "no-alpha"])
def test_a_bad_centroid_cache_is_recomputed_with_a_note(own_run, damage, capsys):
    split, config, path = _centroid_setup(own_run)
    good = load_torch_file(path, "centroid cache")
    bad = dict(good)
    if damage == "nan":
        bad["centroids"] = torch.full_like(good["centroids"], float("nan"))
    elif damage == "shape":
        bad["centroids"] = good["centroids"][:, :7]
    elif damage == "list":
        bad["centroids"] = good["centroids"].tolist()
    elif damage == "alpha-string":
        bad["alpha"] = "100"
    else:
        del bad["alpha"]
    torch.save(bad, path)
    model = make_model(config, split, torch.device("cpu"))
    assert "computing the centroids again" in capsys.readouterr().out
    assert torch.equal(model.pool.centroids.detach(), good["centroids"])
    again = load_torch_file(path, "centroid cache")
    assert torch.equal(again["centroids"], good["centroids"]) and again["alpha"] == good["alpha"]


def test_resume_from_a_nan_latest_is_refused(own_run, tmp_path, capsys):
    _, run_dir, config = own_run
    run_dir = _copy(run_dir, tmp_path)
    latest = load_torch_file(run_dir / "latest.pth")
    name = next(k for k, v in latest["model"].items() if v.is_floating_point())
    latest["model"][name] = torch.full_like(latest["model"][name], float("nan"))
    torch.save(latest, run_dir / "latest.pth")
    with pytest.raises(ValueError, match="NaN or infinite") as err:
        tr.train(config.replace(epochs=2), run_dir, resume=True)
    assert "latest.pth" in str(err.value) and name in str(err.value)


def test_evaluate_refuses_a_nan_checkpoint(own_run, tmp_path, capsys):
    city, run_dir, _ = own_run
    best = load_torch_file(run_dir / "best.pth")
    best["model"]["pool.centroids"] = best["model"]["pool.centroids"] * float("inf")
    torch.save(best, tmp_path / "best.pth")
    err = cli_error(capsys, ["evaluate", "--data-root", city, "--checkpoint",
                              tmp_path / "best.pth", "--fp32"])
    assert "best.pth" in err and "pool.centroids" in err and "NaN or infinite" in err


def test_a_wrong_shaped_feature_cache_is_encoded_again(own_run, capsys):
    city, _, config = own_run
    split = load_split(city, "val")
    encoder = build_model(num_clusters=4).encoder.eval().requires_grad_(False)
    dataset = whole_dataset(split, config)
    precision = resolve_precision("fp32", "cpu", verbose=False)
    first = stored_local_features(encoder, dataset, precision=precision)
    path = cache_dir() / "features" / f"{features_key(encoder, dataset, precision)}.npy"
    np.save(path, first[:, :100])  # right length and dtype, wrong shape
    capsys.readouterr()
    again = stored_local_features(encoder, dataset, precision=precision)
    assert "encoding again" in capsys.readouterr().out
    assert np.array_equal(again, first) and np.load(path).shape == first.shape
    first[0, 0, 0, 0] = np.nan
    np.save(path, first)
    assert np.isfinite(stored_local_features(encoder, dataset, precision=precision)).all()


# ---------------------------------------------------------------------------------------------
# 7. Every traceback becomes a message naming the file or flag
# ---------------------------------------------------------------------------------------------


def _damaged_checkpoint(run_dir, tmp_path, change):
    ckpt = load_torch_file(run_dir / "best.pth")
    change(ckpt)
    torch.save(ckpt, tmp_path / "best.pth")
    return tmp_path / "best.pth"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["config"].update(lr="0.01"), "lr"),
    (lambda c: c["config"].update(image_size=["16", 24]), "image_size"),
    (lambda c: c["config"].update(num_clusters=10**9), "num_clusters")])
def test_a_checkpoint_with_wrong_types_or_sizes_is_a_message(own_run, tmp_path, capsys,
                                                            change, message):
    city, run_dir, _ = own_run
    path = _damaged_checkpoint(run_dir, tmp_path, change)
    err = cli_error(capsys, ["evaluate", "--data-root", city, "--checkpoint", path, "--fp32"])
    assert str(path) in err and message in err


@pytest.mark.parametrize("key", ["rng", "optimizer", "history"])
def test_a_latest_without_its_state_is_a_message(own_run, tmp_path, capsys, key):
    city, run_dir, config = own_run
    run_dir = _copy(run_dir, tmp_path)
    latest = load_torch_file(run_dir / "latest.pth")
    del latest[key]
    torch.save(latest, run_dir / "latest.pth")
    with pytest.raises(ValueError, match=f"latest.pth cannot be resumed: its '{key}'"):
        tr.train(config.replace(epochs=2), run_dir, resume=True)


def test_a_run_config_with_strings_for_numbers_is_a_message(own_run, tmp_path):
    _, run_dir, config = own_run
    run_dir = _copy(run_dir, tmp_path)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "batch_size": "4"}))
    with pytest.raises(ValueError, match="config.json: setting batch_size is '4'"):
        tr.train(config, run_dir, resume=True)


def test_a_cache_folder_of_an_unknown_user_is_a_message(monkeypatch, capsys):
    monkeypatch.setenv("NETVLAD_CACHE_DIR", "~nouser_xyz/x")
    with pytest.raises(ValueError, match="NETVLAD_CACHE_DIR"):
        cache_dir()
    monkeypatch.setenv("NETVLAD_DATA_ROOT", "~nouser_xyz/data")
    with pytest.raises(ValueError, match="NETVLAD_DATA_ROOT"):
        default_data_root()


@pytest.mark.parametrize("text", ['{"cells": 3}', '[1, 2]', "not json", ""])
def test_run_notebooks_on_a_file_that_is_not_a_notebook(tmp_path, capsys, text):
    path = tmp_path / "x.ipynb"
    path.write_text(text)
    err = cli_error(capsys, ["run-notebooks", path])
    assert str(path) in err and "not a Jupyter notebook" in err
    assert path.read_text() == text


def test_run_notebooks_names_the_failing_cell(tmp_path, capsys):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# x"),
                                         nbformat.v4.new_code_cell("a = 1"),
                                         nbformat.v4.new_code_cell("1 / 0")])
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    before = path.read_text()
    err = cli_error(capsys, ["run-notebooks", path, "--timeout", "120"])
    assert str(path) in err and "cell 3" in err and "ZeroDivisionError" in err
    assert path.read_text() == before


# ---------------------------------------------------------------------------------------------
# 5. Real disk faults: a file size limit (RLIMIT_FSIZE) and a full tmpfs (downloads, below)
# ---------------------------------------------------------------------------------------------

_CHILD = """
import json, sys
from netvlad_tutorial import cli, config, weights
args = json.loads(sys.argv[1])
if "preset" in args:
    config.PRESETS["limited"] = config.TrainConfig.from_dict(args["preset"])
if "weights" in args:
    weights.REGISTRY["limited"] = weights.Weights(**args["weights"])
cli.main(args["argv"])
"""


def _fsize_limit(limit):
    """preexec_fn: files may grow to `limit` bytes; past it write() fails with EFBIG (SIGXFSZ,
    which would kill the process, is ignored)."""

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


def _child(args, env, limit=None, tmpfs=None):
    """Run the CLI (`args["argv"]`) in a child process under a real limit; (code, output)."""
    command = [sys.executable, "-c", _CHILD, json.dumps(args)]
    if tmpfs is not None:  # a private mount namespace: the tmpfs goes with the child
        command = ["unshare", "-rm", "sh", "-c",
                   f'mount -t tmpfs -o size=16k tmpfs "{tmpfs}" && exec "$@"', "sh", *command]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, preexec_fn=_fsize_limit(limit) if limit else None)
    return done.returncode, done.stdout + done.stderr


def _train_args(own_run, run_dir):
    city, _, config = own_run
    return {"preset": tr._config_json(config.replace(num_workers=0)),
            "argv": ["train", "--data-root", str(city), "--out", str(run_dir), "--preset",
                     "limited", "--fp32"]}


def test_train_at_a_file_size_limit_is_a_message(own_run, tmp_path):
    """The centroid cache fits (40 KB), the features do not (a note: not kept), the checkpoint
    does not either: exit 2 naming latest.pth, no traceback, no temporary file left."""
    run_dir = tmp_path / "run"
    code, out = _child(_train_args(own_run, run_dir), {"NETVLAD_CACHE_DIR": str(tmp_path / "c")},
                       limit=60_000)
    assert code == 2, out
    assert "Traceback" not in out and "[Errno None]" not in out and ": None" not in out
    error = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "cannot write" in error[0] and "latest.pth" in error[0]
    assert "features are not kept" in out
    assert json.loads((run_dir / "config.json").read_text())["seed"] == own_run[2].seed
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "latest.pth").exists()
    assert not list((tmp_path / "c").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# 6. The network has limits: timeouts, a size cap, partial and hand-placed files
# ---------------------------------------------------------------------------------------------


class _Server:
    """A server on 127.0.0.1 for `weights download`: `mode` "good", "silent" (never answers),
    "stall" (headers, then nothing) or "endless" (a body without end). Each handler stops by
    itself (after 30 s, or 256 MiB, or when the client goes)."""

    def __init__(self, data):
        self.data, self.mode, self.stop = data, "good", threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if server.mode == "silent":
                    server.stop.wait(30)
                    return
                self.send_response(200)
                if server.mode != "endless":
                    self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                if server.mode == "stall":
                    self.wfile.write(server.data[:10])
                    self.wfile.flush()
                    server.stop.wait(30)
                    return
                if server.mode == "endless":
                    try:
                        for _ in range(4096):
                            if server.stop.is_set():
                                break
                            self.wfile.write(b"\0" * 65536)
                    except OSError:  # the client has gone
                        pass
                    return
                self.wfile.write(server.data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A served Nanne-format model file with no published hash, and its registry entry."""
    torch.save({"state_dict": {"encoder.0.weight": torch.randn(64, 3, 3, 3),
                               "pool.centroids": torch.rand(4, 512),
                               "pool.conv.weight": torch.randn(4, 512, 1, 1)}},
               tmp_path / "model.pth.tar")
    served = _Server((tmp_path / "model.pth.tar").read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, served.url)
    served.entry = weights.Weights("test-model", "https://example.invalid/m", "model.pth.tar",
                                   None, "model", "test", "test")
    served.folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    yield served
    served.close()


def _left(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) \
        if folder.exists() else []


@pytest.mark.parametrize("mode", ["silent", "stall"])
def test_a_server_that_stops_answering_times_out(server, mode):
    server.mode = mode
    with pytest.raises(ValueError, match="timed out"):
        weights.download_weights(server.entry, progress=False, allow_unverified=True,
                                 timeout=0.5)
    assert _left(server.folder) == []


def test_an_endless_body_is_cut_at_the_cap(server):
    server.mode = "endless"
    with pytest.raises(ValueError, match="more than the 1,000,000 bytes"):
        weights.download_weights(server.entry, progress=False, allow_unverified=True,
                                 max_bytes=1_000_000)
    assert _left(server.folder) == []


def test_a_killed_download_leaves_a_partial_that_the_next_run_removes(server, capsys):
    server.folder.mkdir(parents=True)
    left = server.folder / ".model.pth.tar.0123abcd.download"
    left.write_bytes(b"half a download")
    path = weights.download_weights(server.entry, progress=False, allow_unverified=True)
    assert _left(server.folder) == ["model.pth.tar", "model.pth.tar.sha256"]
    assert path.read_bytes() == server.data and "Removed" in capsys.readouterr().out


def test_a_hand_placed_file_without_a_hash_is_checked_not_trusted(server, capsys):
    server.folder.mkdir(parents=True)
    placed = server.folder / "model.pth.tar"
    placed.write_bytes(server.data[: len(server.data) // 2])  # truncated, no sidecar
    with pytest.raises(ValueError, match="cannot be verified"):
        weights.download_weights(server.entry, progress=False)
    with pytest.raises(ValueError, match="truncated"):
        weights.download_weights(server.entry, progress=False, allow_unverified=True)
    placed.write_bytes(server.data)  # whole: its layout is checked and its hash recorded
    weights.download_weights(server.entry, progress=False, allow_unverified=True)
    sidecar = (server.folder / "model.pth.tar.sha256").read_text().split()[0]
    assert sidecar == hashlib.sha256(server.data).hexdigest()


def test_an_empty_sha256_sidecar_is_a_message(server, capsys):
    server.folder.mkdir(parents=True)
    (server.folder / "model.pth.tar").write_bytes(server.data)
    (server.folder / "model.pth.tar.sha256").write_text("")
    with pytest.raises(ValueError, match="model.pth.tar.sha256 holds no sha256"):
        weights.download_weights(server.entry, progress=False)


def _can_mount_tmpfs(folder):
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs tmpfs "{folder}"'],
        capture_output=True).returncode == 0


@pytest.mark.parametrize("fault", ["file size limit", "full tmpfs"])
def test_a_download_onto_a_full_disk_is_a_message(server, tmp_path, fault):
    """The 23 KB file does not fit under RLIMIT_FSIZE 20,000, nor on a 16 KiB tmpfs."""
    server.folder.mkdir(parents=True)
    if fault == "full tmpfs" and not _can_mount_tmpfs(server.folder):
        pytest.skip("cannot mount a tmpfs here (no unshare, or user namespaces are not allowed)")
    entry = {k: getattr(server.entry, k) for k in ("name", "url", "filename", "sha256",
                                                  "kind", "description", "usage")}
    code, out = _child({"weights": {**entry, "name": "limited"},
                        "argv": ["weights", "download", "limited", "--allow-unverified"]},
                       {"TORCH_HOME": str(tmp_path / "torch_home"),
                        weights.WEIGHTS_URL_ENV: server.url},
                       limit=20_000 if fault == "file size limit" else None,
                       tmpfs=server.folder if fault == "full tmpfs" else None)
    assert code == 2, out
    error = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "cannot write" in error[0] and "model.pth.tar" in error[0], out
    assert "Traceback" not in out and "[Errno None]" not in out
    assert _left(server.folder) == []


@pytest.mark.parametrize("field, value", [("utmDb", "text"), ("utmQ", [["a"], ["b"]])])
def test_text_where_mat_positions_belong_is_a_message(city, capsys, field, value):
    path = struct_path(city, "synthetic", "test")
    mat = loadmat(path)
    mat["dbStruct"][field][0, 0] = np.array(value, dtype=object)
    savemat(path, {"dbStruct": mat["dbStruct"]})
    err = cli_error(capsys, ["check-data", "--root", city, "--split", "test"])
    assert "synthetic_test.mat" in err and field in err


def test_a_vpr_name_with_nan_coordinates_is_a_message(micro_city, tmp_path, capsys):
    folder = tmp_path / "vpr"
    for sub in ("database", "queries"):
        (folder / sub).mkdir(parents=True)
    image = next((micro_city / "000").glob("*.jpg"))
    shutil.copy(image, folder / "database" / "@0@1@.jpg")
    shutil.copy(image, folder / "database" / "@nan@1@.jpg")
    shutil.copy(image, folder / "queries" / "@0@2@.jpg")
    err = cli_error(capsys, ["check-data", "--root", folder, "--split", "test"])
    assert "@nan@1@.jpg" in err and "easting/northing" in err


@pytest.mark.parametrize("text", ["[1, 2]", '"run"'])
def test_a_run_config_that_is_not_a_dict_is_a_message(own_run, tmp_path, text):
    _, run_dir, config = own_run
    run_dir = _copy(run_dir, tmp_path)
    (run_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json holds"):
        tr.train(config, run_dir, resume=True)
    (run_dir / "config.json").write_text(json.dumps(tr._config_json(config)))
    (run_dir / "data.json").write_text(text)
    with pytest.raises(ValueError, match="other data"):
        tr.train(config.replace(epochs=2), run_dir, resume=True)


def test_a_damaged_pca_file_is_a_message(own_run, tmp_path, capsys):
    """A PCA file (`--save-pca`) with NaN weights, or fitted for another input size."""
    city, run_dir, _ = own_run
    checkpoint = Path(shutil.copy(run_dir / "best.pth", tmp_path / "best.pth"))
    argv = ["evaluate", "--data-root", str(city), "--checkpoint", str(checkpoint), "--fp32",
            "--pca", "--pca-dim", "8"]
    assert cli_main([*argv, "--save-pca"]) is None
    side = pca_path(checkpoint, 8)
    good = load_torch_file(side)
    name = next(iter(good["state_dict"]))
    nan = {**good, "state_dict": {**good["state_dict"],
                                  name: good["state_dict"][name] * float("nan")}}
    for damaged in (nan, {**good, "in_dim": 7}):
        torch.save(damaged, side)
        assert str(side) in cli_error(capsys, argv)


def test_overwrite_and_resume_delete_only_the_runs_own_files(own_run, tmp_path):
    """`--overwrite` removes the run's files and its PCA files, not a user's `.notes.tmp` or
    `my.pca8.pth` beside them; `--resume` removes only the run files' temporary files."""
    _, run_dir, config = own_run
    run_dir = _copy(run_dir, tmp_path)
    mine = {".notes.tmp": b"mine", "my.pca8.pth": b"mine too", "notes.txt": b"and this"}
    for name, data in mine.items():
        (run_dir / name).write_bytes(data)
    (run_dir / ".latest.pth.abc123.tmp").write_bytes(b"left by a kill")
    (run_dir / "best.pca8.pth").write_bytes(b"the old run's PCA")
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    tr.train(config, run_dir, overwrite=True)
    assert {n: (run_dir / n).read_bytes() for n in mine} == mine
    assert not (run_dir / ".latest.pth.abc123.tmp").exists()
    assert not (run_dir / "best.pca8.pth").exists()


def test_too_few_negatives_names_the_setting(micro_city):
    """The tiny preset (n_neg_sample 200) on the micro city: the message names the setting."""
    db = load_split(micro_city, "train").db
    with pytest.raises(ValueError, match="n_neg_sample"):
        NegativeSampler(db).sample(0, db.numDb, np.random.default_rng(0))


def test_a_file_added_while_a_city_is_generated_is_kept(city, monkeypatch):
    real = synthetic._write_city

    def user_adds_a_file(*args):
        real(*args)
        (city / "000" / "added_meanwhile.txt").write_bytes(b"mine")

    monkeypatch.setattr(synthetic, "_write_city", user_adds_a_file)
    make_synthetic_city(city, preset="micro", seed=1)
    monkeypatch.undo()
    make_synthetic_city(city, preset="micro", seed=2)  # removes only marked leftovers
    kept = list(city.parent.glob(".city.*.partial/city/000/added_meanwhile.txt"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"mine"
    assert city_is_current(city, "micro", 2)



_MEMMAP_CHILD = (
    "import numpy as np, sys\n"
    "from netvlad_tutorial.features import _new_array\n"
    "try:\n"
    "    array = _new_array((4096, 1024), np.float16, sys.argv[1])\n"
    "    array[:] = 1\n"  # every page written: on a full disk without the blocks, SIGBUS
    "    array.flush()\n"
    "except OSError as err:\n"
    "    print('error:', err); sys.exit(2)\n")


@pytest.mark.parametrize("fault", ["file size limit", "full tmpfs"])
def test_a_disk_backed_cache_on_a_full_disk_is_a_message_not_a_crash(tmp_path, fault):
    """A disk-backed cache (`cache_storage="disk"`, 8 MiB here) is a memory map: on a full
    disk, writing a page whose block could not be allocated kills the process with SIGBUS.
    Its blocks are allocated first, so both faults are an OSError naming the file."""
    folder = tmp_path / "cache"
    folder.mkdir()
    command = [sys.executable, "-c", _MEMMAP_CHILD, str(folder / "descriptor_cache.npy")]
    if fault == "full tmpfs":
        if not _can_mount_tmpfs(folder):
            pytest.skip("cannot mount a tmpfs here (no unshare, or user namespaces are not "
                        "allowed)")
        command = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{folder}" '
                   '&& exec "$@"', "sh", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          preexec_fn=_fsize_limit(1 << 20) if fault == "file size limit"
                          else None)
    assert done.returncode == 2, (done.returncode, done.stdout + done.stderr)
    assert f"cannot write {folder / 'descriptor_cache.npy'}" in done.stdout
