"""Stage 1: the datasets, exactly as the NetVLAD `.mat` files describe them.

A dataset split is a `DbStruct`: database and query image names with their UTM positions, read
from the authors' `netvlad_v100_datasets` files (Pittsburgh 250k/30k, Tokyo 24/7, TokyoTM) or
from a VPR-benchmark image folder. From the positions come the ground truth:
- evaluation positives: database images within `posDistThr` (25 m) of the query;
- training positives: within `sqrt(nonTrivPosDistSqThr)` (10 m);
- negatives: farther than 25 m (drawn on demand by `NegativeSampler`, never listed; what listing
  them would cost: `compare_negative_memory`).
"""

import hashlib
import os
import stat
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from scipy.io import loadmat, savemat
from scipy.io.matlab import MatReadError
from scipy.spatial import cKDTree
from torch.utils.data import Dataset
from tqdm import tqdm

from .utils import atomic_write, display_path, measure

QUERIES_DIR = "queries_real"
DATASETS_DIR = Path("netvlad_v100_datasets") / "datasets"
SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

DbStruct = namedtuple(
    "DbStruct",
    ["whichSet", "dataset", "dbImage", "utmDb", "qImage", "utmQ", "numDb", "numQ",
     "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr", "dbTimeStamp", "qTimeStamp"],
    defaults=(None, None),
)
DbStruct.__doc__ = """One dataset split, with the seed's field names.

dbImage, qImage: lists of image names (database names relative to the dataset root, query names
relative to `root/queries_real`); utmDb, utmQ: (N, 2) float64 UTM easting/northing in metres;
numDb, numQ: int; posDistThr (25), posDistSqThr (625), nonTrivPosDistSqThr (100): numbers;
dbTimeStamp, qTimeStamp: (N,) int64 arrays for TokyoTM, else None; dataset: the file's name
without its split, e.g. "pitts30k"."""

Split = namedtuple("Split", ["db", "root", "queries_dir"])
Split.__doc__ = """A split ready to load: its `DbStruct`, the image root and the query folder
(relative to `root`; "" when query names are relative to `root` itself)."""

# The fields of `dbStruct` in the files, in order (the MATLAB names of Relja/netvlad).
MAT_FIELDS = ("whichSet", "dbImageFns", "utmDb", "qImageFns", "utmQ", "numImages",
              "numQueries", "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr")
MAT_FIELDS_TM = ("whichSet", "dbImageFns", "utmDb", "dbTimeStamp", "qImageFns", "utmQ",
                 "qTimeStamp", "numImages", "numQueries", "posDistThr", "posDistSqThr",
                 "nonTrivPosDistSqThr")

PITTSBURGH_LAYOUT = f"""\
Expected the Pittsburgh layout (netvlad_v100_datasets):
  ROOT/000/000000_pitch1_yaw1.jpg, ...    database images (names in dbStruct relative to ROOT)
  ROOT/{QUERIES_DIR}/000/000000_pitch1_yaw1.jpg, ...    queries (relative to ROOT/{QUERIES_DIR})
  ROOT/{DATASETS_DIR.as_posix()}/NAME_SPLIT.mat    e.g. pitts30k_val.mat, with a `dbStruct`
`dbStruct` has 10 fields: {", ".join(MAT_FIELDS[:5])},
  {", ".join(MAT_FIELDS[5:])}
(TokyoTM: 12 or 13, with dbTimeStamp after utmDb and qTimeStamp after utmQ)."""

FOLDER_LAYOUT = """\
Expected the VPR-benchmark folder layout:
  FOLDER/database/@UTM_EAST@UTM_NORTH@...@.jpg    database images
  FOLDER/queries/@UTM_EAST@UTM_NORTH@...@.jpg     query images
(FOLDER is ROOT/SPLIT or ROOT; the names hold @utm_easting@utm_northing@zone@letter@lat@lon@
pano@tile@heading@pitch@roll@height@timestamp@note@, of which only the first two are needed)."""


class DataLayoutError(ValueError):
    """A dataset file or folder that is not laid out as expected."""


# ---------------------------------------------------------------------------------------------
# Reading and writing the .mat files
# ---------------------------------------------------------------------------------------------


def struct_path(root, name, split):
    """The `.mat` file of dataset `name` and `split` under `root` (Pittsburgh layout)."""
    return Path(root) / DATASETS_DIR / f"{name}_{split}.mat"


def _strings(cell):
    """An N x 1 MATLAB cell of strings as a list (of str: `check_image_names` checks it)."""
    return [_entry(f[0]) for f in cell]


