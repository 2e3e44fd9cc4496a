"""Command line: `python -m netvlad_tutorial <command> ...` (see `--help`)."""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


def _make_synthetic(args):
    from .synthetic import make_synthetic_city

    root = make_synthetic_city(args.out, preset=args.preset, seed=args.seed)
    print(f"Synthetic city ({args.preset}, seed {args.seed}) written to {root}")


def _check_data(args):
    from .datacheck import check_data, format_report
    from .dbstruct import QUERIES_DIR

    if args.struct is not None and args.split is not None:
        raise ValueError("give either --struct or --split, not both")
    if args.queries_dir is not None and args.struct is None:
        raise ValueError("--queries-dir is only used with --struct (a split found by --split "
                         "or --name brings its own query folder)")
    report = check_data(args.root, struct_file=args.struct, split=args.split, name=args.name,
                        queries_dir=args.queries_dir or QUERIES_DIR, decode=args.decode)
    print(format_report(report))


def _train(args):
    from .config import get_preset
    from .train import train

    config = get_preset(args.preset).replace(data_root=str(args.data_root))
    if args.name:
        config = config.replace(dataset=args.name)
    overrides = {k: getattr(args, k) for k in ("epochs", "seed", "num_workers", "device",
                                                "negative_pool", "precision")}
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    config = config.with_settings(args.set)  # checked by `TrainConfig`, as every setting
    train(config, args.out, resume=args.resume, overwrite=args.overwrite)


def _pretrain(args):
    from .config import apply_settings
    from .pretrain import PretrainConfig, pretrain

    config = PretrainConfig(**{k: v for k, v in (("device", args.device),
                                                  ("precision", args.precision)) if v})
    config = apply_settings(config, args.set)
    path = pretrain(config, args.out, resume=args.resume, overwrite=args.overwrite,
                    max_minutes=args.max_minutes)
    if path is not None:
        print(f"Pretrained encoder: {path} (provenance: {path.parent / 'provenance.json'})")


def _evaluate(args):
    from .evaluate import evaluate_checkpoint

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
        precision=args.precision,
        save_pca=args.save_pca,
        per_query=args.per_query,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>12}: {value}")


def _bench(args):
    """`bench mining|speed ...`: runs `benchmarks/mining.py` or `benchmarks/speed.py` of the
    repository (the benchmarks are scripts, not part of the package)."""
    import runpy

    from .utils import REPO_ROOT

    names = ("mining", "speed")
    if not args.rest or args.rest[0] not in names:
        raise ValueError(f"bench needs one of {', '.join(names)}, e.g. `bench speed --device "
                         "cpu`; or run `python benchmarks/speed.py` directly")
    script = REPO_ROOT / "benchmarks" / f"{args.rest[0]}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks live in the repository's "
                                "benchmarks/ folder, next to the package")
    sys.argv = [str(script), *args.rest[1:]]
    runpy.run_path(str(script), run_name="__main__")


def _weights(args):
    from .weights import download_weights, list_weights

    if args.action == "list":
        print(list_weights())
    else:
        download_weights(args.name, base_url=args.base_url,
                         allow_unverified=args.allow_unverified)


def _datasets(args):
    from .datasets import download_gardens_point

    download_gardens_point(args.out, base_url=args.base_url)


def _terminal_text(text):
    """What a terminal shows for `text`: each line ends as its last carriage-return segment."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(line for line in lines if line.strip()) + ("\n" if text.strip() else "")


def squash_progress(nb):
    """Merge each code cell's consecutive outputs of one stream (as Jupyter shows them: a line
    printed in two chunks stays one line on GitHub) and keep what a terminal would show of
    stderr: a progress bar ends as one line in the stored notebook, as it does in a terminal."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and outputs
                    and outputs[-1].get("output_type") == "stream"
                    and outputs[-1].get("name") == out.get("name")):
                outputs[-1]["text"] += out["text"]
            else:
                outputs.append(out)
        for out in outputs:
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                out["text"] = _terminal_text(out["text"])
        cell["outputs"] = [o for o in outputs if not (o.get("output_type") == "stream"
                                                      and not o["text"].strip())]
    return nb


