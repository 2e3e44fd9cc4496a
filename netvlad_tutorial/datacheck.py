"""Checking a dataset before a run: every split's `.mat` file and images (`check-data`).
"""

from pathlib import Path

import numpy as np
from PIL import Image

from .data import Split, check_root, eval_positives, load_split, train_positives
from .dbstruct import (
    DATASETS_DIR,
    FOLDER_LAYOUT,
    PITTSBURGH_LAYOUT,
    QUERIES_DIR,
    SPLITS,
    DataLayoutError,
    parse_db_struct,
)
from .images import check_image_file
from .utils import display_path, progress_bar


def _summary(counts):
    """min / median / max of a list of counts."""
    counts = np.asarray(counts)
    return {"min": int(counts.min()), "median": float(np.median(counts)),
            "max": int(counts.max())}


def _check_images(paths, label, decode, roots=None):
    """(path, problem) for each image that is missing, not a file inside its root (`roots`:
    one per path), or does not open."""
    problems = []
    for i, path in enumerate(progress_bar(paths, desc=label, unit="img")):
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
    check_root(root, split.queries_dir)
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