def _entry(value):
    """One cell entry: "" when empty (MATLAB's ''), its one element, or the array itself."""
    value = np.asarray(value)
    return "" if value.size == 0 else value.item() if value.size == 1 else value


def _struct_fields(struct, path):
    """The fields of a loaded `dbStruct`, by MATLAB name: a dict name -> value.

    Read by name (the struct carries its names); only a struct with none of the expected names
    (e.g. a file written without them) is read by position, in the documented order.
    """
    names, values = struct.dtype.names, struct.item()
    if set(names) & set(MAT_FIELDS_TM):
        fields = dict(zip(names, values))
        required = MAT_FIELDS if "dbTimeStamp" not in fields else MAT_FIELDS_TM
        missing = [n for n in required if n not in fields]
        if missing:
            raise DataLayoutError(f"{path}: `dbStruct` lacks the field(s) {', '.join(missing)} "
                                  f"(found {', '.join(names)}).\n{PITTSBURGH_LAYOUT}")
        return fields
    if len(values) == len(MAT_FIELDS):
        return dict(zip(MAT_FIELDS, values))
    if len(values) in (12, 13):  # TokyoTM; a 13th field, if any, is not needed
        return dict(zip(MAT_FIELDS_TM, values[:12]))
    raise DataLayoutError(f"{path}: `dbStruct` has {len(values)} fields named "
                          f"{', '.join(names)}, none of the expected names, and not 10 "
                          f"(or 12/13 for TokyoTM) to read by position.\n{PITTSBURGH_LAYOUT}")


def _number(value, name, path):
    """A scalar field as a Python number, with an error naming the field otherwise."""
    value = np.asarray(value)
    if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise DataLayoutError(f"{path}: `dbStruct.{name}` should be one number, found "
                              f"{value.dtype} of shape {value.shape}.\n{PITTSBURGH_LAYOUT}")
    return value.item()


def _numbers(value, name, path, dtype):
    """`value` as an array of `dtype`, or a DataLayoutError naming the field (text, cells)."""
    try:
        return np.asarray(value).astype(dtype)
    except (TypeError, ValueError) as err:
        raise DataLayoutError(f"{path}: `dbStruct.{name}` should hold numbers ({err}).\n"
                              f"{PITTSBURGH_LAYOUT}") from None


def _utm(value, name, path):
    """A 2 x N UTM field as an (N, 2) float64 array; errors name the field."""
    value = _numbers(value, name, path, np.float64)
    if value.ndim != 2 or value.shape[0] != 2:
        if value.size == 0:
            return np.zeros((0, 2))
        raise DataLayoutError(f"{path}: `dbStruct.{name}` has shape {value.shape}, expected "
                              f"2 x N (easting; northing).\n{PITTSBURGH_LAYOUT}")
    if not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).any(axis=0).sum())
        raise DataLayoutError(f"{path}: `dbStruct.{name}` has {bad} position(s) with NaN or "
                              f"inf coordinates.\n{PITTSBURGH_LAYOUT}")
    return value.T


