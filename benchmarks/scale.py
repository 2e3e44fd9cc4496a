"""Pitts250k-scale host memory and time of the descriptor cache, mining and evaluation search.

Simulated with random unit descriptors (no images), at the real sizes:

- training: Pitts250k-train, a cache of 91,464 database + 7,824 query descriptors of 32,768-D
  (K = 64 x 512), filled, then hard-negative mining of every training query through
  `mining.mine_triplets` (reference settings: 1,000 sampled negatives, 100 nearest, 10 kept) with
  `data.NegativeSampler` on Pitts250k-like positions (`synthetic.pitts_like_struct`);
- evaluation: Pitts250k-test, 83,952 database x 8,280 query descriptors, exact search
  (`evaluate.topk_search`, the search behind `recall_at_n`) for the 20 nearest.

Variants, each task in its own subprocess (its peak RSS is its own):

- `float32-ram`: today's path, a float32 cache in RAM and the previous mining code (the
  unblocked gather, with torch's default threads);
- `float16-ram-1worker`: float16 in RAM and the current mining code, one query at a time;
- `float16-ram`: float16 in RAM and the current mining code, with its default threads across
  queries (`mining.mining_workers()`: the usable cores);
- `float16-ram-shared`, `float16-disk-shared`: the same with `negative_pool="shared"` (a group
  of 32 queries draws one pool of potential negatives, whose rows are read once for the group),
  in RAM, and in a disk-backed `np.lib.format.open_memmap` .npy file (reopened read-only, as a
  training run would);
- `float16-disk`: the disk-backed file with the reference draws (`negative_pool="query"`).

    python benchmarks/scale.py                # full scale: about 13 GB of RAM for float32-ram
    python benchmarks/scale.py --scale 0.02   # a quick check
    python benchmarks/scale.py --json --save  # also benchmarks/results/scale_<cpu>_<date>.json

Times that would take too long at full scale on a small CPU are measured on a subset and scaled
linearly, and say so (`--mine-queries-old`, `--eval-queries`).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # `common`

from common import device_name, slugify  # noqa: E402

from netvlad_tutorial import mining  # noqa: E402
from netvlad_tutorial.data import NegativeSampler, train_positives  # noqa: E402
from netvlad_tutorial.evaluate import topk_search  # noqa: E402
from netvlad_tutorial.synthetic import pitts_like_struct  # noqa: E402

DIM = 64 * 512
PITTS250K_TEST = (83_952, 8_280)
VARIANTS = {  # name: (dtype, on disk, previous mining code, threads across queries, pool)
    "float32-ram": (np.float32, False, True, 1, "query"),
    "float16-ram-1worker": (np.float16, False, False, 1, "query"),
    "float16-ram": (np.float16, False, False, None, "query"),
    "float16-ram-shared": (np.float16, False, False, None, "shared"),
    "float16-disk-shared": (np.float16, True, False, None, "shared"),
    "float16-disk": (np.float16, True, False, None, "query"),
}
TARGETS = {"peak_rss_gib": 8.0, "mine_s": 120.0}  # for float16 at full Pitts250k-train scale
GIB = 2 ** 30


# --- Measuring --------------------------------------------------------------------------------


def _status_kib(field):
    """A field of /proc/self/status in KiB (VmHWM, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class MemoryWatch:
    """Samples RssAnon and RssFile every 50 ms; `peak()` adds the kernel's VmHWM (peak RSS)."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.file = max(self.file, _status_kib("RssFile"))

    def peak(self):
        self._stop.set()
        self._thread.join()
        return {"peak_rss_gib": _status_kib("VmHWM") / 2 ** 20,
                "peak_anon_gib": self.anon / 2 ** 20, "peak_file_gib": self.file / 2 ** 20}


def _storage(shape, dtype, disk, workdir, name):
    """An empty (N, D) array: in RAM, or a .npy memmap in `workdir` (and its path)."""
    if not disk:
        return np.empty(shape, dtype), None
    path = Path(workdir) / f"{name}.npy"
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape), path


def _fill(storage, seed, batch=256):
    """Random unit rows into `storage`, a batch at a time as the cache pass writes them.

    Returns (seconds writing into the storage, seconds generating the random rows).
    """
    gen = torch.Generator().manual_seed(seed)
    write_s = make_s = 0.0
    for start in range(0, len(storage), batch):
        t0 = time.perf_counter()
        rows = torch.rand(min(batch, len(storage) - start), storage.shape[1], generator=gen)
        rows = F.normalize(rows.sub_(0.5), dim=1).numpy()  # `rows`: (b, D), unit length
        t1 = time.perf_counter()
        storage[start:start + len(rows)] = rows  # cast to the storage's dtype
        write_s += time.perf_counter() - t1
        make_s += t1 - t0
    if isinstance(storage, np.memmap):
        t1 = time.perf_counter()
        storage.flush()
        write_s += time.perf_counter() - t1
    return write_s, make_s


def _previous_row_distances(db_desc, indices, q_row, device=None, block=None, workspace=None):
    """The mining distances as computed before `mining.row_distances` (one gather, float32)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = mining._float32(db_desc[indices], device)  # (n, D)
    return torch.linalg.vector_norm(rows - mining._float32(q_row, device), dim=1)  # (n,)


def run_train(variant, scale, workdir, mine_queries_old, seed=0):
    """Fill the Pitts250k-train cache, then mine its queries; figures of one variant."""
    dtype, disk, previous, workers, pool = VARIANTS[variant]
    workers = workers or mining.mining_workers()
    watch = MemoryWatch()
    db = pitts_like_struct(scale=scale, seed=seed)
    positives = train_positives(db)
    sampler = NegativeSampler(db)
    cache, path = _storage((db.numDb + db.numQ, DIM), dtype, disk, workdir, "train_cache")
    fill_s, make_s = _fill(cache, seed)
    if path is not None:  # reopened read-only, as training reads its disk-backed cache
        del cache
        cache = np.load(path, mmap_mode="r")
    db_desc, q_desc = cache[:db.numDb], cache[db.numDb:]
    queries = np.array([q for q, p in enumerate(positives) if len(p) > 0])
    mined = queries[:mine_queries_old] if previous and mine_queries_old else queries
    threads = None if previous else 1
    if previous:
        mining.row_distances = _previous_row_distances  # today's code path
    t0 = time.perf_counter()
    tuples, skipped = mining.mine_triplets(mined, q_desc, db_desc, positives, sampler,
                                           np.random.default_rng(seed),
                                           mining.NegativeCache(db.numQ, 10), num_threads=threads,
                                           workers=workers, negative_pool=pool)
    mine_s = time.perf_counter() - t0
    out = {"task": "train", "variant": variant, "num_db": db.numDb, "num_q": db.numQ,
           "dim": DIM, "dtype": np.dtype(dtype).name, "storage": "disk" if disk else "ram",
           "mining_code": "previous" if previous else "current", "mining_workers": workers,
           "negative_pool": pool,
           "cache_gib": cache.nbytes / GIB, "fill_s": fill_s, "random_rows_s": make_s,
           "mined_queries": len(mined), "mine_s_measured": mine_s,
           "mine_ms_per_query": 1000 * mine_s / len(mined),
           "mine_s": mine_s * len(queries) / len(mined), "mine_extrapolated": len(mined) < len(
               queries), "num_queries": len(queries), "tuples": len(tuples), "skipped": skipped,
           "disk_gib": os.stat(path).st_blocks * 512 / GIB if path else 0.0}
    del cache, db_desc, q_desc
    out.update(watch.peak())
    return out


def run_eval(variant, scale, workdir, eval_queries, seed=1):
    """Fill Pitts250k-test descriptors and search the queries' 20 nearest; one variant."""
    dtype, disk, _, _, _ = VARIANTS[variant]
    watch = MemoryWatch()
    num_db = max(1, round(PITTS250K_TEST[0] * scale))
    num_q = max(1, round(PITTS250K_TEST[1] * scale))
    db_desc, path = _storage((num_db, DIM), dtype, disk, workdir, "eval_db")
    q_desc = np.empty((num_q, DIM), dtype)  # queries stay in RAM: 8,280 rows
    fill_s, make_s = _fill(db_desc, seed)
    q_fill_s, _ = _fill(q_desc, seed + 1)
    if path is not None:
        del db_desc
        db_desc = np.load(path, mmap_mode="r")
    searched = min(num_q, eval_queries) if eval_queries else num_q
    t0 = time.perf_counter()
    _, idx = topk_search(q_desc[:searched], db_desc, 20, device="cpu")
    search_s = time.perf_counter() - t0
    out = {"task": "eval", "variant": variant, "num_db": num_db, "num_q": num_q, "dim": DIM,
           "dtype": np.dtype(dtype).name, "storage": "disk" if disk else "ram",
           "db_gib": db_desc.nbytes / GIB, "fill_s": fill_s + q_fill_s, "random_rows_s": make_s,
           "searched_queries": searched, "search_s_measured": search_s,
           "search_s": search_s * num_q / searched, "search_extrapolated": searched < num_q,
           "disk_gib": os.stat(path).st_blocks * 512 / GIB if path else 0.0,
           "torch_threads": torch.get_num_threads()}
    del db_desc, q_desc
    out.update(watch.peak())
    return out


def _child(spec):
    """Run one (task, variant) and print its figures as one JSON line."""
    spec = json.loads(spec)
    with tempfile.TemporaryDirectory(dir=spec["workdir"], prefix="scale_") as workdir:
        if spec["task"] == "train":
            out = run_train(spec["variant"], spec["scale"], workdir, spec["mine_queries_old"])
        else:
            out = run_eval(spec["variant"], spec["scale"], workdir, spec["eval_queries"])
    print("RESULT " + json.dumps(out), flush=True)


def run_isolated(spec):
    """One (task, variant) in a fresh Python process; its figures, or its error."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"task": spec["task"], "variant": spec["variant"],
            "error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}


# --- Reporting --------------------------------------------------------------------------------


ROWS = [  # (label, task, key, format)
    ("train cache (GiB)", "train", "cache_gib", "{:.2f}"),
    ("train peak RSS (GiB)", "train", "peak_rss_gib", "{:.2f}"),
    ("  of it anonymous (GiB)", "train", "peak_anon_gib", "{:.2f}"),
    ("  of it file pages (GiB)", "train", "peak_file_gib", "{:.2f}"),
    ("fill the cache (s)", "train", "fill_s", "{:.1f}"),
    ("mine all queries (s)", "train", "mine_s", "{:.1f}"),
    ("  per query (ms)", "train", "mine_ms_per_query", "{:.1f}"),
    ("  threads across queries", "train", "mining_workers", "{}"),
    ("  potential negatives", "train", "negative_pool", "{}"),
    ("  queries timed", "train", "mined_queries", "{}"),
    ("train disk (GiB)", "train", "disk_gib", "{:.2f}"),
    ("eval database (GiB)", "eval", "db_gib", "{:.2f}"),
    ("eval peak RSS (GiB)", "eval", "peak_rss_gib", "{:.2f}"),
    ("  of it anonymous (GiB)", "eval", "peak_anon_gib", "{:.2f}"),
    ("fill db + queries (s)", "eval", "fill_s", "{:.1f}"),
    ("search all queries (s)", "eval", "search_s", "{:.1f}"),
    ("  queries timed", "eval", "searched_queries", "{}"),
    ("eval disk (GiB)", "eval", "disk_gib", "{:.2f}"),
]


def _load(loadavg):
    """A load average triple as text."""
    return "/".join(f"{x:.1f}" for x in loadavg)


def format_table(result):
    """The figures of every variant side by side (Markdown)."""
    names = list(result["variants"])
    lines = [f"| | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for label, task, key, fmt in ROWS:
        cells = []
        for name in names:
            r = result["variants"][name].get(task, {})
            cells.append("error" if "error" in r else fmt.format(r[key]) if key in r else "")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def check_targets(result):
    """float16 variants at full scale: peak RSS and mining time against `TARGETS`."""
    out = {}
    for name in [n for n in VARIANTS if n.startswith("float16")]:
        r = result["variants"].get(name, {}).get("train", {})
        if "peak_rss_gib" in r:
            out[name] = {"peak_rss_gib": r["peak_rss_gib"] <= TARGETS["peak_rss_gib"],
                         "mine_s": r["mine_s"] <= TARGETS["mine_s"]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every count")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tasks", default="train,eval")
    parser.add_argument("--mine-queries-old", type=int, default=300,
                        help="queries timed with the previous mining code (scaled to all)")
    parser.add_argument("--eval-queries", type=int, default=None,
                        help="queries timed in the search (scaled to all; default all)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(),
                        help="where the disk-backed files go (deleted after each task)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/scale_<cpu>_<date>.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return None
    result = {"benchmark": "scale", "cpu": device_name("cpu"), "date":
              datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "scale": args.scale, "dim": DIM, "torch": torch.__version__,
              "numpy": np.__version__, "torch_default_threads": torch.get_num_threads(),
              "mine_queries_old": args.mine_queries_old, "eval_queries": args.eval_queries,
              "cpu_count": os.cpu_count(), "load_before": os.getloadavg(),
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
              "variants": {}}
    for name in args.variants.split(","):
        for task in args.tasks.split(","):
            spec = {"task": task, "variant": name, "scale": args.scale,
                    "workdir": args.workdir, "mine_queries_old": args.mine_queries_old,
                    "eval_queries": args.eval_queries}
            t0, load_before = time.perf_counter(), os.getloadavg()
            r = run_isolated(spec)
            r["wall_s"] = time.perf_counter() - t0
            r["load_before"], r["load_after"] = load_before, os.getloadavg()
            result["variants"].setdefault(name, {})[task] = r
            print(f"{name} {task}: " + (r["error"] if "error" in r else
                                         f"done in {r['wall_s']:.0f} s, load "
                                         f"{_load(r['load_before'])} -> "
                                         f"{_load(r['load_after'])}"), file=sys.stderr)
    result["load_after"] = os.getloadavg()
    if args.scale == 1.0:
        result["targets_met"] = check_targets(result)
    if args.save:
        out_dir = ROOT / "benchmarks" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"scale_{slugify(result['cpu'])}_{result['date'][:10]}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['cpu']}, scale {args.scale}, {DIM:,}-D descriptors; load average "
              f"(1, 5, 15 min) {_load(result['load_before'])} before, "
              f"{_load(result['load_after'])} after")
        print(format_table(result))
        if "targets_met" in result:
            print(f"targets (peak RSS <= {TARGETS['peak_rss_gib']} GiB, mining <= "
                  f"{TARGETS['mine_s']:.0f} s): {result['targets_met']}")
    return result


if __name__ == "__main__":
    main()
