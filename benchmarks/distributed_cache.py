"""The cache pass on the same images: 1 process vs N ranks of `torch.distributed`, in one run.

    python benchmarks/distributed_cache.py                       # CPU: 1 process vs 2 gloo ranks
    python benchmarks/distributed_cache.py --world-sizes 1,2,4,8  # GPUs: the NCCL scaling curve

Each world size W starts W fresh processes (`torch.multiprocessing.spawn`, rendezvous on a free
port of 127.0.0.1; W = 1 too, so that every variant starts alike). Each rank builds the same
seeded VGG16-conv5 + NetVLAD (random weights: the speed does not depend on them), encodes one
warm-up batch, and after a barrier times `features.encode_descriptors` over the first
`--images` images of the split: its `distributed.shard` of them, then the exact gather of the
float16 cache to every rank (included in the time). Printed: images/s, the speed-up over one
process, and the largest difference between the W-rank cache and the 1-process one.

On CPU (gloo) the ranks share the machine's cores: with `--threads T` (default: all cores)
one process uses T threads and each of W ranks T / W, so the comparison is at equal cores. On
CUDA (NCCL) rank r uses GPU r and all GPUs are needed for W ranks.
"""

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netvlad_tutorial import distributed  # noqa: E402
from netvlad_tutorial.data import WholeDataset, load_split
from netvlad_tutorial.features import encode_descriptors  # noqa: E402
from netvlad_tutorial.images import input_transform
from netvlad_tutorial.model import build_model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, args, out_file):
    """One rank: build, warm up, time the sharded cache pass; rank 0 saves the cache and time."""
    cuda = torch.cuda.is_available() and not args.cpu
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        distributed.init("nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    try:
        split = load_split(args.data_root, "train")
        images = WholeDataset(split.root, split.db, transform=input_transform(args.image_size),
                              queries_dir=split.queries_dir)
        subset = torch.utils.data.Subset(images, range(min(args.images, len(images))))
        torch.manual_seed(0)
        model = build_model(num_clusters=args.clusters).to(device)
        warm = torch.utils.data.Subset(images, range(args.batch_size))
        run = {"batch_size": args.batch_size, "num_workers": args.workers, "device": device,
               "precision": args.precision}
        encode_descriptors(model, warm, label="warm-up", **run)
        distributed.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        cache = encode_descriptors(model, subset, label=f"{world} rank(s)", **run)
        if cuda:
            torch.cuda.synchronize(device)
        distributed.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            np.save(out_file, np.asarray(cache[:len(subset)]))
            Path(str(out_file) + ".time").write_text(f"{seconds} {len(subset)}")
    finally:
        distributed.destroy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="a Pittsburgh-layout root; default: a micro synthetic city in a "
                             "temporary folder")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, nargs=2, default=(96, 128))
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads in all (each of W ranks gets threads / W)")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even with CUDA")
    args = parser.parse_args(argv)
    args.image_size = tuple(args.image_size)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    cuda = torch.cuda.is_available() and not args.cpu
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root is None:
            from netvlad_tutorial.synthetic import make_synthetic_city

            args.data_root = make_synthetic_city(Path(tmp) / "city", preset="micro", seed=0)
        print(f"device: {'CUDA x ' + str(torch.cuda.device_count()) if cuda else 'CPU'}, "
              f"{os.cpu_count()} CPU cores, threads in all: {args.threads}, "
              f"images: {args.images} of {args.image_size}, batch {args.batch_size}/rank, "
              f"torch {torch.__version__}")
        rows, reference = [], None
        for world in worlds:
            if cuda and world > torch.cuda.device_count():
                print(f"{world} ranks: skipped, only {torch.cuda.device_count()} GPU(s)")
                continue
            out_file = Path(tmp) / f"cache_{world}.npy"
            mp.spawn(_rank_main, args=(world, _free_port(), args, out_file), nprocs=world,
                     join=True)
            seconds, n = Path(str(out_file) + ".time").read_text().split()
            cache = np.load(out_file).astype(np.float32)
            reference = cache if reference is None else reference
            rows.append((world, int(n), float(seconds), np.abs(cache - reference).max()))
    base = rows[0][1] / rows[0][2]
    backend = "nccl" if cuda else "gloo"
    print(f"{'ranks':>5} {'backend':>8} {'images':>7} {'seconds':>8} {'img/s':>8} "
          f"{'speed-up':>8} {'max |diff|':>10}")
    for world, n, seconds, diff in rows:
        print(f"{world:>5} {backend if world > 1 else '-':>8} {n:>7} {seconds:>8.2f} "
              f"{n / seconds:>8.1f} {n / seconds / base:>8.2f} {diff:>10.2e}")


if __name__ == "__main__":
    main()