def parse_db_struct(path):
    """Read a NetVLAD `.mat` file (Pittsburgh, Tokyo 24/7: 10 fields; TokyoTM: 12 or 13).

    Fields are read by their names; the result is checked: counts against the lists,
    UTM shapes, finite positions, `posDistSqThr == posDistThr**2`, and
    `0 < nonTrivPosDistSqThr <= posDistSqThr`.

    Raises:
        FileNotFoundError, DataLayoutError: one message naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .mat file.\n{PITTSBURGH_LAYOUT}")
    try:
        mat = loadmat(path)
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as err:
        raise DataLayoutError(f"{path}: not a readable MATLAB v5 .mat file ({err}).\n"
                              f"{PITTSBURGH_LAYOUT}") from err
    if "dbStruct" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataLayoutError(f"{path}: no `dbStruct` variable (found {keys}).\n"
                              f"{PITTSBURGH_LAYOUT}")
    if mat["dbStruct"].dtype.names is None or mat["dbStruct"].size != 1:
        raise DataLayoutError(f"{path}: `dbStruct` is not a single MATLAB struct.\n"
                              f"{PITTSBURGH_LAYOUT}")
    f = _struct_fields(mat["dbStruct"], path)
    db_time = q_time = None
    if "dbTimeStamp" in f:
        db_time = _numbers(f["dbTimeStamp"], "dbTimeStamp", path, np.int64).ravel()
        q_time = _numbers(f["qTimeStamp"], "qTimeStamp", path, np.int64).ravel()
    which = np.asarray(f["whichSet"]).ravel()
    which = str(which[0]) if which.size == 1 else ""
    dataset = path.stem.removesuffix(f"_{which}")
    try:
        db_names, q_names = _strings(f["dbImageFns"]), _strings(f["qImageFns"])
    except (TypeError, IndexError, ValueError, AttributeError) as err:
        raise DataLayoutError(f"{path}: `dbImageFns`/`qImageFns` are not N x 1 cells of "
                              f"file names ({err}).\n{PITTSBURGH_LAYOUT}") from err
    check_image_names(db_names, f"{path}: dbStruct.dbImageFns")
    check_image_names(q_names, f"{path}: dbStruct.qImageFns")
    numbers = {n: _number(f[n], n, path) for n in ("numImages", "numQueries", "posDistThr",
                                                   "posDistSqThr", "nonTrivPosDistSqThr")}
    db = DbStruct(which, dataset, db_names, _utm(f["utmDb"], "utmDb", path),
                  q_names, _utm(f["utmQ"], "utmQ", path),
                  int(numbers["numImages"]), int(numbers["numQueries"]),
                  numbers["posDistThr"], numbers["posDistSqThr"],
                  numbers["nonTrivPosDistSqThr"], db_time, q_time)
    _check_counts(db, path)
    _check_thresholds(db, path)
    return db


def check_image_names(names, source):
    """Raise unless every name is a relative path that stays in its folder: a string, not
    empty, not absolute, no `..` part, no NUL. Names in a `.mat` are untrusted input; this is
    the cheap check on the strings, done once per split (`load_image` checks the file itself).
    """
    for i, name in enumerate(names):
        if not isinstance(name, str):
            why = f"is {type(name).__name__} {name!r}, not a file name"
        elif not name or "\0" in name:
            why = f"{name!r} is empty or holds a NUL byte"
        elif name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            why = f"{name!r} is an absolute path"
        elif ".." in name.replace("\\", "/").split("/"):
            why = f"{name!r} climbs out of its folder with '..'"
        else:
            continue
        raise DataLayoutError(f"{source}[{i}] {why}: image names are relative to the dataset "
                              f"root (queries: to ROOT/{QUERIES_DIR}).\n{PITTSBURGH_LAYOUT}")


def _check_thresholds(db, source):
    """Raise unless the thresholds are consistent: posDistSqThr = posDistThr², 10 m <= 25 m."""
    thr, sq, non_triv = db.posDistThr, db.posDistSqThr, db.nonTrivPosDistSqThr
    if not thr > 0 or not np.isclose(sq, thr ** 2, rtol=1e-6):
        raise DataLayoutError(f"{source}: posDistSqThr ({sq:g}) should be posDistThr² "
                              f"({thr:g}² = {thr ** 2:g}): fields swapped or damaged?\n"
                              f"{PITTSBURGH_LAYOUT}")
    if not 0 < non_triv <= sq:
        raise DataLayoutError(f"{source}: nonTrivPosDistSqThr ({non_triv:g}) should lie in "
                              f"(0, posDistSqThr = {sq:g}]: the training positives (e.g. 10² m²) "
                              f"are within the evaluation radius.\n{PITTSBURGH_LAYOUT}")


def _check_counts(db, source):
    """Raise unless names, positions, timestamps and counts agree, and the split is not empty."""
    db_sizes = {len(db.dbImage), len(db.utmDb), db.numDb}
    q_sizes = {len(db.qImage), len(db.utmQ), db.numQ}
    if db.dbTimeStamp is not None:
        db_sizes.add(len(db.dbTimeStamp))
        q_sizes.add(len(db.qTimeStamp))
    shapes_ok = db.utmDb.shape[1:] == (2,) and db.utmQ.shape[1:] == (2,)
    if len(db_sizes) > 1 or len(q_sizes) > 1 or not shapes_ok:
        raise DataLayoutError(
            f"{source}: sizes disagree: {len(db.dbImage)} dbImage, utmDb {db.utmDb.shape}, "
            f"numDb {db.numDb}; {len(db.qImage)} qImage, utmQ {db.utmQ.shape}, numQ {db.numQ} "
            f"(utm is stored 2 x N).\n{PITTSBURGH_LAYOUT}")
    if db.numDb == 0 or db.numQ == 0:
        raise DataLayoutError(f"{source}: the split has {db.numDb} database images and "
                              f"{db.numQ} queries; both must be at least 1.\n"
                              f"{PITTSBURGH_LAYOUT}")


def _cell(names):
    """A list of str as an N x 1 MATLAB cell."""
    cell = np.empty((len(names), 1), dtype=object)
    cell[:, 0] = list(names)
    return cell


def save_db_struct(db, path, float_counts=False):
    """Write `db` as a `.mat` file whose `dbStruct` reads back like the authors' files.

    Args:
        db: a `DbStruct`; with timestamps it is written in the TokyoTM layout (12 fields).
        float_counts: store counts and thresholds as doubles, as some released files do.
    """
    number = float if float_counts else int
    fields = {
        "whichSet": db.whichSet,
        "dbImageFns": _cell(db.dbImage),
        "utmDb": np.asarray(db.utmDb, np.float64).T,  # 2 x N, as in the files
        "dbTimeStamp": db.dbTimeStamp,
        "qImageFns": _cell(db.qImage),
        "utmQ": np.asarray(db.utmQ, np.float64).T,
        "qTimeStamp": db.qTimeStamp,
        "numImages": number(db.numDb),
        "numQueries": number(db.numQ),
        "posDistThr": number(db.posDistThr),
        "posDistSqThr": number(db.posDistSqThr),
        "nonTrivPosDistSqThr": number(db.nonTrivPosDistSqThr),
    }
    names = MAT_FIELDS if db.dbTimeStamp is None else MAT_FIELDS_TM
    struct = {k: np.asarray(fields[k])[None] if k.endswith("TimeStamp") else fields[k]
              for k in names}
    return atomic_write(path, lambda f: savemat(f, {"dbStruct": struct}))


# ---------------------------------------------------------------------------------------------
# Ground truth from positions: positives and negatives
# ---------------------------------------------------------------------------------------------


def positives_within(db, radius, different_time=False):
    """For each query, the database indices within `radius` metres, nearest first.

    Ties are broken by index. With `different_time` (TokyoTM), database images taken at the
    query's own timestamp are left out.

    Returns:
        a list of `numQ` int64 arrays.
    """
    tree = cKDTree(db.utmDb)
    positives = []
    for q, center in enumerate(db.utmQ):
        idx = np.asarray(tree.query_ball_point(center, radius), dtype=np.int64)
        if different_time:
            idx = idx[db.dbTimeStamp[idx] != db.qTimeStamp[q]]
        dist = np.linalg.norm(db.utmDb[idx] - center, axis=1)
        positives.append(idx[np.lexsort((idx, dist))])
    return positives


def eval_positives(db):
    """Evaluation positives: within `posDistThr` (25 m)."""
    return positives_within(db, db.posDistThr)


def train_positives(db):
    """Training ("non-trivial") positives: within sqrt(`nonTrivPosDistSqThr`) (10 m).

    For TokyoTM they must also have a different timestamp than the query.
    """
    return positives_within(db, db.nonTrivPosDistSqThr ** 0.5,
                            different_time=db.dbTimeStamp is not None)


class NegativeSampler:
    """Draws potential negatives of a query: database images farther than `posDistThr`.

    Rejection sampling: draw database indices uniformly, keep those whose distance to the query
    (computed directly) exceeds the threshold, drop repeats. The kept ones are a uniform sample
    without replacement of the query's negatives, and no list of negatives is ever stored: the
    memory is one k-d tree over the database positions (a few MB at Pitts250k scale).
    """

    def __init__(self, db):
        self.utm_db = np.asarray(db.utmDb, np.float64)
        self.utm_q = np.asarray(db.utmQ, np.float64)
        self.radius = float(db.posDistThr)
        self.tree = cKDTree(self.utm_db)

    def num_negatives(self, query_index):
        """How many database images lie farther than `posDistThr` from the query."""
        near = self.tree.query_ball_point(self.utm_q[query_index], self.radius,
                                          return_length=True)
        return len(self.utm_db) - int(near)

    def is_negative(self, query_index, db_indices):
        """Boolean mask: which of `db_indices` are farther than `posDistThr` from the query."""
        dist = np.linalg.norm(self.utm_db[db_indices] - self.utm_q[query_index], axis=1)
        return dist > self.radius

    def sample(self, query_index, n, rng):
        """`n` distinct negatives of the query, drawn uniformly; int64 array.

        Args:
            rng: a `np.random.Generator`.
        """
        num_db, num_neg = len(self.utm_db), self.num_negatives(query_index)
        if 2 * n > num_neg:
            # Few negatives: rejection would mostly draw repeats. Take this query's negatives
            # directly (computed now, not stored).
            negatives = np.flatnonzero(self.is_negative(query_index, np.arange(num_db)))
            if len(negatives) < n:
                raise ValueError(f"query {query_index} has only {len(negatives)} database "
                                 f"images beyond {self.radius:g} m, {n} negatives asked for "
                                 "(the setting n_neg_sample): use a preset with a smaller "
                                 "n_neg_sample, or a train split with more database images")
            return rng.choice(negatives, size=n, replace=False)
        picked = np.empty(0, dtype=np.int64)
        while len(picked) < n:
            missing = n - len(picked)
            draws = rng.integers(0, num_db, size=2 * missing * num_db // num_neg + 8)
            picked = np.concatenate([picked, draws[self.is_negative(query_index, draws)]])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]  # repeats dropped, order of drawing kept
        return picked[:n]


# ---------------------------------------------------------------------------------------------
# Images and torch datasets
# ---------------------------------------------------------------------------------------------


def seed_negative_lists(db):
    """The seed's (and Nanne's) way: radius search, then one `setdiff1d` array per query.

    Returns:
        (evaluation positives, training positives, negatives): three lists of `numQ` arrays,
        the negatives each as long as the database.
    """
    from sklearn.neighbors import NearestNeighbors  # imported here: 1.7 s at import time

    knn = NearestNeighbors().fit(db.utmDb)
    dist, positives = knn.radius_neighbors(db.utmQ, radius=db.posDistThr)
    train = [p[d ** 2 <= db.nonTrivPosDistSqThr] for d, p in zip(dist, positives)]
    all_db = np.arange(db.numDb)
    negatives = [np.setdiff1d(all_db, p, assume_unique=True) for p in positives]
    return positives, train, negatives


def project_negatives(db):
    """This project's way: sorted positives per query and a `NegativeSampler`."""
    return eval_positives(db), train_positives(db), NegativeSampler(db)


