"""VGG16 to conv5_3 on this CPU in the four paths: fp32 / bf16 autocast x NCHW / channels_last.

Prints images per second of each path, measured in one run, and what `resolve_precision("auto")`
picks here with its reason, so the choice can be checked against the figures:

    python benchmarks/precision.py                 # 96x128, batch 8, torch's default threads
    python benchmarks/precision.py --size 480 640 --batch 4

bf16 instructions do not make bf16 faster on every CPU: see GUIDE.md, "Precision and speed on
your CPU"; the figures per CPU are in RESULTS.md.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name  # noqa: E402

from netvlad_tutorial.precision import native_bf16, resolve_precision

PATHS = [("fp32 NCHW", False, False), ("fp32 channels_last", False, True),
         ("bf16 + channels_last", True, True), ("bf16 NCHW", True, False)]


def images_per_second(encoder, x, bf16, channels_last, reps):
    """Images per second of `encoder` on batch `x` (after one warm-up call)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net, xi = encoder.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(xi)
        t0 = time.perf_counter()
        for _ in range(reps):
            net(xi)
    return reps * len(x) / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=6)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    encoder = torchvision.models.vgg16().features[:-2].eval()  # conv5_3, random weights
    x = torch.randn(args.batch, 3, *args.size)  # `x`: (B, 3, H, W)
    print(f"{device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"VGG16 to conv5_3, {args.size[0]}x{args.size[1]}, batch {args.batch}")
    print("bf16 instructions:", native_bf16("cpu"))
    rates = {}
    for name, bf16, channels_last in PATHS:
        rates[name] = images_per_second(encoder, x, bf16, channels_last, args.reps)
        print(f"  {name:22} {rates[name]:6.1f} img/s", flush=True)
    ratio = rates["bf16 + channels_last"] / rates["fp32 channels_last"]
    print(f"bf16 + channels_last / fp32 channels_last: {ratio:.2f}x")
    print("auto:", resolve_precision("auto", "cpu", verbose=False))
    return rates


if __name__ == "__main__":
    main()
