"""The data layer against hand-written .mat files, brute-force distances and files on disk."""

import numpy as np
import pytest
import torch
from oracles import brute_negatives, brute_positives
from PIL import Image
from scipy.io import savemat
from scipy.stats import chisquare

from netvlad_tutorial.data import (
    NegativeSampler,
    WholeDataset,
    eval_positives,
    load_split,
    parse_folder_dataset,
    positives_within,
    train_positives,
)
from netvlad_tutorial.datacheck import check_data, format_report
from netvlad_tutorial.dbstruct import (
    QUERIES_DIR,
    DataLayoutError,
    DbStruct,
    parse_db_struct,
    save_db_struct,
    struct_path,
)
from netvlad_tutorial.images import input_transform


def _random_db(rng, num_places=30, views=4, num_q=12, timestamps=False):
    """Places on a 200 m square, `views` database images per place, queries near places."""
    places = rng.uniform(0, 200, (num_places, 2)) + (585_000, 4_477_000)
    utm_db = np.repeat(places, views, axis=0)
    utm_q = places[rng.integers(0, num_places, num_q)] + rng.normal(0, 6, (num_q, 2))
    db_names = [f"{i // views // 1000:03d}/{i // views:06d}_pitch1_yaw{i % views + 1}.jpg"
                for i in range(len(utm_db))]
    q_names = [f"000/{j:06d}_pitch1_yaw1.jpg" for j in range(num_q)]
    times = (rng.integers(0, 3, len(utm_db)), rng.integers(0, 3, num_q)) if timestamps else ()
    return DbStruct("train", "toy", db_names, utm_db, q_names, utm_q, len(utm_db), num_q,
                    25, 625, 100, *times)


def _assert_same(a, b):
    assert a._fields == b._fields
    for name, x, y in zip(a._fields, a, b):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x == y and type(x) is type(y), name


def _cell(names):
    cell = np.empty((len(names), 1), dtype=object)
    cell[:, 0] = names
    return cell


def _write_real_order(db, path, extra_field=False):
    """A dbStruct written by hand like the released files: real field order, float counts."""
    fields = [("whichSet", db.whichSet), ("dbImageFns", _cell(db.dbImage)),
              ("utmDb", db.utmDb.T)]
    if db.dbTimeStamp is not None:
        fields.append(("dbTimeStamp", db.dbTimeStamp[None].astype(float)))
    fields += [("qImageFns", _cell(db.qImage)), ("utmQ", db.utmQ.T)]
    if db.dbTimeStamp is not None:
        fields.append(("qTimeStamp", db.qTimeStamp[None].astype(float)))
    fields += [("numImages", float(db.numDb)), ("numQueries", float(db.numQ)),
               ("posDistThr", 25.0), ("posDistSqThr", 625.0), ("nonTrivPosDistSqThr", 100.0)]
    if extra_field:
        fields.append(("cutoffs", np.zeros((1, 3))))
    savemat(path, {"dbStruct": dict(fields)})


# ---------------------------------------------------------------------------------------------
# .mat files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("float_counts", [False, True])
def test_save_then_parse_round_trip(tmp_path, float_counts):
    db = _random_db(np.random.default_rng(0))
    path = save_db_struct(db, tmp_path / "toy_train.mat", float_counts=float_counts)
    parsed = parse_db_struct(path)
    expected = db._replace(posDistThr=25.0, posDistSqThr=625.0, nonTrivPosDistSqThr=100.0) \
        if float_counts else db
    _assert_same(parsed, expected)
    assert type(parsed.numDb) is int and type(parsed.numQ) is int


def test_saved_bytes_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    import time  # scipy writes `time.asctime()` into the header; ours must not carry it

    db = _random_db(np.random.default_rng(0))
    files = []
    for i, clock in enumerate(["Mon Jan  1 00:00:00 2001", "Tue Feb  2 11:11:11 2022"]):
        monkeypatch.setattr(time, "asctime", lambda *args, clock=clock: clock)
        files.append(save_db_struct(db, tmp_path / str(i) / "toy_train.mat").read_bytes())
    assert files[0] == files[1] and files[0].startswith(b"MATLAB 5.0 MAT-file")
    _assert_same(parse_db_struct(tmp_path / "1" / "toy_train.mat"), db)


def test_real_field_order_with_float_counts_parses_like_ours(tmp_path):
    db = _random_db(np.random.default_rng(1))
    _write_real_order(db, tmp_path / "toy_train.mat")
    save_db_struct(db, tmp_path / "ours" / "toy_train.mat", float_counts=True)
    theirs = parse_db_struct(tmp_path / "toy_train.mat")
    _assert_same(theirs, parse_db_struct(tmp_path / "ours" / "toy_train.mat"))
    assert theirs.numDb == 120 and type(theirs.numDb) is int
    assert theirs.dbImage[5] == "000/000001_pitch1_yaw2.jpg"
    assert theirs.utmDb.shape == (120, 2) and theirs.dataset == "toy"