def compare_negative_memory(db, num_sample_queries=1000, num_negatives=1000, seed=0):
    """Time and peak memory of both ways to get positives and negatives for `db`, measured now.

    Returns:
        dict with `num_db`, `num_q`, `rows` (one `(approach, seconds, peak MiB)` per way) and
        `sample_us`: the mean time of one `NegativeSampler.sample(q, num_negatives)` call in
        microseconds (`num_negatives` is capped at a quarter of the database).
    """
    rows = [("seed: radius_neighbors + setdiff1d per query", *measure(seed_negative_lists, db)),
            ("project: positives + NegativeSampler", *measure(project_negatives, db))]
    sampler, rng = NegativeSampler(db), np.random.default_rng(seed)
    num_negatives = min(num_negatives, db.numDb // 4)  # small databases have fewer images
    queries = rng.integers(0, db.numQ, num_sample_queries)
    start = time.perf_counter()
    for q in queries:
        sampler.sample(q, num_negatives, rng)
    sample_us = (time.perf_counter() - start) / len(queries) * 1e6
    return {"num_db": db.numDb, "num_q": db.numQ, "rows": rows, "sample_us": sample_us,
            "num_negatives": num_negatives}


def format_negative_memory(result):
    """The `compare_negative_memory` result as a small table."""
    lines = [f"Positives and negatives for {result['num_db']:,} database images and "
             f"{result['num_q']:,} queries",
             f"{'approach':<48}{'time (s)':>10}{'peak extra memory':>20}"]
    for name, seconds, mib in result["rows"]:
        size = f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"
        lines.append(f"{name:<48}{seconds:>10.2f}{size:>20}")
    lines.append(f"NegativeSampler.sample(q, {result['num_negatives']}): "
                 f"{result['sample_us']:.0f} us per query")
    return "\n".join(lines)


class InputTransform:
    """PIL image -> normalized float tensor (3, H, W), optionally resized to (H, W) first.

    The arithmetic of torchvision's `Compose([Resize, ToTensor, Normalize])`, bit for bit
    (a test compares them), without importing torchvision, which costs seconds per process.
    """

    def __init__(self, resize=None):
        self.resize = tuple(resize) if resize is not None else None
        self.mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)  # `mean`: (3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)

    def __call__(self, img):
        if self.resize is not None and img.size != self.resize[::-1]:
            img = img.resize(self.resize[::-1], Image.BILINEAR)  # PIL takes (W, H)
        if img.mode != "RGB":
            img = to_rgb(img)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # `x`: (H, W, 3)
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # `x`: (3, H, W)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self):
        return f"InputTransform(resize={self.resize}, mean={IMAGENET_MEAN}, std={IMAGENET_STD})"


