"""Stage 1a: the NetVLAD `.mat` files (`dbStruct`), read and written exactly as the authors'
`netvlad_v100_datasets` describe Pittsburgh 250k/30k, Tokyo 24/7 and TokyoTM.
"""

import io
from collections import namedtuple
from pathlib import Path

import numpy as np
from scipy.io import loadmat, savemat
from scipy.io.matlab import MatReadError

from .files import atomic_write

QUERIES_DIR = "queries_real"
DATASETS_DIR = Path("netvlad_v100_datasets") / "datasets"
SPLITS = ("train", "val", "test")

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
    buffer = io.BytesIO()
    savemat(buffer, {"dbStruct": struct})
    # scipy writes the time into the 116-byte text header: a fixed one keeps the bytes stable
    data = MAT_HEADER + buffer.getvalue()[len(MAT_HEADER):]
    return atomic_write(path, data)


MAT_HEADER = b"MATLAB 5.0 MAT-file, written by netvlad_tutorial".ljust(116)
