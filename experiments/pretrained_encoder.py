"""Does training NetVLAD help? The pretrained encoder, off the shelf and fine-tuned, with
McNemar's exact test for every paired comparison on the tiny city's test split.

Three models, evaluated on the same test queries, one `--per-query` file each:
- off-the-shelf random: a random VGG16 with k-means NetVLAD (`tiny-random` untrained, first seed);
- off-the-shelf pretrained: the pretrained encoder (`--encoder`: default the one shipped in the
  package, `world`; or a file `pretrain` wrote) with k-means NetVLAD, untrained;
- fine-tuned: the same start, conv5 and NetVLAD trained (the paper's setting: the `tiny`
  preset), one run per `--seeds`, the best epoch by validation R@5 as `train` keeps it, each
  compared with its own start (the same seed's k-means NetVLAD, untrained).
The recipe is the preset's, chosen on validation by `experiments/tiny_recipes.py`; with more
than one `--lrs`, the learning rate is chosen here on validation (first seed), never on test.

    python experiments/pretrained_encoder.py --json experiments/results/pretrained_encoder.json
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from netvlad_tutorial import evaluate, train  # noqa: E402
from netvlad_tutorial.config import PRESETS  # noqa: E402
from netvlad_tutorial.data import load_split  # noqa: E402
from netvlad_tutorial.model import make_model  # noqa: E402
from netvlad_tutorial.precision import cpu_model  # noqa: E402
from netvlad_tutorial.synthetic import ensure_synthetic_city  # noqa: E402

RECALLS = (1, 5, 10)


def pretrained_config(root, encoder, lr, seed, base="tiny"):
    """The tiny city from `encoder`: conv5 and NetVLAD train (`base`'s recipe, at `lr`)."""
    return PRESETS[base].replace(data_root=str(root), weights=str(encoder), lr=lr, seed=seed)


@contextlib.contextmanager
def quiet():
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def untrained_file(config, root, out):
    """Evaluate the model as training would start (k-means NetVLAD) on test: its CSV."""
    device = torch.device("cpu")
    model = make_model(config, load_split(root, "train"), device)
    evaluate.evaluate_split(model, load_split(root, "test"), config, device, stored=False,
                            per_query=out)
    return out


def fine_tuned(config, root, run_dir, out):
    """Train `config` in `run_dir`; its best epoch's validation row and test CSV."""
    history = train.train(config, run_dir, overwrite=True)
    evaluate.evaluate_checkpoint(root, "test", checkpoint=run_dir / "best.pth",
                                 per_query=out)
    return max(history, key=lambda r: (r["recall@5"], r["recall@1"], -r["epoch"])), out


def compare(a, b, label):
    """Recalls of the two files and McNemar's p at each N."""
    rows = {}
    for n in RECALLS:
        paired = evaluate.paired_from_csv(a, b, n)
        rows[f"R@{n}"] = {"before": round(100 * paired.before.mean(), 1),
                          "after": round(100 * paired.after.mean(), 1),
                          "fixed": len(paired.fixed), "broken": len(paired.broken),
                          "p": paired.p_value}
    print(f"{label}: " + "; ".join(
        f"{k} {v['before']} -> {v['after']} (+{v['fixed']}/-{v['broken']}, "
        f"p = {v['p']:.2g})" for k, v in rows.items()))
    return rows


TABLE_START = "<!-- pretrained_encoder table: python experiments/pretrained_encoder.py --table -->"
TABLE_END = "<!-- end of pretrained_encoder table -->"


def render_table(result):
    """The README's results table, from a result file: each paired comparison with McNemar's
    exact p (fixed/broken queries) at R@1, R@5 and R@10."""
    def cell(row):
        return (f"{row['before']} → {row['after']} (+{row['fixed']}/−{row['broken']}, "
                f"p = {row['p']:.2g})")
    lines = ["| comparison (test queries) | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    shelf = result["pretrained_vs_random"]
    lines.append("| off the shelf: random → pretrained encoder | "
                 + " | ".join(cell(shelf[f"R@{n}"]) for n in RECALLS) + " |")
    for run in result["fine_tuned"]:
        lines.append(f"| pretrained: off the shelf → fine-tuned, seed {run['seed']} | "
                     + " | ".join(cell(run[f"R@{n}"]) for n in RECALLS) + " |")
    lines.append(f"\nMean R@1 gain of fine-tuning: {result['mean_gain_r1']} points; learning rate "
                 f"{result['lr']:g}, chosen on validation; {result['cpu']}, "
                 f"precision {result['precision']}.")
    return "\n".join([TABLE_START, *lines, TABLE_END])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="world",
                        help="the shipped encoder (default, `world`) or a `pretrain` file")
    parser.add_argument("--table", type=Path, default=None,
                        help="print the README table of this result file and stop")
    parser.add_argument("--root", type=Path, default=None, help="default: the tiny city")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates to choose from on validation (default: the "
                             "preset's)")
    parser.add_argument("--base", default="tiny", help="preset to start from")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.table:
        print(render_table(json.loads(args.table.read_text())))
        return None
    args.lrs = args.lrs or [PRESETS[args.base].lr]
    root = args.root or ensure_synthetic_city()
    work = Path(tempfile.mkdtemp(prefix="pretrained_encoder."))
    start = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
              "encoder": str(args.encoder), "preset": args.base,
              "precision": os.environ.get("NETVLAD_PRECISION", "auto")}

    with quiet():
        random_csv = untrained_file(PRESETS["tiny-random"].replace(data_root=str(root),
                                                                   seed=args.seeds[0]),
                                    root, work / "random.csv")
        shelf_csv = untrained_file(pretrained_config(root, args.encoder, args.lrs[0],
                                                     args.seeds[0], args.base),
                                   root, work / "pretrained.csv")
    result["pretrained_vs_random"] = compare(random_csv, shelf_csv,
                                             "off the shelf, random -> pretrained")

    val = {}  # the learning rate, chosen on validation with the first seed
    for lr in args.lrs:
        with quiet():
            best, _ = fine_tuned(pretrained_config(root, args.encoder, lr, args.seeds[0],
                                                   args.base),
                                 root, work / f"lr{lr}", work / f"lr{lr}.csv")
        val[lr] = best
        print(f"lr {lr:g}: best epoch {best['epoch']}, val R@1 {100 * best['recall@1']:.1f} "
              f"R@5 {100 * best['recall@5']:.1f}")
    lr = max(val, key=lambda k: (val[k]["recall@5"], val[k]["recall@1"]))
    result.update(lr=lr, validation={str(k): v for k, v in val.items()})
    print(f"chosen on validation: lr {lr:g}")

    runs = []  # each seed against its own start: the seed also draws k-means' sample
    for seed in args.seeds:
        out = work / f"lr{lr}.csv" if seed == args.seeds[0] else work / f"seed{seed}.csv"
        start_csv = shelf_csv
        if seed != args.seeds[0]:
            config = pretrained_config(root, args.encoder, lr, seed, args.base)
            with quiet():
                start_csv = untrained_file(config, root, work / f"pretrained{seed}.csv")
                fine_tuned(config, root, work / f"seed{seed}", out)
        runs.append({"seed": seed, **compare(start_csv, out,
                                             f"seed {seed}: off the shelf -> fine-tuned")})
    gains = [float(r["R@1"]["after"] - r["R@1"]["before"]) for r in runs]
    result.update(fine_tuned=runs, mean_gain_r1=round(statistics.mean(gains), 1),
                  seconds=round(time.perf_counter() - start))
    print(f"fine-tuned vs off the shelf, R@1 gain per seed {[round(g, 1) for g in gains]}, mean "
          f"{result['mean_gain_r1']} points ({result['seconds']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