def input_transform(resize=None):
    """PIL image -> normalized tensor (ImageNet mean/std), optionally resized to (H, W)."""
    return InputTransform(resize)


def _file_kind(mode):
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


def check_image_file(path, root=None):
    """Raise unless `path` is a regular file (after symlinks) inside `root` when given.

    Symlinks are followed only while they stay inside `root` (a link to a file elsewhere is
    refused); a folder, FIFO, device or socket is refused before it is opened (a FIFO would
    block the read for ever).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found (database names are relative to the "
                                f"dataset root, query names to ROOT/{QUERIES_DIR})") from None
    if not stat.S_ISREG(mode):
        raise DataLayoutError(f"image {path} is {_file_kind(mode)}, not an image file")
    if root is not None:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise DataLayoutError(f"image {path} leads outside {root} (to {real}): image "
                                  "files must lie inside their folder, symlinks included")


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img):
    """A PIL image as 8-bit RGB, upright: its EXIF orientation applied (as a photo viewer
    shows it; torchvision ignores it), 16-bit grey scaled to 8 bits (`convert("RGB")` would
    clip it to white)."""
    if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)  # `grey`: (H, W), 0..65535
        img = Image.fromarray(np.clip(np.rint(grey / 257), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path, root=None):
    """Open an image file as upright 8-bit RGB (`to_rgb`); errors name the file.

    Args:
        root: the folder the image must lie in (`check_image_file`).
    """
    path = Path(path)
    check_image_file(path, root)
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataLayoutError(f"image {path} cannot be read: {err}") from err


def image_size(path):
    """(width, height) of an image file as `load_image` gives it; errors name the file."""
    return load_image(path).size


def _check_root(root, queries_dir):
    """Raise unless `root` and its query folder exist."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist.\n{PITTSBURGH_LAYOUT}")
    if not (root / queries_dir).is_dir():
        raise FileNotFoundError(f"query folder {root / queries_dir} does not exist.\n"
                                f"{PITTSBURGH_LAYOUT}")
    return root


