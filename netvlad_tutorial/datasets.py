"""Real photographs, opt in: `python -m netvlad_tutorial datasets download gardens-point`.

GardensPoint Walking (Sünderhauf et al., 2015; the dataset of Schubert et al.'s "Visual Place
Recognition: A Tutorial", 2023): the same walk through the QUT Gardens Point campus filmed by
day and by night, 200 frames per traverse. As the tutorial, the database is `day_right` and the
queries are `night_right`; frame i of one traverse shows the place of frame i of the other.

Nothing downloads at import. The archive is fetched with `weights.download_weights` (no hash is
published for it: its sha256 is printed and kept beside it, and a later download must match),
checked, and unpacked into the Pittsburgh layout that `data.load_split` reads:

    ROOT/day_right/Image000.jpg ...                        database (day)
    ROOT/queries_real/night_right/Image000.jpg ...         queries (night)
    ROOT/netvlad_v100_datasets/datasets/gardens_point_test.mat

The dataset has no GPS: its ground truth is the frame order. The `.mat` file places frame i at
i metres along a line (a stand-in, not a position) with `posDistThr` 0.5 m, so the evaluation
positives of query i are database frame i alone (the "hard" ground truth); `frame_ground_truth`
also gives the "soft" one, ±8 frames.
"""

import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from .data import load_split
from .dbstruct import DATASETS_DIR, QUERIES_DIR, DbStruct, save_db_struct
from .files import atomic_write
from .images import IMAGE_SUFFIXES
from .utils import REPO_ROOT, display_path
from .weights import Weights, download_weights

DATA_URL_ENV = "NETVLAD_DATA_URL"
GARDENS_POINT_URL = "https://www.tu-chemnitz.de/etit/proaut/datasets/GardensPoint_Walking.zip"
GARDENS_POINT_NAME = "gardens_point"
DATABASE_SET, QUERY_SET = "day_right", "night_right"
SOFT_TOLERANCE = 8  # frames: the VPR tutorial's soft ground truth, a 17-frame box
FRAME_SPACING = 1.0  # metres between the stand-in positions of consecutive frames
GET_GARDENS_POINT = "python -m netvlad_tutorial datasets download gardens-point"

GARDENS_POINT = Weights(
    name="gardens-point", url=GARDENS_POINT_URL, filename=Path(GARDENS_POINT_URL).name,
    sha256=None, kind="archive",
    description="GardensPoint Walking (day_right, night_right, 200 frames each), zip archive",
    usage="unpacked by `datasets download gardens-point` into the folder that holds <path>",
    note="the URL of the VPR tutorial's loader (stschubert/VPR_Tutorial); no hash published")


def gardens_point_root():
    """Where the dataset goes by default: `data/gardens_point` of the repository."""
    return REPO_ROOT / "data" / GARDENS_POINT_NAME


def struct_file(root):
    """The `.mat` file of the unpacked dataset under `root`."""
    return Path(root) / DATASETS_DIR / f"{GARDENS_POINT_NAME}_test.mat"


def is_downloaded(root=None):
    """Whether `root` (default `gardens_point_root()`) holds the unpacked dataset."""
    return struct_file(root or gardens_point_root()).is_file()


def _archive_sets(archive):
    """{set name: sorted image members} of the database and query sets in a zip archive.

    A set's images are the members directly inside a folder named after it, at any depth (the
    archive may or may not wrap them in a top folder). Raises ValueError unless both sets are
    there with the same number of images.
    """
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{archive} is not a readable zip archive: {err}") from err
    # macOS archives add `__MACOSX/<folder>/._<name>` metadata files: not images
    paths = [PurePosixPath(m) for m in names]
    paths = [m for m in paths if "__MACOSX" not in m.parts and not m.name.startswith(".")]
    sets = {}
    for name in (DATABASE_SET, QUERY_SET):
        members = [m.as_posix() for m in paths
                   if m.parent.name == name and m.suffix.lower() in IMAGE_SUFFIXES]
        sets[name] = sorted(members, key=lambda m: PurePosixPath(m).name)
    counts = {name: len(members) for name, members in sets.items()}
    if not all(counts.values()) or len(set(counts.values())) > 1:
        raise ValueError(f"{archive}: expected the same number (> 0) of images in folders "
                         f"{DATABASE_SET}/ and {QUERY_SET}/, found {counts}")
    return sets


