"""Choose the `tiny` preset's recipe by validation, then report the chosen one on test.

Trains the preset and a few variations of it on the tiny synthetic city, each in its own run
folder, and ranks them by the best epoch's validation R@5 (then R@1), as `train` picks
`best.pth`. The test split is evaluated only after the choice, for the chosen recipe and the
preset, so that the test numbers never steer it. The frozen encoder's features are encoded once
and read back by every run (`features.stored_local_features`), so a recipe costs seconds.

    python experiments/tiny_recipes.py                  # fp32, as on a CPU without native bf16
    python experiments/tiny_recipes.py --precision auto
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
from netvlad_tutorial.synthetic import ensure_synthetic_city  # noqa: E402

RECIPES = [  # changes to the `tiny` preset
    {}, {"lr": 3e-2}, {"lr": 1e-1}, {"epochs": 20, "patience": 20},
    {"n_neg_sample": 300, "n_neg_dist": 100}, {"margin": 0.2}, {"margin": 0.05},
    {"batch_size": 8}, {"batch_size": 2}, {"optimizer": "adam", "lr": 1e-3},
    {"optimizer": "adam", "lr": 1e-2}, {"n_neg": 8}, {"lr": 3e-2, "n_neg": 8},
]


def run(changes, base, out):
    """Train one recipe quietly; (best epoch's row, seconds)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        history = train.train(base.replace(**changes), out, overwrite=True)
    best = max(history, key=lambda r: (r["recall@5"], r["recall@1"], -r["epoch"]))
    return best, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT / "data" / "synthetic_tiny"))
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    root = ensure_synthetic_city(args.data_root)
    base = cf.PRESETS["tiny"].replace(data_root=str(root), precision=args.precision)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, changes in enumerate(RECIPES):
            best, seconds = run(changes, base, Path(tmp) / f"r{i}")
            rows.append((changes, best, seconds, Path(tmp) / f"r{i}" / "best.pth"))
            print(f"{json.dumps(changes):42} best epoch {best['epoch']:2d}  val R@1/5/10 "
                  + " / ".join(f"{100 * best[f'recall@{n}']:.1f}" for n in (1, 5, 10))
                  + f"  ({seconds:.0f} s)", flush=True)
        ranked = sorted(rows, key=lambda r: (-r[1]["recall@5"], -r[1]["recall@1"]))
        chosen = ranked[0]
        print(f"\nchosen by validation R@5 (then R@1): {json.dumps(chosen[0])}")
        for label, row in (("chosen", chosen), ("the preset", rows[0])):
            with contextlib.redirect_stderr(io.StringIO()):
                result = evaluate.evaluate_checkpoint(root, "test", checkpoint=row[3],
                                                      precision=args.precision)
            print(f"test, {label:10}: R@1/5/10 "
                  + " / ".join(f"{100 * result[f'recall@{n}']:.1f}" for n in (1, 5, 10)))


if __name__ == "__main__":
    main()
