"""Stage 1: the datasets, exactly as the NetVLAD `.mat` files describe them.

A dataset split is a `DbStruct`: database and query image names with their UTM positions, read
from the authors' `netvlad_v100_datasets` files (Pittsburgh 250k/30k, Tokyo 24/7, TokyoTM) or
from a VPR-benchmark image folder. From the positions come the ground truth:
- evaluation positives: database images within `posDistThr` (25 m) of the query;
- training positives: within `sqrt(nonTrivPosDistSqThr)` (10 m);
- negatives: farther than 25 m (drawn on demand by `NegativeSampler`, never listed; what listing
  them would cost: `lessons.compare_negative_memory`).
"""

import hashlib
import os
from collections import namedtuple
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from torch.utils.data import Dataset

from .dbstruct import (
    DATASETS_DIR,
    FOLDER_LAYOUT,
    PITTSBURGH_LAYOUT,
    QUERIES_DIR,
    DataLayoutError,
    DbStruct,
    parse_db_struct,
    struct_path,
)
from .images import IMAGE_SUFFIXES, image_size, input_transform, load_image

Split = namedtuple("Split", ["db", "root", "queries_dir"])
Split.__doc__ = """A split ready to load: its `DbStruct`, the image root and the query folder
(relative to `root`; "" when query names are relative to `root` itself)."""




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

    def count(self, query_index):
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
        num_db, count = len(self.utm_db), self.count(query_index)
        if 2 * n > count:
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
            draws = rng.integers(0, num_db, size=2 * missing * num_db // count + 8)
            picked = np.concatenate([picked, draws[self.is_negative(query_index, draws)]])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]  # repeats dropped, order of drawing kept
        return picked[:n]


def check_root(root, queries_dir):
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
        self.root, self.db = check_root(root, queries_dir), db
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
