"""The synthetic city: exact Pittsburgh layout, a real recognition problem, determinism."""

import hashlib
import re

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from scipy.spatial.distance import cdist

from netvlad_tutorial import synthetic
from netvlad_tutorial.data import load_split
from netvlad_tutorial.dbstruct import (
    DATASETS_DIR,
    SPLITS,
    parse_db_struct,
    save_db_struct,
    struct_path,
)
from netvlad_tutorial.synthetic import (
    PRESETS,
    Preset,
    ensure_synthetic_city,
    make_synthetic_city,
)
from netvlad_tutorial.viz import plot_city_map, show_city

NAME = re.compile(r"^\d{3}/\d{6}_pitch\d_yaw\d{1,2}\.jpg$")


@pytest.fixture
def city(tiny_city):
    """The tiny city (seed 0) that `conftest.py` generates once per session."""
    return tiny_city


@pytest.fixture
def quick_preset(monkeypatch):
    """The name of a 2-street-per-split preset added for the test, to try seeds and sizes."""
    monkeypatch.setitem(PRESETS, "quick-test", Preset((48, 64), {"train": 2, "val": 1, "test": 1},
                                                      places_per_street=4, queries_per_street=3))
    return "quick-test"


def _file_hashes(root, pattern="*.jpg"):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file()}


def _structs(root):
    return [parse_db_struct(struct_path(root, "synthetic", s)) for s in SPLITS]


