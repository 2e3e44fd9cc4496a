"""Mining structures: the seed's negative lists vs this project's sampler, at Pitts250k scale.

    python benchmarks/mining.py [--scale 0.1] [--seed 0]

Positions shaped like Pitts250k-train (`synthetic.pitts_like_struct`, no images); both ways are
timed and their peak memory measured in this run (`lessons.compare_negative_memory`).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, from a checkout

from netvlad_tutorial.lessons import compare_negative_memory, format_negative_memory
from netvlad_tutorial.synthetic import pitts_like_struct  # noqa: E402


def build_parser():
    """The options of the mining benchmark."""
    p = argparse.ArgumentParser(prog="python benchmarks/mining.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the Pitts250k-train size (1.0: 91,464 x 7,824)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    """Measure both ways at the scale on the command line and print the table."""
    args = build_parser().parse_args(argv)
    result = compare_negative_memory(pitts_like_struct(args.scale, args.seed), seed=args.seed)
    print(f"Pitts250k-train shape, scale {args.scale:g}")
    print(format_negative_memory(result))


if __name__ == "__main__":
    main()