def check_gardens_point_archive(path):
    """Raise ValueError unless `path` is a zip with as many day_right as night_right images."""
    _archive_sets(path)


def frame_ground_truth(num_db, num_q=None, tolerance=SOFT_TOLERANCE):
    """The ground truth by frame order: (gt_hard, gt_soft), (N, M) booleans.

    Database frame i matches query frame i (hard); the soft ground truth also accepts
    |i − j| <= `tolerance` frames, which are neither counted right nor wrong.
    """
    num_q = num_db if num_q is None else num_q
    offset = np.arange(num_db)[:, None] - np.arange(num_q)[None, :]  # `offset`: (N, M)
    return offset == 0, np.abs(offset) <= tolerance


def _struct(db_names, q_names):
    """The split's `DbStruct`: frame i at i·FRAME_SPACING metres, positives the same frame."""
    thr = FRAME_SPACING / 2

    def line(n):
        return np.stack([FRAME_SPACING * np.arange(n), np.zeros(n)], axis=1)  # (n, 2)

    return DbStruct("test", GARDENS_POINT_NAME, db_names, line(len(db_names)), q_names,
                    line(len(q_names)), len(db_names), len(q_names), thr, thr ** 2, thr ** 2)


def unpack_gardens_point(archive, root):
    """Unpack the archive's two sets into `root` in the Pittsburgh layout, write the `.mat`.

    Only image files of the two sets are written, each under its own file name: no member's
    path can reach outside `root`. Returns `root`.
    """
    root = Path(root)
    sets = _archive_sets(archive)
    folders = {DATABASE_SET: root / DATABASE_SET, QUERY_SET: root / QUERIES_DIR / QUERY_SET}
    names = {}
    with zipfile.ZipFile(archive) as z:
        for set_name, folder in folders.items():
            names[set_name] = []
            for member in sets[set_name]:
                file_name = PurePosixPath(member).name
                atomic_write(folder / file_name, z.read(member), sync=False)
                names[set_name].append(file_name)
    db_names = [f"{DATABASE_SET}/{n}" for n in names[DATABASE_SET]]  # relative to `root`
    q_names = [f"{QUERY_SET}/{n}" for n in names[QUERY_SET]]  # relative to `root/queries_real`
    save_db_struct(_struct(db_names, q_names), struct_file(root), float_counts=True)
    return root


def download_gardens_point(root=None, base_url=None, progress=True):
    """Download GardensPoint Walking and unpack it into `root`, unless it is already there.

    Args:
        root: the dataset folder (default `gardens_point_root()`, i.e. `data/gardens_point`).
        base_url: fetch `<base_url>/GardensPoint_Walking.zip` (default: `$NETVLAD_DATA_URL`,
            else the authors' address).

    Returns:
        `root`, which `data.load_split(root, "test")` then reads.
    """
    root = Path(root) if root is not None else gardens_point_root()
    if is_downloaded(root):
        print(f"GardensPoint Walking: already in {display_path(root)}")
        return root
    base = base_url or os.environ.get(DATA_URL_ENV) or GARDENS_POINT_URL.rsplit("/", 1)[0]
    archive = download_weights(GARDENS_POINT, base_url=base, progress=progress,
                               allow_unverified=True, path=root / GARDENS_POINT.filename,
                               check=check_gardens_point_archive)
    try:
        unpack_gardens_point(archive, root)
    except BaseException:
        for folder in (root / DATABASE_SET, root / QUERIES_DIR):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    archive.unlink()  # its sha256 stays beside it, for the next download to match
    split = load_split(root, "test", name=GARDENS_POINT_NAME)
    print(f"GardensPoint Walking: {split.db.numDb} database images ({DATABASE_SET}), "
          f"{split.db.numQ} queries ({QUERY_SET}) in {display_path(root)}")
    return root


def gardens_point(root=None):
    """The unpacked dataset as a `data.Split` with its (gt_hard, gt_soft), or None (with a
    one-line note on how to get it) when it is not there."""
    root = Path(root) if root is not None else gardens_point_root()
    if not is_downloaded(root):
        print(f"GardensPoint Walking is not in {display_path(root)}; get it with "
              f"`{GET_GARDENS_POINT}`")
        return None
    split = load_split(root, "test", name=GARDENS_POINT_NAME)
    return split, frame_ground_truth(split.db.numDb, split.db.numQ)