@pytest.mark.parametrize("extra_field", [False, True])
def test_tokyo_tm_layout_with_timestamps(tmp_path, extra_field):
    db = _random_db(np.random.default_rng(2), timestamps=True)
    _write_real_order(db, tmp_path / "tokyoTM_train.mat", extra_field=extra_field)
    parsed = parse_db_struct(tmp_path / "tokyoTM_train.mat")
    np.testing.assert_array_equal(parsed.dbTimeStamp, db.dbTimeStamp)
    np.testing.assert_array_equal(parsed.qTimeStamp, db.qTimeStamp)
    assert parsed.dataset == "tokyoTM" and parsed.numQ == db.numQ
    np.testing.assert_array_equal(parsed.utmQ, db.utmQ)
    # Written back by us, it reads the same.
    _assert_same(parse_db_struct(save_db_struct(parsed, tmp_path / "b" / "tokyoTM_train.mat")),
                 parsed._replace(posDistThr=25, posDistSqThr=625, nonTrivPosDistSqThr=100))


def test_struct_path():
    assert struct_path("/data/P", "pitts30k", "val").as_posix() == \
        "/data/P/netvlad_v100_datasets/datasets/pitts30k_val.mat"


def test_missing_mat_names_file_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope_train.mat") as err:
        parse_db_struct(tmp_path / "nope_train.mat")
    assert "netvlad_v100_datasets" in str(err.value)


def test_mat_without_dbstruct(tmp_path):
    savemat(tmp_path / "x_train.mat", {"somethingElse": np.ones(3)})
    with pytest.raises(DataLayoutError, match="x_train.mat") as err:
        parse_db_struct(tmp_path / "x_train.mat")
    assert "no `dbStruct`" in str(err.value) and "somethingElse" in str(err.value)


def test_mat_with_dbstruct_not_a_struct(tmp_path):
    savemat(tmp_path / "x_train.mat", {"dbStruct": np.ones((2, 3))})
    with pytest.raises(DataLayoutError, match="x_train.mat: `dbStruct` is not a single"):
        parse_db_struct(tmp_path / "x_train.mat")


def test_not_a_mat_file(tmp_path):
    (tmp_path / "x_train.mat").write_text("hello")
    with pytest.raises(DataLayoutError, match="x_train.mat: not a readable"):
        parse_db_struct(tmp_path / "x_train.mat")


def test_mat_with_wrong_field_count(tmp_path):
    savemat(tmp_path / "x_train.mat", {"dbStruct": {"whichSet": "train", "a": 1, "b": 2}})
    with pytest.raises(DataLayoutError, match="lacks the field") as err:
        parse_db_struct(tmp_path / "x_train.mat")
    assert "x_train.mat" in str(err.value) and "dbImageFns" in str(err.value)


def test_mat_with_inconsistent_counts(tmp_path):
    db = _random_db(np.random.default_rng(3))
    save_db_struct(db._replace(numDb=db.numDb + 1), tmp_path / "x_train.mat")
    with pytest.raises(DataLayoutError, match="sizes disagree"):
        parse_db_struct(tmp_path / "x_train.mat")


# ---------------------------------------------------------------------------------------------
# Positives and negatives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [10, 25, 60])
def test_positives_within_equals_brute_force(radius):
    db = _random_db(np.random.default_rng(4), num_q=40)
    got = positives_within(db, radius)
    want = brute_positives(db, radius)
    assert len(got) == db.numQ
    for g, w in zip(got, want):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)
    assert any(len(w) == 0 for w in brute_positives(db, 10))  # the case of none is covered


def test_eval_and_train_positives_and_tokyo_time_rule():
    db = _random_db(np.random.default_rng(5), num_q=40, timestamps=True)
    for g, w in zip(eval_positives(db), brute_positives(db, 25)):
        np.testing.assert_array_equal(g, w)
    train = train_positives(db)  # TokyoTM: different timestamps only
    for g, w in zip(train, brute_positives(db, 10, different_time=True)):
        np.testing.assert_array_equal(g, w)
    assert sum(map(len, train)) < sum(map(len, brute_positives(db, 10)))
    plain = train_positives(db._replace(dbTimeStamp=None, qTimeStamp=None))
    for g, w in zip(plain, brute_positives(db, 10)):
        np.testing.assert_array_equal(g, w)