class WholeDataset(Dataset):
    """Every image of a split, database first, then queries: item i is `(image, i)`.

    Database image i is `root/dbImage[i]`; query j is item `numDb + j`, read from
    `root/queries_dir/qImage[j]`.

    Args:
        transform: PIL image -> tensor; default `input_transform()`.
    """

    def __init__(self, root, db, transform=None, queries_dir=QUERIES_DIR, same_size=False):
        self.root, self.db = _check_root(root, queries_dir), db
        self.queries_dir = queries_dir
        self.transform = transform if transform is not None else input_transform()
        self.paths = ([self.root / name for name in db.dbImage]
                      + [self.root / queries_dir / name for name in db.qImage])
        self.size = image_size(self.paths[0]) if same_size and self.paths else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = load_image(self.paths[i], self.root if i < self.db.numDb
                           else self.root / self.queries_dir)
        if self.size is not None and image.size != self.size:
            raise DataLayoutError(
                f"image {self.paths[i]} is {image.size[0]}x{image.size[1]} pixels, but "
                f"{self.paths[0]} is {self.size[0]}x{self.size[1]}: with no image_size set, "
                "every image must have the same size (resize them, or use a preset that sets "
                "image_size)")
        return self.transform(image), i


def whole_dataset(split, config):
    """`WholeDataset` of a `Split`, resized to `config.image_size` (with no `image_size`, an
    image of another size than the first is a clear error, not a failed batch)."""
    return WholeDataset(split.root, split.db, transform=input_transform(config.image_size),
                        queries_dir=split.queries_dir, same_size=config.image_size is None)