def _kernel_transport(folder):
    """Kernel sockets as files in `folder` where the OS has them (IPC): only this user's processes
    reach the kernel, and ipykernel no longer warns once per notebook that TCP is unencrypted.
    Elsewhere (Windows) jupyter's default, TCP on 127.0.0.1."""
    from traitlets.config import Config

    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(Path(folder) / "kernel")
    return config


@contextlib.contextmanager
def _text_progress_bars():
    """`$NETVLAD_PROGRESS=text` for the kernels started inside the block: the package's progress
    bars are stored as their last text line (`squash_progress`), not as widgets, whose stored
    form is a repr ("HBox(children=...") and a widget-state blob."""
    from .utils import PROGRESS_ENV

    saved = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "text"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[PROGRESS_ENV]
        else:
            os.environ[PROGRESS_ENV] = saved


def run_notebooks(paths, timeout=1200):
    """Execute each notebook in place (working directory: its folder), keeping the outputs."""
    import tempfile
    import time

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .files import atomic_write

    for path in map(Path, paths):
        start = time.perf_counter()
        nb = _read_notebook(path)
        # `display_page`: `%psource` output is stored in the notebook, not sent to a pager.
        with tempfile.TemporaryDirectory(prefix="netvlad-kernel-") as sockets:
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    config=_kernel_transport(sockets),
                                    resources={"metadata": {"path": str(path.parent)}},
                                    extra_arguments=["--InteractiveShell.display_page=True"])
            try:
                with _text_progress_bars():
                    client.execute()
            except CellExecutionError as err:  # the notebook on disk is left as it was
                raise ValueError(f"{path}: {_failed_cell(nb)} failed: "
                                 f"{err.ename}: {err.evalue}") from None
        text = nbformat.writes(squash_progress(nb))
        atomic_write(path, text if text.endswith("\n") else text + "\n")
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")