def test_sampled_negatives_are_far_distinct_and_deterministic():
    db = _random_db(np.random.default_rng(6), num_q=20)
    sampler = NegativeSampler(db)
    rng = np.random.default_rng(0)
    for q in range(db.numQ):
        negatives = brute_negatives(db, q)
        assert sampler.count(q) == len(negatives)
        for n in (1, 10, len(negatives) // 2 + 1, len(negatives)):  # rejection and direct paths
            s = sampler.sample(q, n, rng)
            assert s.dtype == np.int64 and len(s) == n and len(set(s.tolist())) == n
            assert set(s.tolist()) <= negatives
    a = sampler.sample(3, 15, np.random.default_rng(42))
    np.testing.assert_array_equal(a, sampler.sample(3, 15, np.random.default_rng(42)))


@pytest.mark.parametrize("n", [3, 9])  # 3: rejection sampling; 9 of 12: the direct path
def test_sampled_negatives_are_uniform(n):
    # 4 places near the query (positives), 12 far ones (the negatives), 3 views each.
    near = [[585_000 + 5 * i, 4_477_000] for i in range(4)]
    far = [[585_000 + 100 + 7 * i, 4_477_000 + 50] for i in range(12)]
    utm_db = np.repeat(np.array(near + far, float), 3, axis=0)
    db = DbStruct("train", "toy", [f"{i}.jpg" for i in range(48)], utm_db, ["q.jpg"],
                  np.array([[585_000.0, 4_477_000.0]]), 48, 1, 25, 625, 100)
    negatives = sorted(brute_negatives(db, 0))
    assert len(negatives) == 36
    rng, counts = np.random.default_rng(0), np.zeros(48)
    draws = 3000
    for _ in range(draws):
        np.add.at(counts, NegativeSampler(db).sample(0, n, rng), 1)
    assert counts[:12].sum() == 0 and (counts[negatives] > 0).all()
    expected = draws * n / len(negatives)
    assert chisquare(counts[negatives], np.full(36, expected)).pvalue > 1e-3


def test_too_few_negatives_is_an_error():
    db = _random_db(np.random.default_rng(7), num_q=3)
    sampler = NegativeSampler(db)
    with pytest.raises(ValueError, match="only"):
        sampler.sample(0, sampler.count(0) + 1, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Images, datasets and layouts on disk
# ---------------------------------------------------------------------------------------------


def _write_pittsburgh(root, db, size=(12, 16)):
    """Images for every name of `db` (colour = index) and its .mat, in the Pittsburgh layout."""
    for i, name in enumerate(db.dbImage):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size[::-1], (i % 256, 10, 200)).save(path)
    for j, name in enumerate(db.qImage):
        path = root / QUERIES_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size[::-1], (j % 256, 200, 10)).save(path, quality=100)
    save_db_struct(db, struct_path(root, db.dataset, db.whichSet))
    return root


@pytest.fixture
def toy_root(tmp_path):
    db = _random_db(np.random.default_rng(8), num_places=5, views=2, num_q=4)
    db = db._replace(qImage=[f"000/{j:06d}_pitch1_yaw1.jpg" for j in range(db.numQ)])
    return _write_pittsburgh(tmp_path / "toy", db), db


