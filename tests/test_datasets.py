"""GardensPoint Walking, opt in: download, check and unpack, served from 127.0.0.1 only."""

import hashlib
import io
import zipfile

import numpy as np
import pytest
from oracles import FileServer
from PIL import Image
from scipy.signal import convolve2d

from netvlad_tutorial import datasets
from netvlad_tutorial.cli import main
from netvlad_tutorial.data import eval_positives, load_split
from netvlad_tutorial.datasets import (
    download_gardens_point,
    frame_ground_truth,
    gardens_point,
    is_downloaded,
)

NUM_FRAMES = 4


def jpeg(value):
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), (value, 255 - value, 7)).save(buf, format="JPEG")
    return buf.getvalue()


def archive_bytes(num_db=NUM_FRAMES, num_q=NUM_FRAMES, top="GardensPoint_Walking/"):
    """A zip in the authors' layout: day_left, day_right and night_right, Image000.jpg ...,
    plus what a real archive may hold beside them (a macOS metadata file, a stray path)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for folder, n, base in [("day_left", 2, 0), ("day_right", num_db, 10),
                                ("night_right", num_q, 100)]:
            for i in reversed(range(n)):  # stored out of order: frame order is by name
                z.writestr(f"{top}{folder}/Image{i:03d}.jpg", jpeg(base + i))
        z.writestr(f"__MACOSX/{top}day_right/._Image000.jpg", b"metadata")
        z.writestr("../outside.jpg", jpeg(1))
        z.writestr(f"{top}night_right/notes.txt", b"not an image")
    return buf.getvalue()


@pytest.fixture
def server():
    s = FileServer({"GardensPoint_Walking.zip": archive_bytes()})
    yield s
    s.close()


def test_download_unpacks_a_split_the_loaders_read(server, tmp_path):
    root = tmp_path / "data" / "gp"
    assert not is_downloaded(root)
    assert download_gardens_point(root, base_url=server.url, progress=False) == root
    assert server.requests == ["/GardensPoint_Walking.zip"]
    split = load_split(root, "test")
    db = split.db
    assert db.dbImage == [f"day_right/Image{i:03d}.jpg" for i in range(NUM_FRAMES)]
    assert db.qImage == [f"night_right/Image{i:03d}.jpg" for i in range(NUM_FRAMES)]
    for i in range(NUM_FRAMES):
        assert (root / db.dbImage[i]).read_bytes() == jpeg(10 + i)
        assert (root / "queries_real" / db.qImage[i]).read_bytes() == jpeg(100 + i)
    # evaluation positives: the same frame, and only it
    assert [p.tolist() for p in eval_positives(db)] == [[i] for i in range(NUM_FRAMES)]
    # nothing else was written: no day_left, no stray files, no archive (its hash stays); the
    # download's lock file (`files.folder_lock`) stays beside it
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.name != ".GardensPoint_Walking.zip.lock")
    assert files == sorted([*db.dbImage, *(f"queries_real/{q}" for q in db.qImage),
                            "netvlad_v100_datasets/datasets/gardens_point_test.mat",
                            "GardensPoint_Walking.zip.sha256"])
    assert not (tmp_path / "data" / "outside.jpg").exists()
    digest = hashlib.sha256(server.files["GardensPoint_Walking.zip"]).hexdigest()
    assert (root / "GardensPoint_Walking.zip.sha256").read_text().split()[0] == digest
    # a second call finds it and fetches nothing
    download_gardens_point(root, base_url=server.url, progress=False)
    assert len(server.requests) == 1
    loaded, (hard, soft) = gardens_point(root)
    assert loaded.db.dbImage == db.dbImage and hard.shape == soft.shape == (4, 4)


def test_a_later_download_must_match_the_first_hash(server, tmp_path):
    root = tmp_path / "gp"
    download_gardens_point(root, base_url=server.url, progress=False)
    datasets.struct_file(root).unlink()  # the reader removes the dataset, keeps the hash
    server.files["GardensPoint_Walking.zip"] = archive_bytes(top="")  # the archive changed
    with pytest.raises(ValueError, match="invalid hash value"):
        download_gardens_point(root, base_url=server.url, progress=False)
    assert not (root / "GardensPoint_Walking.zip").exists()


@pytest.mark.parametrize("data, message", [(b"<html>moved</html>", "not a readable zip"),
                                           (archive_bytes(num_q=3), "same number")])
def test_a_wrong_archive_leaves_nothing(tmp_path, data, message):
    s = FileServer({"GardensPoint_Walking.zip": data})
    try:
        with pytest.raises(ValueError, match=message):
            download_gardens_point(tmp_path / "gp", base_url=s.url, progress=False)
    finally:
        s.close()
    left = [p for p in (tmp_path / "gp").rglob("*")] if (tmp_path / "gp").exists() else []
    assert left == []


def test_cli_and_environment_variable(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(datasets.DATA_URL_ENV, server.url)
    main(["datasets", "download", "gardens-point", "--out", str(tmp_path / "gp")])
    assert "4 database images (day_right), 4 queries (night_right)" in capsys.readouterr().out
    assert server.requests == ["/GardensPoint_Walking.zip"]


def test_absent_dataset_says_how_to_get_it(tmp_path, capsys):
    assert gardens_point(tmp_path / "none") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and datasets.GET_GARDENS_POINT in out


def test_frame_ground_truth_is_the_tutorials_box_filter():
    hard, soft = frame_ground_truth(30)
    np.testing.assert_array_equal(hard, np.eye(30, dtype=bool))
    # the VPR tutorial: a 17-row box filter over the identity, 'same' size
    expected = convolve2d(np.eye(30, dtype=int), np.ones((17, 1), dtype=int), mode="same") > 0
    np.testing.assert_array_equal(soft, expected)
    hard, soft = frame_ground_truth(5, 3, tolerance=1)
    for i in range(5):
        for j in range(3):
            assert hard[i, j] == (i == j) and soft[i, j] == (abs(i - j) <= 1)


def test_cli_error_is_one_line(tmp_path, capsys):
    s = FileServer({})  # 404 for every file
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["datasets", "download", "gardens-point", "--out", str(tmp_path / "gp"),
                  "--base-url", s.url])
    finally:
        s.close()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gardens-point: download from") and err.count("\n") == 1
    assert not (tmp_path / "gp" / "GardensPoint_Walking.zip").exists()
