"""Choose a tiny preset's recipe by validation, then report the chosen one on test.

Trains the preset (`--preset`: `tiny`, the pretrained encoder with conv5 and NetVLAD training,
or `tiny-random`) and a few variations of it on the tiny synthetic city, each in its own run
folder, and ranks them by the best epoch's validation R@5 (then R@1), as `train` picks
`best.pth`. The test split is evaluated only after the choice, for the chosen recipe and the
preset, so that the test numbers never steer it. The frozen part of the encoder runs once per
image and is read back by every run (`features.stored_local_features`).

    python experiments/tiny_recipes.py --json experiments/results/tiny_recipes.json
    python experiments/tiny_recipes.py --preset tiny-random --precision auto

With `--json`, each finished recipe is written at once and skipped when the command is run
again: an interrupted search resumes where it stopped.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netvlad_tutorial import config as cf  # noqa: E402
from netvlad_tutorial import evaluate, train  # noqa: E402
from netvlad_tutorial.files import atomic_json  # noqa: E402
from netvlad_tutorial.precision import cpu_model  # noqa: E402
from netvlad_tutorial.synthetic import ensure_synthetic_city  # noqa: E402

RECIPES = {  # changes to each preset
    "tiny": [
        {}, {"lr": 3e-3, "epochs": 4, "patience": 4}, {"lr": 3e-2},
        {"lr": 1e-2, "epochs": 4, "patience": 4, "lr_step": 1, "lr_gamma": 0.5},
        {"n_neg": 10}, {"margin": 0.3},
    ],
    "tiny-random": [
    {}, {"lr": 3e-2}, {"lr": 1e-1}, {"epochs": 20, "patience": 20},
    {"n_neg_sample": 300, "n_neg_dist": 100}, {"margin": 0.2}, {"margin": 0.05},
    {"batch_size": 8}, {"batch_size": 2}, {"optimizer": "adam", "lr": 1e-3},
    {"optimizer": "adam", "lr": 1e-2}, {"n_neg": 8}, {"lr": 3e-2, "n_neg": 8},
    ],
}


BASE_KEYS = ("lr", "epochs", "patience", "seed", "n_neg", "margin")  # recorded with the table


def run(changes, base, out):
    """Train one recipe quietly; its row: the changes, the best epoch, the validation recalls
    of every epoch (%) and the seconds it took."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        history = train.train(base.replace(**changes), out, overwrite=True)
    best = max(history, key=lambda r: (r["recall@5"], r["recall@1"], -r["epoch"]))
    return {"changes": changes, "best": best,
            "val_by_epoch": [[round(100 * r[f"recall@{n}"], 1) for n in (1, 5)]
                             for r in history],
            "seconds": round(time.perf_counter() - start, 1)}


def recalls(result):
    return {n: round(100 * result[f"recall@{n}"], 1) for n in (1, 5, 10)}


def load_table(path, fresh):
    """The search so far: `path`'s table when it holds the same search as `fresh` (preset,
    base recipe, precision), else `fresh`. A file of another search is refused, not mixed."""
    if path is None or not path.is_file():
        return fresh
    try:
        table = json.loads(path.read_text())
        same = all(table[k] == fresh[k] for k in ("preset", "base", "precision"))
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a table of this script ({err}); give another --json") \
            from None
    if not same:
        raise SystemExit(f"{path} holds another search (preset {table['preset']!r}, base "
                         f"{table['base']}, precision {table['precision']!r}); this one is "
                         f"{fresh['preset']!r}, {fresh['base']}, {fresh['precision']!r}: "
                         "give another --json")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT / "data" / "synthetic_tiny"))
    parser.add_argument("--preset", default="tiny", choices=sorted(RECIPES))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the table here, recipe by recipe (and resume from it)")
    args = parser.parse_args()
    root = ensure_synthetic_city(args.data_root)
    base = cf.PRESETS[args.preset].replace(data_root=str(root), precision=args.precision)
    table = load_table(args.json, {"preset": args.preset,
                                   "base": {k: getattr(base, k) for k in BASE_KEYS},
                                   "precision": args.precision, "cpu": cpu_model(), "rows": []})
    done = {json.dumps(r["changes"], sort_keys=True): r for r in table["rows"]}
    with tempfile.TemporaryDirectory() as tmp:
        for i, changes in enumerate(RECIPES[args.preset]):
            row = done.get(json.dumps(changes, sort_keys=True))
            if row is None:
                row = run(changes, base, Path(tmp) / f"r{i}")
                table["rows"].append(row)
                if args.json:
                    atomic_json(table, args.json)
            print(f"{json.dumps(changes):60} best epoch {row['best']['epoch']:2d}  val R@1/5 by "
                  "epoch " + ", ".join(f"{a}/{b}" for a, b in row["val_by_epoch"])
                  + f"  ({row['seconds']:.0f} s)", flush=True)
        ranked = sorted(table["rows"],
                        key=lambda r: (-r["best"]["recall@5"], -r["best"]["recall@1"]))
        chosen = ranked[0]
        print(f"\nchosen by validation R@5 (then R@1): {json.dumps(chosen['changes'])}")
        table["chosen"] = chosen["changes"]
        tests = [("chosen", chosen["changes"])] + ([("the preset", {})] if chosen["changes"]
                                                   else [])
        for label, changes in tests:
            out = Path(tmp) / f"test-{label.replace(' ', '-')}"
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                train.train(base.replace(**changes), out, overwrite=True)
                result = evaluate.evaluate_checkpoint(root, "test", checkpoint=out / "best.pth",
                                                      precision=args.precision)
            table[f"test_{label.replace(' ', '_')}"] = recalls(result)
            print(f"test, {label:10}: R@1/5/10 "
                  + " / ".join(str(v) for v in recalls(result).values()))
    if args.json:
        atomic_json(table, args.json)


if __name__ == "__main__":
    main()