def _read_notebook(path):
    """`nbformat.read(path)` (version 4), with a ValueError naming the file unless it is a
    readable, valid notebook."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except OSError:
        raise
    except Exception as err:  # nbformat raises many kinds: NotJSONError, KeyError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not a Jupyter notebook ({first[:200]})") from None
    return nb


def _failed_cell(nb):
    """"cell N" (counting every cell from 1) of the first code cell with an error output."""
    for i, cell in enumerate(nb.cells, start=1):
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            return f"cell {i}"
    return "a cell"


def _run_notebooks(args):
    run_notebooks(args.notebooks, timeout=args.timeout)


def _figures(args):
    from .viz import make_figures

    for path in make_figures(args.out):
        print(path)


def _add_precision(parser):
    """`--precision auto|fp32|bf16`, and `--fp32` as its short form."""
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                        help="auto (default, or $NETVLAD_PRECISION): bf16 autocast only where "
                             "the device has native bf16 (AMX/AVX512-BF16 CPU, Ampere+ GPU)")
    parser.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                        help="same as --precision fp32")


def build_parser():
    """The argument parser with one sub-command per task."""
    from .config import PRESETS
    from .synthetic import PRESETS as CITY_PRESETS

    parser = argparse.ArgumentParser(prog="python -m netvlad_tutorial", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="write the synthetic city in the Pittsburgh layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny", choices=sorted(CITY_PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_synthetic)

    p = sub.add_parser("check-data", help="verify a dataset root and its .mat file")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--struct", type=Path, default=None, help="a dbStruct .mat file")
    p.add_argument("--split", default=None, help="train, val or test (instead of --struct)")
    p.add_argument("--name", default=None, help="dataset name, e.g. pitts30k")
    p.add_argument("--queries-dir", default=None,
                   help="query folder under ROOT, with --struct (default: queries_real)")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully (catches truncated JPEGs; slower)")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("train", help="train NetVLAD with hard-negative mining")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--name", default=None, help="dataset name, e.g. pitts30k (default: preset's)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, required=True, help="run folder for checkpoints and logs")
    p.add_argument("--resume", action="store_true",
                   help="continue (or extend to more --epochs) the run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (otherwise refused)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--negative-pool", choices=["query", "shared"], default=None,
                   help="potential negatives drawn per query (the reference) or shared by a "
                        "group of queries (24x less memory read when mining); default: the "
                        "preset's (shared for pitts250k, query otherwise)")
    _add_precision(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of TrainConfig, e.g. --set lr=0.001 --set batch_size=8 "
                        "(repeatable; applied after the other flags)")
    p.set_defaults(func=_train)

    p = sub.add_parser("pretrain", help="pretrain the encoder on the synthetic world (the "
                       "course's stand-in for ImageNet)")
    p.add_argument("--out", type=Path, default=Path("runs") / "pretrain",
                   help="run folder (default: runs/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop at a checkpoint after this long (continue with --resume)")
    p.add_argument("--device", default=None)
    _add_precision(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of PretrainConfig, e.g. --set steps=500 (repeatable)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("evaluate", help="Recall@N of a checkpoint (or the untrained model)")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--untrained", action="store_true",
                   help="the same initialization, k-means centroids, no training")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="with --untrained: the run to mirror (default: tiny)")
    p.add_argument("--pca", action="store_true", help="apply (or fit) PCA whitening")
    p.add_argument("--pca-dim", type=int, default=None)
    p.add_argument("--save-pca", action="store_true",
                   help="store a fitted PCA beside the checkpoint (CHECKPOINT.pcaDIM.pth); "
                        "the checkpoint itself is never written")
    p.add_argument("--per-query", type=Path, default=None, metavar="FILE",
                   help="write a CSV, one row per query: query,first_correct_rank,top (for a "
                        "paired test of two models: evaluate.paired_from_csv)")
    p.add_argument("--device", default=None)
    _add_precision(p)
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

    p = sub.add_parser("datasets", help="download real photographs (opt-in)")
    dsub = p.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("download", help="fetch a dataset and unpack it in the layout "
                                         "`load_split` reads")
    d.add_argument("name", choices=["gardens-point"],
                   help="gardens-point: GardensPoint Walking, day_right (database) and "
                        "night_right (queries), ground truth by frame order")
    d.add_argument("--out", type=Path, default=None,
                   help="the dataset folder (default: data/gardens_point)")
    d.add_argument("--base-url", default=None,
                   help="fetch BASE_URL/GardensPoint_Walking.zip instead (a mirror; default: "
                        "$NETVLAD_DATA_URL, else the authors' address)")
    p.set_defaults(func=_datasets)
    return parser


def error_message(err):
    """The message of `err` for the user; an error raised in a DataLoader worker comes with
    the worker's traceback, of which only the last line (the original error) is kept."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[-1] if ": " in last else last
    return text


# How the command line names the arguments that library errors name (`config.ArgumentError`).
FLAGS = {"resume": "--resume", "overwrite": "--overwrite", "out": "--out",
         "checkpoint": "--checkpoint", "untrained": "--untrained", "preset": "--preset",
         "pca": "--pca", "pca_dim": "--pca-dim", "save_pca": "--save-pca",
         "epochs": "--epochs", "seed": "--seed", "num_workers": "--num-workers",
         "device": "--device", "negative_pool": "--negative-pool", "precision": "--precision",
         "allow_unverified": "--allow-unverified", "per_query": "--per-query",
         "max_minutes": "--max-minutes"}


def main(argv=None):
    """Entry point; errors about user input, data, files or disks print one clear line (naming
    the file) and exit 2. OSError covers a read-only folder and a full disk (ENOSPC).

    Under `torchrun` (its environment present) the command runs in a `torch.distributed`
    process group, started here and ended at the end (see `distributed`); without it, in one
    process as always.
    """
    from . import distributed

    args = build_parser().parse_args(argv)
    launched = distributed.launched()
    if launched:
        distributed.init()
    try:
        with distributed.quiet_other_ranks():  # torchrun: rank 0 alone prints
            args.func(args)
        distributed.barrier()  # torchrun: every rank has finished before the group ends
    except (ValueError, OSError) as err:
        text = err.spelled(FLAGS) if hasattr(err, "spelled") else error_message(err)
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    finally:
        if launched:
            distributed.destroy()


if __name__ == "__main__":
    main()