def data_fingerprint(split):
    """A short digest of a split's data: its image lists, positions, and every image file's
    size and modification time (`os.stat`; 0.1 s per 10,000 files, no image is read).

    Changes when an image is replaced, even under the same name, when a synthetic city is
    regenerated, or a data root points at other data; a copy that keeps the times
    (`cp -p`, `shutil.copytree`) keeps it. A missing file counts as such.
    """
    db, root = split.db, Path(split.root)
    h = hashlib.sha1("\n".join([db.dataset, *db.dbImage, *db.qImage]).encode())
    h.update(np.ascontiguousarray(db.utmDb, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(db.utmQ, dtype=np.float64).tobytes())
    for folder, names in ((root, db.dbImage), (root / split.queries_dir, db.qImage)):
        for name in names:
            try:
                st = os.stat(folder / name)
                h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                h.update(b"missing;")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Finding a split on disk: Pittsburgh layout or VPR-benchmark folders
# ---------------------------------------------------------------------------------------------


def _utm_from_name(path):
    """(easting, northing) from a VPR-benchmark name `@easting@northing@...@.jpg`."""
    fields = path.name.split("@")
    try:
        east, north = float(fields[1]), float(fields[2])
        if not np.isfinite([east, north]).all():
            raise ValueError("not finite")
        return east, north
    except (IndexError, ValueError):
        raise DataLayoutError(f"{path}: cannot read UTM easting/northing from the name.\n"
                              f"{FOLDER_LAYOUT}") from None


def _images_in(folder):
    """Image files under `folder`, sorted, as paths."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def parse_folder_dataset(folder, pos_dist_thr=25, non_triv_sq=100):
    """A `DbStruct` from a VPR-benchmark folder (`database/` and `queries/` of named images).

    dbImage names are relative to `folder` ("database/@...@.jpg") and qImage names to
    `folder/queries`, so `Split(db, folder, "queries")` loads it.
    """
    folder = Path(folder)
    db_dir, q_dir = folder / "database", folder / "queries"
    for d in (db_dir, q_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} does not exist.\n{FOLDER_LAYOUT}")
    db_files, q_files = _images_in(db_dir), _images_in(q_dir)
    if not db_files or not q_files:
        empty = db_dir if not db_files else q_dir
        raise DataLayoutError(f"{empty} holds no images.\n{FOLDER_LAYOUT}")
    utm_db = np.array([_utm_from_name(p) for p in db_files], dtype=np.float64)
    utm_q = np.array([_utm_from_name(p) for p in q_files], dtype=np.float64)
    return DbStruct(folder.name, folder.parent.name,
                    [p.relative_to(folder).as_posix() for p in db_files], utm_db,
                    [p.relative_to(q_dir).as_posix() for p in q_files], utm_q,
                    len(db_files), len(q_files), pos_dist_thr, pos_dist_thr ** 2, non_triv_sq)


def load_split(root, split, name=None, allow_flat=True):
    """Find and read `split` under `root`, in either layout.

    Pittsburgh: `root/netvlad_v100_datasets/datasets/*_{split}.mat` (`name`, e.g. "pitts30k",
    picks one if there are several), or `{name}.mat` for a one-split dataset (Tokyo 24/7:
    `tokyo247.mat`, its `whichSet` "test"). Folders: `root/{split}/database` +
    `root/{split}/queries`, or `root/database` + `root/queries` (one flat folder, used as the
    split asked for).

    Args:
        allow_flat: accept the flat folder; training refuses it (`allow_flat=False`), since
            the same images would be train, val and test.
    """
    root = Path(root)
    mats = sorted((root / DATASETS_DIR).glob(f"*_{split}.mat"))
    if name is not None:
        mats = [m for m in mats if m.name == f"{name}_{split}.mat"]
        single = root / DATASETS_DIR / f"{name}.mat"  # one file, one split: tokyo247.mat
        if not mats and single.is_file():
            db = parse_db_struct(single)
            if db.whichSet != split:
                raise DataLayoutError(f"{single} holds the '{db.whichSet}' split, not "
                                      f"'{split}'; use --split {db.whichSet}")
            return Split(db, root, QUERIES_DIR)
    if len(mats) == 1:
        return Split(parse_db_struct(mats[0]), root, QUERIES_DIR)
    if len(mats) > 1:
        choices = [m.name.removesuffix(f"_{split}.mat") for m in mats]
        raise DataLayoutError(f"several '{split}' files in {root / DATASETS_DIR}: "
                              f"{[m.name for m in mats]}; pick one with name= (one of {choices})")
    if (root / split / "database").is_dir():
        db = parse_folder_dataset(root / split)
        return Split(db._replace(whichSet=split), root / split, "queries")
    if (root / "database").is_dir():
        if not allow_flat:
            raise DataLayoutError(
                f"{root} is one flat VPR folder (database/ + queries/) with no separate "
                f"'{split}' split: training on it would use its test images for training and "
                f"validation. Give training {root}/train/, {root}/val/ (each with database/ and "
                "queries/); `evaluate --split NAME` reads the flat folder as split NAME.")
        db = parse_folder_dataset(root)
        return Split(db._replace(whichSet=split), root, "queries")
    wanted = struct_path(root, name or "NAME", split)
    raise FileNotFoundError(f"no '{split}' split under {root}: neither {wanted} nor "
                            f"{root / split / 'database'} exists.\n{PITTSBURGH_LAYOUT}\n"
                            f"{FOLDER_LAYOUT}")


# ---------------------------------------------------------------------------------------------
# Checking a dataset on disk (`python -m netvlad_tutorial check-data`)
# ---------------------------------------------------------------------------------------------


def _summary(counts):
    """min / median / max of a list of counts."""
    counts = np.asarray(counts)
    return {"min": int(counts.min()), "median": float(np.median(counts)),
            "max": int(counts.max())}


def _check_images(paths, label, decode, roots=None):
    """(path, problem) for each image that is missing, not a file inside its root (`roots`:
    one per path), or does not open."""
    problems = []
    for i, path in enumerate(tqdm(paths, desc=label, unit="img")):
        try:
            check_image_file(path, None if roots is None else roots[i])
            with Image.open(path) as img:
                if decode:
                    img.load()
                else:
                    img.verify()
        except FileNotFoundError:
            problems.append((path, "missing"))
        except DataLayoutError as err:
            problems.append((path, str(err).removeprefix(f"image {path} ")))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            problems.append((path, f"corrupt ({err})"))
    return problems


def check_split(split, decode=False):
    """Check one split: every image opens; counts and positives per query as a dict.

    Args:
        decode: decode every image fully (slow) instead of PIL's quick `verify()`.
    """
    db, root = split.db, Path(split.root)
    _check_root(root, split.queries_dir)
    name = f"{db.dataset}_{db.whichSet}"
    paths = ([root / n for n in db.dbImage]
             + [root / split.queries_dir / n for n in db.qImage])
    roots = [root] * db.numDb + [root / split.queries_dir] * db.numQ
    problems = _check_images(paths, f"checking {name}", decode, roots)
    if problems:
        lines = "\n".join(f"  {p}: {why}" for p, why in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataLayoutError(f"{len(problems)} of {len(paths)} images of {name} are missing "
                              f"or unreadable:\n{lines}{more}\n{PITTSBURGH_LAYOUT}")
    eval_counts = [len(p) for p in eval_positives(db)]
    train_counts = [len(p) for p in train_positives(db)]
    return {
        "name": name, "root": str(root), "num_db": db.numDb, "num_q": db.numQ,
        "images_checked": len(paths),
        "eval_positives": _summary(eval_counts), "train_positives": _summary(train_counts),
        "queries_without_eval_positives": int(np.sum(np.equal(eval_counts, 0))),
        "queries_without_train_positives": int(np.sum(np.equal(train_counts, 0))),
    }


def check_data(root, struct_file=None, split=None, name=None, queries_dir=QUERIES_DIR,
               decode=False):
    """Check a dataset root: images, counts and positives, for one `.mat` file or every split.

    Args:
        struct_file: a `.mat` file (absolute, or relative to `root/netvlad_v100_datasets/
            datasets`); else `split` ("train", "val", "test"); else every split found.
        name: dataset name when several `.mat` files fit a split, e.g. "pitts30k".
        queries_dir: query folder under `root`, for `struct_file`.

    Returns:
        {"root": str, "splits": [one dict per split, see `check_split`]}.

    Raises:
        FileNotFoundError, DataLayoutError: naming the files at fault and the layout expected.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist.\n{PITTSBURGH_LAYOUT}")
    if struct_file is not None:
        path = Path(struct_file)
        if not path.is_absolute() and not path.exists():
            path = root / DATASETS_DIR / path
        splits = [Split(parse_db_struct(path), root, queries_dir)]
    elif split is not None:
        splits = [load_split(root, split, name)]
    else:
        splits = []
        for s in SPLITS:
            try:
                splits.append(load_split(root, s, name))
            except FileNotFoundError:
                continue
        if not splits:
            raise FileNotFoundError(f"no split found under {root}.\n{PITTSBURGH_LAYOUT}\n"
                                    f"{FOLDER_LAYOUT}")
    return {"root": str(root), "splits": [check_split(s, decode) for s in splits]}


def format_report(report):
    """The `check_data` report as a small text table."""

    def spread(s):
        return f"{s['min']} / {s['median']:g} / {s['max']}"

    lines = [f"data root: {display_path(report['root'])}",
             f"{'split':<22}{'db':>8}{'queries':>9}   {'eval positives':<16}"
             f"{'train positives':<17}{'no train positive':>17}",
             f"{'':<39}   (per query: min / median / max)"]
    for r in report["splits"]:
        lines.append(f"{r['name']:<22}{r['num_db']:>8,}{r['num_q']:>9,}   "
                     f"{spread(r['eval_positives']):<16}{spread(r['train_positives']):<17}"
                     f"{r['queries_without_train_positives']:>17,}")
    total = sum(r["images_checked"] for r in report["splits"])
    lines.append(f"all {total:,} images found and readable")
    return "\n".join(lines)
