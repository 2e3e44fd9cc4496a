"""Command line: `python -m netvlad_tutorial <command> ...` (see `--help`)."""

import argparse
import json
import sys
from pathlib import Path


def _make_synthetic(args):
    from .synthetic import make_synthetic_city

    root = make_synthetic_city(args.out, preset=args.preset, seed=args.seed)
    print(f"Synthetic city ({args.preset}, seed {args.seed}) written to {root}")


def _check_data(args):
    from .data import check_data, format_report

    report = check_data(args.root, struct_file=args.struct, split=args.split, name=args.name,
                        queries_dir=args.queries_dir, decode=args.decode)
    print(format_report(report))


def _train(args):
    from .train import PRESETS, train

    config = PRESETS[args.preset].replace(data_root=str(args.data_root))
    if args.name:
        config = config.replace(dataset=args.name)
    overrides = {k: getattr(args, k) for k in ("epochs", "seed", "num_workers", "device")}
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.fp32:
        config = config.replace(amp=False)
    train(config, args.out, resume=args.resume)


def _evaluate(args):
    from .train import evaluate_checkpoint

    result = evaluate_checkpoint(
        data_root=args.data_root,
        split=args.split,
        checkpoint=args.checkpoint,
        untrained=args.untrained,
        preset=args.preset,
        pca=args.pca,
        pca_dim=args.pca_dim,
        name=args.name,
        device=args.device,
        amp=not args.fp32,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>12}: {value}")


def _bench(args):
    from .bench import main as bench_main

    bench_main(args.rest)


def _weights(args):
    from .weights import download_weights, list_weights

    if args.action == "list":
        print(list_weights())
    else:
        download_weights(args.name, base_url=args.base_url,
                         allow_unverified=args.allow_unverified)


def run_notebooks(paths, timeout=1200):
    """Execute each notebook in place (working directory: its folder), keeping the outputs."""
    import time

    import nbformat
    from nbclient import NotebookClient

    for path in map(Path, paths):
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        # `display_page`: `%psource` output is stored in the notebook, not sent to a pager.
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}},
                                extra_arguments=["--InteractiveShell.display_page=True"])
        client.execute()
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")


def _run_notebooks(args):
    run_notebooks(args.notebooks, timeout=args.timeout)


def _figures(args):
    from .viz import make_figures

    for path in make_figures(args.out):
        print(path)


def build_parser():
    """The argument parser with one sub-command per task."""
    from .train import PRESETS
    parser = argparse.ArgumentParser(prog="python -m netvlad_tutorial", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="write the synthetic city in the Pittsburgh layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_synthetic)

    p = sub.add_parser("check-data", help="verify a dataset root and its .mat file")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--struct", type=Path, default=None, help="a dbStruct .mat file")
    p.add_argument("--split", default=None, help="train, val or test (instead of --struct)")
    p.add_argument("--name", default=None, help="dataset name, e.g. pitts30k")
    p.add_argument("--queries-dir", default="queries_real", help="query folder under ROOT")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully (catches truncated JPEGs; slower)")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("train", help="train NetVLAD with hard-negative mining")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--name", default=None, help="dataset name, e.g. pitts30k (default: preset's)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/latest.pth")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--fp32", action="store_true", help="force fp32 (no bf16 autocast)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="Recall@N of a checkpoint (or the untrained model)")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--untrained", action="store_true",
                   help="the same initialization, k-means centroids, no training")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--pca", action="store_true", help="apply (or fit) PCA whitening")
    p.add_argument("--pca-dim", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("bench", help="benchmarks (mining, speed)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)

    p = sub.add_parser("run-notebooks", help="execute notebooks in place, keeping outputs")
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--timeout", type=int, default=1200)
    p.set_defaults(func=_run_notebooks)

    p = sub.add_parser("figures", help="regenerate the figures in figures/")
    p.add_argument("--out", type=Path, default=Path("figures"))
    p.set_defaults(func=_figures)

    p = sub.add_parser("weights", help="list or download released weights (opt-in)")
    wsub = p.add_subparsers(dest="action", required=True)
    wsub.add_parser("list", help="the registered files, where they go, their hash status")
    d = wsub.add_parser("download", help="download one file into the torch hub cache")
    d.add_argument("name", help="a name from `weights list`, e.g. imagenet")
    d.add_argument("--base-url", default=None,
                   help="fetch BASE_URL/<file name> instead (a mirror; default: "
                        "$NETVLAD_WEIGHTS_URL, else the authors' URL)")
    d.add_argument("--allow-unverified", action="store_true",
                   help="accept a file whose authors publish no hash (still read safely)")
    p.set_defaults(func=_weights)
    return parser


def main(argv=None):
    """Entry point; errors about user input print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