def test_pittsburgh_layout(city):
    files = {p.relative_to(city).as_posix() for p in city.rglob("*") if p.is_file()}
    mats = {(DATASETS_DIR / f"synthetic_{s}.mat").as_posix() for s in SPLITS}
    assert mats <= files
    named = set(mats) | {synthetic.STAMP_NAME}  # the .mat files, the stamp, the images
    for db in _structs(city):
        assert all(NAME.match(n) for n in db.dbImage + db.qImage)
        named |= set(db.dbImage) | {f"queries_real/{n}" for n in db.qImage}
    assert files == named  # every image is listed, every listed image exists
    with Image.open(city / _structs(city)[0].dbImage[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (128, 96))


def test_structs_sizes_and_thresholds(city):
    preset = PRESETS["tiny"]
    for db, split in zip(_structs(city), SPLITS):
        streets = preset.streets[split]
        assert db.whichSet == split and db.dataset == "synthetic"
        assert db.numDb == len(db.dbImage) == streets * preset.places_per_street * 4
        assert db.numQ == len(db.qImage) == streets * preset.queries_per_street[split]
        assert (db.posDistThr, db.posDistSqThr, db.nonTrivPosDistSqThr) == (25, 625, 100)
        assert 584_000 < db.utmDb[:, 0].min() and db.utmDb[:, 1].max() < 4_480_000
        # Several views per place, all at the place's position.
        assert len(np.unique(db.utmDb, axis=0)) == db.numDb // 4
        # Names are unique across splits (one global numbering, as in Pittsburgh).
    names = [n for db in _structs(city) for n in db.dbImage]
    assert len(set(names)) == len(names)


def test_every_query_has_a_training_positive(city):
    for db in _structs(city):
        d = cdist(db.utmQ, db.utmDb)  # brute force
        assert (d.min(axis=1) <= 10).all()
        assert np.median((d <= 25).sum(axis=1)) >= 12  # a few places within 25 m


def test_splits_are_geographically_disjoint(city):
    train, val, test = _structs(city)
    train_points = np.vstack([train.utmDb, train.utmQ])
    for other in (val, test):
        assert cdist(train_points, np.vstack([other.utmDb, other.utmQ])).min() > 25
    assert cdist(val.utmDb, test.utmDb).min() > 25


def test_neighbouring_places_look_alike(city):
    """Raw-pixel nearest neighbours of database views are mostly views of nearby places."""
    db = _structs(city)[0]
    thumbs = np.stack([np.asarray(Image.open(city / n).convert("L").resize((16, 12)), float)
                       for n in db.dbImage]).reshape(db.numDb, -1)
    d = cdist(thumbs, thumbs)
    same_place = cdist(db.utmDb, db.utmDb) < 1e-6
    d[same_place] = np.inf  # another place's view, not the same place's
    nearest = d.argmin(axis=1)
    geo = np.linalg.norm(db.utmDb - db.utmDb[nearest], axis=1)
    chance = ((cdist(db.utmDb, db.utmDb) <= 25) & ~same_place).sum() / (db.numDb * (db.numDb - 4))
    assert np.mean(geo <= 25) > 3 * chance


def test_mat_files_round_trip(city, tmp_path):
    for db in _structs(city):
        again = parse_db_struct(save_db_struct(db, tmp_path / f"synthetic_{db.whichSet}.mat"))
        for name, x, y in zip(db._fields, db, again):
            np.testing.assert_array_equal(np.asarray(x, dtype=object), np.asarray(y, dtype=object),
                                          err_msg=name)


def test_same_seed_same_bytes(quick_preset, tmp_path):
    a = make_synthetic_city(tmp_path / "a", preset=quick_preset, seed=5)
    b = make_synthetic_city(tmp_path / "b", preset=quick_preset, seed=5)
    assert _file_hashes(a) == _file_hashes(b) and len(_file_hashes(a)) == 4 * 4 * 4 + 4 * 3
    everything = _file_hashes(a, "*")  # the `.mat` files and the stamp too: no clock inside
    assert everything == _file_hashes(b, "*") and len(everything) == 4 * 4 * 4 + 4 * 3 + 3 + 1
    for x, y in zip(_structs(a), _structs(b)):
        for name, u, v in zip(x._fields, x, y):
            np.testing.assert_array_equal(np.asarray(u, dtype=object),
                                          np.asarray(v, dtype=object), err_msg=name)


def test_other_seed_and_image_size(quick_preset, tmp_path):
    a = make_synthetic_city(tmp_path / "a", preset=quick_preset, seed=1)
    b = make_synthetic_city(tmp_path / "b", preset=quick_preset, seed=2, image_size=(30, 40))
    ha, hb = _file_hashes(a), _file_hashes(b)
    assert len(ha) == len(hb) and not set(ha.values()) & set(hb.values())
    assert not np.allclose(_structs(a)[0].utmQ, _structs(b)[0].utmQ)
    with Image.open(a / _structs(a)[0].dbImage[0]) as img:
        assert img.size == (64, 48)
    with Image.open(b / "queries_real" / _structs(b)[2].qImage[0]) as img:
        assert img.size == (40, 30)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        make_synthetic_city("unused", preset="huge")


def test_render_sees_the_street():
    """Looking straight at the left facades: facade colours fill the middle, sky is above."""
    rng = np.random.default_rng(0)
    street = synthetic._make_street(rng, synthetic.make_styles(rng), np.zeros(2),
                                    np.array([1.0, 0.0]), 100.0, 16)
    look = synthetic.Look((0, 0, 255), (0, 0, 255), 1e9, (1.0, 1.0, 1.0))
    up = np.asarray(synthetic.render(street, synthetic.Camera(50, 0, 2.5, 90, 80), look, (24, 32)))
    # Pitched up by 80 degrees: beyond the roofs, pure sky blue at the top.
    assert (up[0] == (0, 0, 255)).all()
    ahead = np.asarray(synthetic.render(street, synthetic.Camera(50, 0, 2.5, 90, 0), look,
                                        (24, 32)))
    # Facing the facade at 8-10 m: its centre is facade texture, not sky.
    texel = street.left[street.left.shape[0] - 1 - int(2.5 * 16), int((50 - street.x0) * 16)]
    np.testing.assert_allclose(ahead[12, 16], texel[:3], atol=40)


def test_figures(city):
    fig = show_city(city, split="val", num_places=2, max_views=4, max_queries=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 6
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(t.startswith("db ") for t in titles) == 8
    assert sum(t.startswith("query") for t in titles) >= 2
    fig = plot_city_map([load_split(city, s).db for s in SPLITS])
    assert isinstance(fig, Figure) and len(fig.axes[0].collections) == 6


def test_an_out_of_date_city_is_generated_again(tmp_path, capsys):
    root = tmp_path / "city"
    assert ensure_synthetic_city(root, preset="micro") == root
    stamp = root / synthetic.STAMP_NAME
    assert synthetic.city_is_current(root, preset="micro")
    assert not synthetic.city_is_current(root, preset="micro", seed=1)
    first = root / load_split(root, "train").db.dbImage[0]
    before = first.read_bytes()
    # Same settings: nothing happens. An older stamp: the city is generated again, identically.
    stamp_time = stamp.stat().st_mtime_ns
    ensure_synthetic_city(root, preset="micro")
    assert stamp.stat().st_mtime_ns == stamp_time
    stamp.write_text('{"preset": "micro", "streets": "from an older version"}')
    first.write_bytes(b"stale")
    ensure_synthetic_city(root, preset="micro")
    assert "older version" in capsys.readouterr().out
    assert synthetic.city_is_current(root, preset="micro") and first.read_bytes() == before
    # A folder that is not a synthetic city is never deleted.
    other = tmp_path / "mine"
    (other / "photos").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a synthetic city"):
        ensure_synthetic_city(other, preset="micro")
    assert (other / "photos").is_dir()