def test_input_transform_matches_manual_normalization():
    img = Image.fromarray(np.random.default_rng(9).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    x = input_transform()(img)
    manual = (torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
              - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(x, manual)
    assert input_transform((3, 4))(img).shape == (3, 3, 4)


@pytest.mark.parametrize("resize", [None, (12, 16), (7, 9), (30, 41)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_input_transform_equals_torchvisions_bit_for_bit(resize, mode):
    """The package does not import torchvision; its transform gives torchvision's tensors."""
    from torchvision import transforms

    pixels = np.random.default_rng(10).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    steps = [transforms.Resize(resize)] if resize is not None else []
    theirs = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(
        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    torch.testing.assert_close(input_transform(resize)(img), theirs(img.convert("RGB")),
                               atol=0, rtol=0)


def test_whole_dataset_is_database_then_queries(toy_root):
    root, db = toy_root
    ds = WholeDataset(root, db)
    assert len(ds) == db.numDb + db.numQ == len(ds.paths)
    assert ds.paths[db.numDb] == root / "queries_real" / db.qImage[0]
    for i in (0, db.numDb - 1, db.numDb, len(ds) - 1):
        x, index = ds[i]
        assert index == i and x.shape == (3, 12, 16)
        with Image.open(ds.paths[i]) as img:
            torch.testing.assert_close(x, input_transform()(img.convert("RGB")))
    # Query pixels are green-ish (200 in G), database pixels blue-ish: queries come from
    # queries_real/, not from the root.
    assert ds[db.numDb][0][1].mean() > ds[db.numDb][0][2].mean()
    assert ds[0][0][2].mean() > ds[0][0][1].mean()


def test_corrupt_and_missing_images_name_the_file(toy_root):
    root, db = toy_root
    (root / db.dbImage[1]).write_bytes(b"not a jpeg")
    (root / db.dbImage[2]).unlink()
    ds = WholeDataset(root, db)
    with pytest.raises(DataLayoutError, match=db.dbImage[1]):
        ds[1]
    with pytest.raises(FileNotFoundError, match=db.dbImage[2]):
        ds[2]
    with pytest.raises(DataLayoutError) as err:
        check_data(root)
    text = str(err.value)
    assert db.dbImage[1] in text and db.dbImage[2] in text and "missing" in text
    assert "2 of 14 images" in text and "Pittsburgh layout" in text


def test_truncated_image_found_when_decoding(toy_root):
    root, db = toy_root
    path = root / db.dbImage[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataLayoutError, match=db.dbImage[0]):
        check_data(root, split="train", decode=True)


def test_root_without_queries_folder(toy_root):
    root, db = toy_root
    (root / "queries_real").rename(root / "queries")
    for call in (lambda: WholeDataset(root, db), lambda: check_data(root)):
        with pytest.raises(FileNotFoundError, match="queries_real") as err:
            call()
        assert "Pittsburgh layout" in str(err.value)


def test_check_data_report_matches_brute_force(toy_root):
    root, db = toy_root
    report = check_data(root)
    assert report["root"] == str(root) and len(report["splits"]) == 1
    r = report["splits"][0]
    ev = [len(p) for p in brute_positives(db, 25)]
    tr = [len(p) for p in brute_positives(db, 10)]
    assert (r["num_db"], r["num_q"], r["images_checked"]) == (10, 4, 14)
    assert r["eval_positives"] == {"min": min(ev), "median": float(np.median(ev)),
                                   "max": max(ev)}
    assert r["queries_without_train_positives"] == tr.count(0)
    assert check_data(root, struct_file="toy_train.mat") == report
    assert check_data(root, struct_file=struct_path(root, "toy", "train")) == report
    text = format_report(report)
    assert "toy_train" in text and "14 images" in text


def test_check_data_on_empty_root_explains_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no split found") as err:
        check_data(tmp_path)
    assert "netvlad_v100_datasets" in str(err.value) and "@UTM_EAST" in str(err.value)


def _vpr_name(east, north, i):
    return f"@{east:.2f}@{north:.2f}@17@T@40.44{i}@-79.99@pano{i}@@{i * 30}@@@@@@.jpg"


def test_folder_layout(tmp_path):
    rng = np.random.default_rng(10)
    utm = {"database": rng.uniform(0, 100, (6, 2)) + (585_000, 4_477_000),
           "queries": rng.uniform(0, 100, (3, 2)) + (585_000, 4_477_000)}
    for kind, points in utm.items():
        (tmp_path / "test" / kind).mkdir(parents=True)
        for i, (e, n) in enumerate(points):
            Image.new("RGB", (8, 6)).save(tmp_path / "test" / kind / _vpr_name(e, n, i))
    db = parse_folder_dataset(tmp_path / "test")
    order = np.argsort([_vpr_name(e, n, i) for i, (e, n) in enumerate(utm["database"])])
    np.testing.assert_allclose(db.utmDb, utm["database"][order], atol=0.006)
    assert db.dbImage[0].startswith("database/@") and not db.qImage[0].startswith("queries")
    assert (db.numDb, db.numQ, db.posDistThr, db.nonTrivPosDistSqThr) == (6, 3, 25, 100)
    split = load_split(tmp_path, "test")
    assert split.root == tmp_path / "test" and split.queries_dir == "queries"
    ds = WholeDataset(split.root, split.db, queries_dir=split.queries_dir)
    assert len(ds) == 9 and ds[8][1] == 8
    assert check_data(tmp_path)["splits"][0]["num_db"] == 6
    # Plain ROOT/database + ROOT/queries serves any split name.
    assert load_split(tmp_path / "test", "val").db.whichSet == "val"


def test_folder_layout_bad_name(tmp_path):
    for kind in ("database", "queries"):
        (tmp_path / kind).mkdir()
        Image.new("RGB", (8, 6)).save(tmp_path / kind / "photo.jpg")
    with pytest.raises(DataLayoutError, match="photo.jpg") as err:
        parse_folder_dataset(tmp_path)
    assert "@utm_easting@utm_northing" in str(err.value)


def test_load_split_needs_a_name_when_ambiguous(toy_root):
    root, db = toy_root
    save_db_struct(db._replace(dataset="other"), struct_path(root, "other", "train"))
    with pytest.raises(DataLayoutError, match="other_train.mat"):
        load_split(root, "train")
    assert load_split(root, "train", name="toy").db.dataset == "toy"
    with pytest.raises(FileNotFoundError, match="val"):
        load_split(root, "val")
